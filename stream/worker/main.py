"""``gruflow worker``: one worker process (faust Worker + health endpoints + model subscriber).

Startup order: settings -> web endpoints (/livez 200 from here on, /readyz 503 with the reason) ->
topics ensured and first model loaded (models topic, else GRUFLOW_MODEL_PATH), retried while the
cluster is unreachable -> faust app -> faust worker (group join, table recovery, batches). SIGTERM /
Ctrl-C stop it cleanly: the current batch finishes or is dropped unacked, offsets are committed, RocksDB
is closed.

exactly_once: outputs and changelog writes of an open transaction reach RocksDB before the commit,
so after an unclean exit the local store may hold writes that were aborted. Like Kafka Streams, the
worker then wipes its local store and rebuilds it from the (committed) changelog: a marker file
exists while the worker runs and is removed on clean shutdown.
"""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path
from typing import Any

from model.recommender import Recommender
from stream.observe.metrics import Metrics
from stream.worker.model_holder import ModelHolder
from stream.settings import Settings

log = logging.getLogger("gruflow.worker")
RUNNING_MARKER = ".worker-running"


class WorkerError(RuntimeError):
    """The worker cannot start; the message says what to change."""


def load_initial_model(settings: Settings, metrics: Metrics | None = None) -> Recommender:
    """The model to serve first: newest valid version on the models topic, else the checkpoint file."""
    try:
        from stream.online import model_sync
    except ImportError:
        model_sync = None  # type: ignore[assignment]
    if model_sync is not None and hasattr(model_sync, "load_latest"):
        try:
            rec = model_sync.load_latest(settings, metrics)
        except Exception as exc:  # noqa: BLE001 - fall back to the file; say why
            log.warning("no model from the models topic (%s); trying GRUFLOW_MODEL_PATH", exc)
            rec = None
        if rec is not None:
            log.info("serving model version %s from the models topic", rec.version)
            return rec
    if settings.scoring.model_path:
        from model.checkpoint import load_checkpoint
        from model.weight_check import weight_problem

        ckpt = load_checkpoint(settings.scoring.model_path)
        version = int(ckpt.metadata.get("version", 0) or 0)
        problem = weight_problem(ckpt.net, ckpt.popularity)
        if problem is not None:
            if metrics is not None:
                metrics.model_refusals.labels(reason=problem.reason).inc()
            raise WorkerError(f"refused to serve {settings.scoring.model_path} ({problem.reason}): {problem}")
        log.info("serving model %s (version %d)", settings.scoring.model_path, version)
        return ckpt.recommender(version)
    raise WorkerError("no model to serve: the models topic has none and GRUFLOW_MODEL_PATH is not set. Train one "
                      "(`gruflow train ... --out model.gfc`) and set GRUFLOW_MODEL_PATH, or run `gruflow demo`.")


def _wipe_if_dirty(settings: Settings) -> None:
    from stream.worker.app import table_dir

    root = Path(table_dir(settings))
    marker = root / RUNNING_MARKER
    if settings.worker.processing_guarantee == "exactly_once" and marker.exists():
        log.warning("previous exactly_once worker did not stop cleanly: rebuilding local state from the changelog")
        for child in root.iterdir():
            if child.is_dir():
                shutil.rmtree(child)
    root.mkdir(parents=True, exist_ok=True)
    marker.write_text("running\n")


def _clear_marker(settings: Settings) -> None:
    from stream.worker.app import table_dir

    (Path(table_dir(settings)) / RUNNING_MARKER).unlink(missing_ok=True)


class _Startup:
    """What /readyz answers while the worker starts: what it waits for, then the runtime's own answer."""

    def __init__(self) -> None:
        self.runtime: Any = None
        self.why = "starting"

    def ready(self) -> tuple[bool, str]:
        rt = self.runtime
        return rt.ready() if rt is not None else (False, self.why)


