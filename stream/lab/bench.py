"""``gruflow bench stream --json``: one worker process on the embedded broker, measured end to end.

0. compute ceiling: before the worker starts, the worker's batch computation alone (decode, GRU steps,
   exact top-K, output JSON; no Kafka, no state store) on 10,000 of the same events, and the top-K
   scoring alone: ``ratio_to_compute_ceiling`` = end-to-end rate / that ceiling.
1. throughput: N events (synthetic sessions over the catalogue) are produced BEFORE the worker starts;
   events_per_s = N / (last - first publication time of their recommendations), i.e. sustained
   processing of a backlog: consume, decode, state reads, GRU + top-K, changelog + recommendation
   produce, delivery wait, RocksDB writes, offset acks.
2. raw consumer: a plain confluent-kafka consumer reads the same N input messages (same run, same
   broker) for ``ratio_to_raw``.
3. latency: new events at a fixed offered rate (``offered_rate``), each stamped with its send time;
   latency = arrival of its recommendation at a consumer in this process - send time (two Kafka hops
   plus the worker's batch wait and processing). It follows ``--warmup-seconds`` of the same load, not
   measured: a fresh broker JVM spends its first minute compiling (its CPU use halves once warm), which
   is not the steady state a deployed broker is in.
4. latency while training (skip with ``--no-training``): a ``gruflow trainer`` runs as a separate process
   (the recommended deployment) with back-to-back fine-tune rounds over a bounded buffer, publishing the
   versions it promotes (the worker swaps them in); once its first round has finished, the same offered
   load is measured again. ``p99_ratio_training`` = p99 with training / p99 without (goal < 1.5).
5. latency peer (skip with ``--no-echo``): with the worker and trainer stopped, ``stream.lab.echo`` (a plain
   confluent-kafka consume -> produce loop that answers each event without computing anything) takes the
   worker's place on topics of its own; the same load generator, reader and offered rate measure it
   after a short warm-up. ``echo_latency_ms`` is the floor of two Kafka hops on this machine in this
   run, and ``latency_p99_ratio_to_echo`` = the worker's p99 / the echo's.

The model is a GRU4Rec of the requested size trained for one quick epoch on synthetic sessions of the
same shop as the events (scoring speed depends on a trained model's spread of scores, see
model/topk.py); ``topk_int8_fraction`` = share of the ceiling run's rows that the int8 path proved.
``*_cpu_steal``: CPUs per second that the hypervisor gave to other guests during that part (/proc/stat
steal time; the 2-vCPU VM of gruflow's first sessions lost up to 0.8 of a CPU so in its host's busy phases).
``cpu_model``: the processor's name, since figures compare only between runs on the same kind of machine;
``cpu_flags``: which of the SIMD features that decide the top-K path it has. ``scorer_path``: the top-K path
that calibration kept for the ceiling run (``scorer_calibration_rows_per_s``: what it measured of each);
``worker_scorer_path``: the one the worker kept (its ``gruflow_scorer_info`` metric).
Prints one JSON object. No assertions: goals are written in the issue note, not enforced here.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from stream.tools.harness import (PROJECT_ROOT, GruflowProcess, label_value, scrape, stop_process, total,
                                  train_quick_model)
from stream.settings import ENV_PREFIX, Settings


WARMUP_PREFIX = "warm-"  # users of the unmeasured warm-up load


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _peak_rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


_TRAIN_SESSIONS = 30_000  # ~200k synthetic events: one quick epoch, ~15-30 s on 2 cores


def _model(path: Path, train: Any, n_items: int, hidden: int) -> None:
    """A GRU4Rec of the requested size trained for one quick epoch on synthetic sessions of the same
    shop as the bench's events: the worker's int8 top-K pre-filter relies on a trained model's spread
    of scores (an untrained model's are nearly flat), so a random model would misstate its speed."""
    from model.vocab import Vocabulary

    n, seconds = train_quick_model(train, path, hidden=hidden, n_epochs=1, vocab=Vocabulary(f"i{r}" for r in range(n_items)),
                                   popularity_floor=1.0, metadata={"version": 1, "source": "gruflow bench"})
    _log(f"model: {n:,} items, hidden {hidden}, one epoch on {len(train):,} synthetic events in {seconds:.0f} s")


def _data(n: int, n_items: int) -> tuple[Any, Any]:
    """(training sessions, the bench's n events): one synthetic shop, split by session start."""
    from model.synthetic import generate

    df = generate(n_sessions=_TRAIN_SESSIONS + max(1, n // 5), n_items=n_items, seed=1)
    train = df[df["SessionId"] < _TRAIN_SESSIONS]
    rest = df[df["SessionId"] >= _TRAIN_SESSIONS]
    return train, rest.iloc[np.argsort(rest["Time"].to_numpy(), kind="stable")].head(n)


def _compute_ceiling(settings: Settings, model_path: Path, df: Any, n: int = 10_000) -> dict[str, Any]:
    """The worker's batch computation alone, on the bench's own messages, in this process with the
    worker's torch threads and batch size, before the worker starts: decode + ``process_batch`` (GRU
    steps, exact top-K over the catalogue, output JSON), and the top-K scoring on its own. No Kafka, no
    state store: the ceiling the end-to-end rate is compared with."""
    import torch

    from model.checkpoint import load_checkpoint
    from stream.pipeline.events import CLICKS, PURCHASES, Limits, Rejected, decode_event
    from stream.pipeline.processor import PopularityBaseline, ProcessorConfig, process_batch
    from stream.tools.replay import iter_messages
    from model.topk_calibration import ScorerCache
    from stream.lab.bench_scale import RECALL_STATES, recall_vs_exact
    from stream.worker.pipeline import retrieval_policy

    threads = torch.get_num_threads()
    torch.set_num_threads(settings.scoring.torch_threads)
    try:
        model = load_checkpoint(model_path).recommender(1)
        sc = settings.scoring
        cache = ScorerCache(sc.scoring_threads, compiled=sc.compiled_topk, k=sc.top_k, path=sc.scorer_path,
                            retrieval=retrieval_policy(sc))
        scorer = cache.get(model)
        calibration = cache.calibration
        limits, cfg, popularity = Limits(), ProcessorConfig(k=sc.top_k), PopularityBaseline()
        purchases = settings.topic("purchases")
        messages = list(iter_messages(settings, df, limit=n))
        size = settings.worker.batch_max_events
        compute_s = scoring_s = 0.0
        events_done = 0
        scored_all: list[np.ndarray] = []
        for start in range(0, len(messages), size):
            part = messages[start:start + size]
            t0 = time.perf_counter()
            events = [decode_event(value, key, PURCHASES if topic == purchases else CLICKS, limits, topic=topic,
                                   partition=0, offset=start + i, append_ts_ms=ts, now_ms=ts)
                      for i, (topic, key, value, ts) in enumerate(part)]
            events = [e for e in events if not isinstance(e, Rejected)]
            scored: list[np.ndarray] = []

            def top_k(hidden: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
                scored.append(hidden)
                scored_all.append(hidden)
                return scorer.top_k(hidden, k)

            result = process_batch(model, events, {}, cfg, popularity, top_k)
            compute_s += time.perf_counter() - t0
            t1 = time.perf_counter()
            for hidden in scored:  # the same states again: the scoring share of the batch
                scorer.top_k(hidden, settings.scoring.top_k)
            scoring_s += time.perf_counter() - t1
            events_done += len(result.outputs)
        hidden = np.vstack(kept)[:RECALL_STATES] if (kept := [h for h in scored_all if len(h)]) else None
        recall = (recall_vs_exact(model, scorer.top_k(hidden, sc.top_k)[0], hidden, sc.top_k)
                  if hidden is not None else None)
    finally:
        torch.set_num_threads(threads)
    return {"compute_ceiling_events_per_s": round(events_done / compute_s, 1) if compute_s else float("nan"),
            "topk_ceiling_events_per_s": round(events_done / scoring_s, 1) if scoring_s else float("nan"),
            "topk_int8_fraction": round(scorer.rows_int8 / scorer.rows_scored, 4) if scorer.rows_scored else None,
            "compiled_topk": getattr(scorer, "native", None) is not None,
            "scorer_path": calibration.path,
            "recall_at_k_vs_exact": recall,
            "scorer_calibration_rows_per_s": dict(calibration.rows_per_s),
            "scorer_calibration_s": round(calibration.seconds, 3)}


def _raw_consume(settings: Settings, n: int) -> float:
    from confluent_kafka import Consumer

    from stream.kafka.config import consumer_config

    c = Consumer(consumer_config(settings, group_id=f"bench-raw-{time.time_ns()}"))
    c.subscribe([settings.topic("clicks"), settings.topic("purchases")])
    got, t0 = 0, None
    deadline = time.monotonic() + 120
    while got < n and time.monotonic() < deadline:
        msgs = c.consume(10000, 0.5)
        if msgs and t0 is None:
            t0 = time.monotonic()
        got += sum(1 for m in msgs if m.error() is None)
    dt = time.monotonic() - (t0 or time.monotonic())
    c.close()
    return got / dt if dt > 0 else 0.0


class _RecReader:
    """Counts recommendations (and keeps receive times of stamped latency events) in a thread."""

    def __init__(self, settings: Settings) -> None:
        from confluent_kafka import OFFSET_BEGINNING, Consumer

        from stream.kafka.config import assign_whole_topic, consumer_config

        self.c = Consumer(consumer_config(settings, group_id=None))
        assign_whole_topic(self.c, settings.topic("recommendations"), OFFSET_BEGINNING)
        self.count = 0
        self.published: list[int] = []
        self.latency_ms: list[float] = []
        self.to_publish_ms: list[float] = []  # send -> the worker's publication stamp (in-worker share)
        self.stamped_prefix = "lat-"
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import orjson

        stamped, warmup = self.stamped_prefix.encode(), WARMUP_PREFIX.encode()
        while not self._stop.is_set():
            # wait for ONE message, then take whatever else is queued without waiting: consume(n, t) returns
            # only once it has n messages or t has passed, so it would add up to t to each latency sample
            first = self.c.poll(0.05)
            if first is None:
                continue
            for m in [first, *self.c.consume(5000, 0)]:
                if m.error() is not None:
                    continue
                now = time.time() * 1000
                self.count += 1
                key, value = m.key() or b"", m.value()
                if key.startswith(stamped):
                    rec = orjson.loads(value)
                    self.latency_ms.append(now - rec["event_ts"])
                    self.to_publish_ms.append(rec["published_ts"] - rec["event_ts"])
                elif not key.startswith(warmup):
                    # the backlog's only field read is the last one: slicing it out costs a tenth of
                    # parsing the whole document (~5 us), CPU the reader would take from the worker
                    try:
                        self.published.append(int(value[value.rindex(b'"published_ts":') + 15:-1]))
                    except ValueError:
                        self.published.append(orjson.loads(value)["published_ts"])

    def wait_count(self, n: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.count < n and time.monotonic() < deadline:
            time.sleep(0.2)
        return self.count >= n

    def close(self) -> None:
        self._stop.set()
        self.thread.join(5)
        self.c.close()


def _offer(settings: Settings, rate: float, seconds: float, n_items: int, seed: int = 3,
           prefix: str = "lat-") -> int:
    """Produce stamped events at ``rate``/s; ts = send time, so event_ts -> arrival is end-to-end latency.
    Users are named ``prefix<n>``: the reader measures "lat-" users and only counts "warm-" ones."""
    import orjson
    from confluent_kafka import Producer

    from stream.kafka.config import load_generator, producer_config

    p = Producer(producer_config(settings, **load_generator(settings)))
    rng = np.random.default_rng(seed)
    topic = settings.topic("clicks")
    n_total = int(rate * seconds)
    t0 = time.monotonic()
    for i in range(n_total):
        target = t0 + i / rate
        delay = target - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        user = f"{prefix}{int(rng.integers(0, 5000))}"
        value = orjson.dumps({"user_id": user, "item_id": f"i{int(rng.integers(0, n_items))}",
                              "event_type": "click", "ts": int(time.time() * 1000)})
        p.produce(topic, value, user.encode())
        p.poll(0)
    p.flush(30)
    return n_total


def _steal_s() -> float | None:
    """CPU time the hypervisor gave to others while this VM wanted it (all CPUs, seconds since boot; Linux
    /proc/stat). On a shared 2-vCPU VM it came to 0.8 of a CPU in some phases: then every latency
    figure measures the host, so each run reports it."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def _cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str | None:
    """The processor's name (Linux): a run's figures compare only with runs on the same kind of machine (the
    computation alone ran at 9-26k events/s on the machine of gruflow's first sessions, 53-74k on a later one)."""
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            name, sep, value = line.partition(":")
            if sep and name.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return None


_CPU_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "neon", "asimddp")


def _cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> dict[str, bool] | None:
    """The SIMD features that decide which top-K path is fastest (Linux; x86 "flags", Arm "Features" of the
    first processor): the int8 paths need VNNI-class instructions to beat float32."""
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            name, sep, value = line.partition(":")
            if sep and name.strip() in ("flags", "Features"):
                present = set(value.split())
                return {flag: flag in present for flag in _CPU_FLAGS}
    except OSError:
        pass
    return None


class _StealMeter:
    """CPUs stolen per second of wall time between ``start`` and ``stop`` (None where not measurable)."""

    def start(self) -> "_StealMeter":
        self.t0, self.s0 = time.monotonic(), _steal_s()
        return self

    def stop(self) -> float | None:
        s1, dt = _steal_s(), time.monotonic() - self.t0
        if self.s0 is None or s1 is None or dt <= 0:
            return None
        return round((s1 - self.s0) / dt, 3)


def _warm_up(settings: Settings, reader: _RecReader, args: argparse.Namespace, seconds: float) -> None:
    """Unmeasured load at the offered rate (its users are counted by the reader, not timed)."""
    before = reader.count
    warm = _offer(settings, args.rate, seconds, args.items, seed=5, prefix=WARMUP_PREFIX)
    reader.wait_count(before + warm, 60)


def _offer_measured(settings: Settings, reader: _RecReader, args: argparse.Namespace,
                    seed: int = 3) -> tuple[tuple[int, int], float | None]:
    """The measured load, offered: where its answers end and start in the reader's counts, and the host's
    steal while it was offered."""
    start_count, start_lat = reader.count, len(reader.latency_ms)
    steal = _StealMeter().start()
    offered = _offer(settings, args.rate, args.latency_seconds, args.items, seed=seed)
    return (start_count + offered, start_lat), steal.stop()


def _measured_latencies(reader: _RecReader, window: tuple[int, int]) -> np.ndarray:
    """Each stamped event's latency (ms) of an offered window, once all its events are answered."""
    until_count, start_lat = window
    reader.wait_count(until_count, 60)
    return np.asarray(reader.latency_ms[start_lat:], dtype=np.float64)


def _latency_window(settings: Settings, reader: _RecReader,
                    args: argparse.Namespace) -> tuple[np.ndarray, float | None]:
    """The measured load: each stamped event's latency (ms), and the host's steal while it was offered."""
    window, stolen = _offer_measured(settings, reader, args)
    return _measured_latencies(reader, window), stolen


def _percentiles(lat: np.ndarray) -> dict[str, float | None]:
    return {q: round(float(np.percentile(lat, p)), 2) if lat.size else None
            for q, p in (("p50", 50), ("p95", 95), ("p99", 99))}


def _scrape(port: int, name: str) -> float | None:
    """The sum of a Prometheus counter/gauge's samples at a /metrics endpoint (None: not reachable)."""
    try:
        return total(scrape(f"http://127.0.0.1:{port}"), name)
    except OSError:
        return None


def _start_trainer(env: dict[str, str], port: int, args: argparse.Namespace, log_path: Path,
                   cwd: Path) -> subprocess.Popen[bytes]:
    tenv = dict(env)
    tenv.update({ENV_PREFIX + "WEB_PORT": str(port), ENV_PREFIX + "WEB_HOST": "127.0.0.1",
                 ENV_PREFIX + "FINETUNE_INTERVAL_S": str(args.train_interval),
                 ENV_PREFIX + "BUFFER_MAX_EVENTS": str(args.train_buffer),
                 ENV_PREFIX + "TRAINER_TORCH_THREADS": "1"})
    trainer = GruflowProcess("trainer", tenv, port, log_path, cwd=cwd).start(wait=False)
    assert trainer.proc is not None
    return trainer.proc


def _training_phase(args: argparse.Namespace, settings: Settings, env: dict[str, str], reader: "_RecReader",
                    work: Path, procs: list[subprocess.Popen[bytes]]) -> dict[str, Any]:
    """Start a trainer process, wait for its first finished round, then measure latency under training."""
    from stream.kafka.broker_setup import free_port

    rounds = ENV_PREFIX.lower() + "finetune_rounds_total"
    port = free_port()
    trainer = _start_trainer(env, port, args, work / "trainer.log", PROJECT_ROOT)
    procs.append(trainer)
    _log(f"trainer pid {trainer.pid} started; waiting for its first fine-tune round ...")
    deadline = time.monotonic() + args.train_wait
    while time.monotonic() < deadline and trainer.poll() is None and (_scrape(port, rounds) or 0) < 1:
        time.sleep(0.5)
    if trainer.poll() is not None or (_scrape(port, rounds) or 0) < 1:
        _log(f"no fine-tune round finished within {args.train_wait:.0f} s (trainer log: {work / 'trainer.log'})")
        return {"finetune_rounds_during_measure": 0, "training_error": "no round finished before the measurement"}
    before_rounds = _scrape(port, rounds) or 0
    _log(f"latency run with training: {args.rate:,.0f} events/s for {args.latency_seconds:.0f} s ...")
    window, stolen = _offer_measured(settings, reader, args, seed=4)
    after_rounds = _scrape(port, rounds) or 0  # rounds finished while the load was offered
    lat = _measured_latencies(reader, window)
    return {"latency_ms_during_training": _percentiles(lat), "latency_events_during_training": int(lat.size),
            "finetune_rounds_during_measure": int(after_rounds - before_rounds),
            "latency_cpu_steal_during_training": stolen,
            "trainer_buffer_max_events": args.train_buffer, "trainer_peak_rss_bytes": _peak_rss(trainer.pid)}


ECHO_WARMUP_S = 5.0  # the broker is warm by then; this covers the echo's own start


def _echo_phase(args: argparse.Namespace, settings: Settings, work: Path) -> dict[str, Any]:
    """The latency of ``stream.lab.echo`` in the worker's place (its own topics), same load and reader."""
    from stream.kafka.topics import ensure_topics

    echo_settings = settings.replace(topic_prefix=settings.topics.topic_prefix.rstrip(".") + "-echo.")
    ensure_topics(echo_settings)
    log_path = work / "echo.log"
    echo = subprocess.Popen([sys.executable, "-m", "stream.lab.echo"], env=echo_settings.subprocess_env(),
                            stdout=open(log_path, "wb"), stderr=subprocess.STDOUT,
                            cwd=PROJECT_ROOT)
    reader: _RecReader | None = None
    try:
        reader = _RecReader(echo_settings)
        deadline = time.monotonic() + 60
        while b"echo ready" not in log_path.read_bytes():
            if echo.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-500:].strip()  # the work dir goes at the end
                raise RuntimeError(f"the echo peer did not start; its log ends: {tail or '(empty)'}")
            time.sleep(0.2)
        _log(f"latency peer (plain consume -> produce, pid {echo.pid}): {args.rate:,.0f} events/s for "
             f"{ECHO_WARMUP_S:.0f} s unmeasured, then {args.latency_seconds:.0f} s ...")
        _warm_up(echo_settings, reader, args, ECHO_WARMUP_S)
        lat, stolen = _latency_window(echo_settings, reader, args)
    finally:
        if reader is not None:
            reader.close()
        stop_process(echo)
    return {"echo_latency_ms": _percentiles(lat), "echo_latency_events": int(lat.size),
            "echo_cpu_steal": stolen}


def bench_settings(base: Settings, name: str, work: Path, args: argparse.Namespace) -> Settings:
    """One bench run's settings on the broker of ``base``: its own topics (created here), consumer group, data
    dir and web port, the run's partitions and k."""
    from stream.kafka.broker_setup import free_port
    from stream.kafka.topics import ensure_topics

    run = time.strftime("%H%M%S")
    settings = base.replace(topic_prefix=f"{name}{run}.", app_id=f"gruflow-{name}-{run}", data_dir=work / "state",
                            web_host="127.0.0.1", web_port=free_port(), partitions=args.partitions,
                            top_k=args.k, broker_session_timeout_s=6.0)
    ensure_topics(settings)
    return settings


def run_bench(args: argparse.Namespace) -> int:
    """One run (``--items N``), or one per catalogue size (``--items 20000,200000``: stream.lab.bench_scale)."""
    from stream.lab.bench_scale import parse_items, run_scale

    sizes = parse_items(args.items)
    if len(sizes) > 1:
        print(json.dumps(run_scale(args, _measure)))
    else:
        print(json.dumps(_measure(argparse.Namespace(**{**vars(args), "items": sizes[0]}))))
    return 0


def _measure(args: argparse.Namespace) -> dict[str, Any]:
    from stream.kafka.broker import EmbeddedKafka
    from stream.tools.replay import replay

    base = Settings.from_env()
    work = Path(tempfile.mkdtemp(prefix="gruflow-bench-"))
    kafka: EmbeddedKafka | None = None
    worker: subprocess.Popen[bytes] | None = None
    procs: list[subprocess.Popen[bytes]] = []
    result: dict[str, Any] = {}
    try:
        if base.embedded:
            kafka = EmbeddedKafka.from_settings(base, quiet=True).start()
            base = kafka.settings(base)
        settings = bench_settings(base, "bench", work, args)
        train, df = _data(args.events, args.items)
        cache = getattr(args, "model_cache", None)
        model_path = (Path(cache) / f"bench-model-{args.items}-{args.hidden}.gfc") if cache else work / "bench-model.gfc"
        if model_path.exists():
            _log(f"model: {model_path} (trained by an earlier run on the same synthetic sessions)")
        else:
            model_path.parent.mkdir(parents=True, exist_ok=True)
            _model(model_path, train, args.items, args.hidden)
        _log(f"producing {len(df):,} events (backlog) ...")
        stats = replay(settings, df, progress=False)
        n = stats.delivered
        ceiling = _compute_ceiling(settings, model_path, df)
        _log(f"compute ceiling (no Kafka, no state): {ceiling['compute_ceiling_events_per_s']:,.0f} events/s; "
             f"top-K alone {ceiling['topk_ceiling_events_per_s']:,.0f} events/s "
             f"({ceiling['scorer_path']} path; int8 proved {ceiling['topk_int8_fraction'] or 0:.1%} of the rows)")

        reader = _RecReader(settings)
        env = settings.subprocess_env(**{ENV_PREFIX + "MODEL_PATH": str(model_path)})
        worker = GruflowProcess("worker", env, settings.process.web_port, work / "worker.log").start(wait=False).proc
        assert worker is not None
        _log(f"worker pid {worker.pid} started; processing the backlog ...")
        steal = _StealMeter().start()
        profiler = None
        if args.profile:
            time.sleep(8)  # let it get through startup and recovery
            profiler = subprocess.Popen([str(Path(sys.executable).with_name("py-spy")), "record", "--pid", str(worker.pid), "--duration", "20",
                                         "--rate", "50", "--output", args.profile, "--nonblocking",
                                         "--format", "flamegraph" if args.profile.endswith(".svg") else "raw"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        if not reader.wait_count(n, 600):
            raise RuntimeError(f"only {reader.count} of {n} recommendations arrived; worker log: {work / 'worker.log'}")
        throughput_steal = steal.stop()
        worker_scorer_path = label_value(scrape(f"http://127.0.0.1:{settings.process.web_port}"), "gruflow_scorer_info",
                                         "path")
        pub = np.asarray(reader.published, dtype=np.float64)
        span_s = (pub.max() - pub.min()) / 1000.0
        events_per_s = n / span_s if span_s > 0 else float("nan")
        _log(f"throughput: {events_per_s:,.0f} events/s over {span_s:.1f} s")
        raw = _raw_consume(settings, n)
        _log(f"raw confluent consumer: {raw:,.0f} msg/s")
        if profiler is not None:
            profiler.wait(60)

        if args.warmup_seconds > 0:
            _log(f"warm-up (not measured): {args.rate:,.0f} events/s for {args.warmup_seconds:.0f} s ...")
            _warm_up(settings, reader, args, args.warmup_seconds)
        _log(f"latency run: {args.rate:,.0f} events/s for {args.latency_seconds:.0f} s ...")
        lat, latency_steal = _latency_window(settings, reader, args)
        serving: dict[str, Any] = {}
        if getattr(args, "publish_check", False):
            from stream.lab.bench_scale import publish_to_serving

            _log("publishing model version 2 (1% of the output rows moved); timing until it is served ...")
            serving = publish_to_serving(settings, model_path, lambda name: _scrape(settings.process.web_port, name))
            _log(f"version 2 served {serving['publish_to_serving_s']} s after its publication began")
        training: dict[str, Any] = {}
        if not getattr(args, "no_training", False):
            training = _training_phase(args, settings, env, reader, work, procs)
            p99_train = (training.get("latency_ms_during_training") or {}).get("p99")
            p99 = float(np.percentile(lat, 99)) if lat.size else None
            training["p99_ratio_training"] = round(p99_train / p99, 3) if p99_train and p99 else None
        reader.close()
        peak_rss = _peak_rss(worker.pid)
        echo: dict[str, Any] = {}
        if not getattr(args, "no_echo", False):
            for proc in procs:  # the peer runs alone, as the worker did before the training run
                stop_process(proc)
            stop_process(worker)
            try:
                echo = _echo_phase(args, settings, work)
            except Exception as exc:  # noqa: BLE001 - the worker's figures stand without their peer
                _log(f"latency peer failed: {exc!r}")
                echo = {"echo_error": repr(exc)}
            else:
                p99, p99_echo = _percentiles(lat)["p99"], echo["echo_latency_ms"]["p99"]
                echo["latency_p99_ratio_to_echo"] = round(p99 / p99_echo, 2) if p99 and p99_echo else None
        result = {
            "events_per_s": round(events_per_s, 1),
            "events": n,
            "throughput_cpu_steal": throughput_steal,
            "latency_ms": _percentiles(lat),
            "latency_ms_send_to_publish": _percentiles(np.asarray(reader.to_publish_ms[:lat.size], dtype=np.float64)),
            "offered_rate": args.rate,
            "warmup_seconds": args.warmup_seconds,
            "latency_events": int(lat.size),
            "raw_consumer_events_per_s": round(raw, 1),
            "ratio_to_raw": round(events_per_s / raw, 4) if raw else None,
            **ceiling,
            "ratio_to_compute_ceiling": round(events_per_s / ceiling["compute_ceiling_events_per_s"], 3),
            "peak_rss_bytes": peak_rss,
            "catalogue_items": args.items,
            "hidden": args.hidden,
            "k": args.k,
            "partitions": args.partitions,
            "batch_max_events": settings.worker.batch_max_events,
            "batch_max_ms": settings.worker.batch_max_ms,
            "torch_threads": settings.scoring.torch_threads,
            "scoring_threads": settings.scoring.scoring_threads,
            "processing_guarantee": settings.worker.processing_guarantee,
            "cpus": os.cpu_count(),
            "cpu_model": _cpu_model(),
            "cpu_flags": _cpu_flags(),
            "worker_scorer_path": worker_scorer_path,
            "load_avg_1m": round(os.getloadavg()[0], 2),
            "latency_cpu_steal": latency_steal,
            **training,
            **echo,
            **serving,
        }
        if args.profile:
            result["profile"] = args.profile
    finally:
        if worker is not None and (work / "worker.log").exists():
            from stream.lab.bench_scale import faiss_simd, index_times

            result.update(index_times((work / "worker.log").read_text(errors="replace")), faiss_simd=faiss_simd())
        for proc in procs:
            stop_process(proc)
        stop_process(worker)
        if getattr(args, "worker_log", None) and (work / "worker.log").exists():
            shutil.copy(work / "worker.log", args.worker_log)
        if kafka is not None:
            kafka.stop()
        shutil.rmtree(work, ignore_errors=True)
    return result