def _configure_process(settings: Settings) -> None:
    import torch

    logging.basicConfig(level=settings.process.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(settings.scoring.torch_threads)
    # three busy threads share the GIL (event loop, compute, faust's consumer thread): hand it over
    # every 1 ms instead of 5 ms so fetched records are not left waiting behind a long Python stretch
    sys.setswitchinterval(0.001)


def new_event_loop(kind: str) -> Any:
    """The worker's event loop. uvloop (libuv) runs the same asyncio code with its socket transports in C:
    the Kafka clients' and the HTTP server's reads and writes take less of the loop, which the stream's
    batches share (docs/serving-cost.md). faust's consumer thread makes its own loop through the policy, so
    it gets the same kind."""
    import asyncio

    if kind == "uvloop":
        try:
            import uvloop
        except ImportError:  # a platform without it (Windows): Python's own loop does the same work
            log.warning("uvloop is not installed: the worker runs on asyncio's event loop")
        else:
            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return asyncio.new_event_loop()


async def _first_model(settings: Settings, model: Recommender | None, metrics: Metrics, startup: _Startup,
                       stop: Any) -> Recommender | None:
    """Topics and first model, retried until the cluster answers; None when ``stop`` is set first."""
    import asyncio

    from stream.kafka.topics import TopicError, ensure_topics

    loop = asyncio.get_running_loop()
    delay = 1.0
    while not stop.is_set():
        try:
            startup.why = f"waiting for Kafka at {settings.connection.bootstrap_servers}"
            await loop.run_in_executor(None, ensure_topics, settings)
            startup.why = "loading the model"
            return model or await loop.run_in_executor(None, load_initial_model, settings, metrics)
        except WorkerError:
            raise
        except (TopicError, ValueError, OSError) as exc:
            if isinstance(exc, TopicError) and "cannot reach" in str(exc):
                retry = exc  # the cluster is down or not there yet
            else:
                raise WorkerError(str(exc)) from None  # wrong partitions, unreadable checkpoint, ...
        except Exception as exc:  # noqa: BLE001 - broker down or not reachable yet: retry
            retry = exc
        log.warning("cannot start yet (%s); retrying in %.0f s", retry, delay)
        try:
            await asyncio.wait_for(stop.wait(), delay)
        except asyncio.TimeoutError:
            pass
        delay = min(30.0, delay * 2)
    return None


def _wait_for_start(loop: Any, settings: Settings, model: Recommender | None, metrics: Metrics,
                    startup: _Startup) -> Recommender | None:
    """``_first_model`` with SIGTERM/SIGINT ending the wait; faust's worker takes the signals over later."""
    import asyncio
    import signal

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        return loop.run_until_complete(_first_model(settings, model, metrics, startup, stop))
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def _faust_worker(settings: Settings, runtime: Any, holder: ModelHolder, metrics: Metrics, web: Any, serve: Any,
                  loop: Any, heartbeat: Any) -> Any:
    """The faust Worker that runs ``runtime``'s app: the item-rules reader, the model subscriber and the
    loop's heartbeat (``/livez``) start once it runs, and everything stops in order on shutdown."""
    import asyncio

    import faust

    from stream.worker.item_rules import ItemRulesReader

    rules_reader = ItemRulesReader(settings, runtime.pipeline.names.item_rules, runtime.pipeline.catalogue, metrics)
    try:
        from stream.online.model_sync import ModelSubscriber
    except ImportError:
        ModelSubscriber = None  # type: ignore[assignment,misc]
    subscriber: Any = None

    class GruflowWorker(faust.Worker):
        async def on_execute(self) -> None:
            nonlocal subscriber
            heartbeat.arm(asyncio.get_running_loop())
            rules_reader.start()
            if ModelSubscriber is not None:
                subscriber = ModelSubscriber(settings, holder, metrics)
                subscriber.start()

        async def on_stop(self) -> None:
            heartbeat.disarm()
            await super().on_stop()
            await asyncio.get_running_loop().run_in_executor(None, web.stop)  # a request may await this loop

        async def on_shutdown(self) -> None:
            await super().on_shutdown()
            await runtime.pipeline.stop_output()  # after the app: the last batches' records are delivered

        def on_worker_shutdown(self) -> None:
            if subscriber is not None:
                subscriber.stop()
            rules_reader.stop()
            runtime.pipeline.close()

    return GruflowWorker(runtime.app, loglevel=settings.process.log_level.lower(), quiet=True,
                         override_logging=False, redirect_stdouts=False, loop=loop)


def run_worker(settings: Settings, model: Recommender | None = None) -> int:
    """Run until SIGTERM/SIGINT. Returns the process exit code."""
    if settings.embedded:
        print("gruflow worker needs a Kafka cluster: set GRUFLOW_BOOTSTRAP_SERVERS (or --bootstrap). For a "
              "self-contained run use `gruflow demo`, or start a broker with `gruflow broker` and point "
              "GRUFLOW_BOOTSTRAP_SERVERS at it.", file=sys.stderr)
        return 2
    import asyncio

    from stream.kafka.passthrough import untranslated
    from stream.kafka.topics import dead_letter_budget
    from stream.observe.heartbeat import LoopHeartbeat
    from stream.observe.web import WebServerThread
    from stream.worker.app import build_app
    from stream.worker.http_api import ServeEndpoints

    _configure_process(settings)
    metrics = Metrics.create(role="worker")
    # the endpoints come up first, on the loop faust will run on: /livez answers while Kafka is
    # unreachable, /readyz says what the worker is waiting for
    startup = _Startup()
    loop = new_event_loop(settings.worker.event_loop)
    asyncio.set_event_loop(loop)
    log.info("event loop: %s.%s", type(loop).__module__, type(loop).__name__)
    serve = ServeEndpoints(settings, metrics)  # answers 503 until the runtime below exists
    # the endpoints run on a thread and loop of their own: requests never wait behind the stream's loop,
    # nor the stream behind them (docs/serving-cost.md)
    heartbeat = LoopHeartbeat(settings.worker.livez_stall_s)  # /livez: the stream's loop still turns
    web = WebServerThread(metrics, startup.ready, settings.process.web_host, settings.process.web_port, serve,
                          with_ready_gauge=True, on_stop=serve.close,  # its loop: the same kind (the policy set above)
                          live=heartbeat.check)
    serve.stream_loop = loop
    web.start()
    log.info("health endpoints on http://%s:%d (/metrics /livez /readyz), requests as %s (/users/{id}/recommendations,"
             " /recommendations)", settings.process.web_host, settings.process.web_port, settings.web_url())
    only_librdkafka = untranslated(settings)
    if only_librdkafka:
        log.info("client properties for librdkafka only (aiokafka has no counterpart; docs/kafka-setups.md): %s",
                 ", ".join(only_librdkafka))
    try:
        first = _wait_for_start(loop, settings, model, metrics, startup)
    except WorkerError as exc:
        print(f"gruflow worker: {exc}", file=sys.stderr)
        web.stop()
        return 2
    if first is None:  # stopped while waiting for the cluster
        web.stop()
        loop.close()
        return 0
    dead_letter_bytes = loop.run_until_complete(loop.run_in_executor(None, dead_letter_budget, settings))
    metrics.model_version.set(first.version)
    holder = ModelHolder(first)
    _wipe_if_dirty(settings)
    runtime = build_app(settings, holder, metrics, dead_letter_bytes)
    startup.why = "choosing the top-K path"
    loop.run_until_complete(loop.run_in_executor(None, runtime.pipeline.prepare_scorer, first, True))
    startup.runtime = runtime
    serve.runtime = runtime
    worker = _faust_worker(settings, runtime, holder, metrics, web, serve, loop, heartbeat)
    code = 0
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        code = int(exc.code or 0) if isinstance(exc.code, int) or exc.code is None else 1
    if code == 0 and not worker.crash_reason:
        _clear_marker(settings)
    return code
