"""``gruflow lab faults``: inject failures under a steady load and count what happened to every event.

For each scenario: a fresh set of topics on the embedded broker (run on a data directory, so that it can
be killed and restarted), two worker processes (the scenario's supervisor restarts a worker that exits
on its own, as an orchestrator would), a load generator at ``--rate`` events/s for ``--seconds``, the
fault at the middle of the load, then a drain until every event is answered or answers stop coming.

Every event has its own event time (``t0 + sequence number`` ms), so ``(user_id, event_ts)`` of an
answer names the event it answers. Counted per scenario:

- ``sent``: events the broker acknowledged to the load generator (``send_failed``: those it did not);
- ``answered``: sent events with at least one recommendation;
- ``duplicated``: recommendations beyond the first one of an event (at-least-once redelivery);
- ``missing``: sent events never answered by the end of the drain.

Scenarios: ``worker-kill`` (SIGKILL of one of the two workers; the survivor takes its partitions over;
the killed one stays down), ``broker-pause`` (SIGSTOP of the broker JVM for ``--pause`` s, then
SIGCONT), ``broker-kill`` (kill -9 of the broker JVM, restarted at once on the same data directory and
ports). Prints progress on stderr and one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stream.tools.processes import PROJECT_ROOT, stop_process
from stream.settings import ENV_PREFIX, Settings

SCENARIOS = ("worker-kill", "broker-pause", "broker-kill")
N_ITEMS = 1000
N_USERS = 2000
_QUIET = {"log_level": 2}  # librdkafka logs every refused connect while the broker is away: not news here


def _log(msg: str) -> None:
    print(f"[faults] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- counting


def tally(sent: set[int], answers: Counter[int], failed: int = 0) -> dict[str, int]:
    """The scenario's figures from the acknowledged sequence numbers and the answers per sequence number."""
    answered = sum(1 for seq in sent if answers.get(seq, 0) > 0)
    return {
        "sent": len(sent),
        "send_failed": failed,
        "answered": answered,
        "duplicated": sum(n - 1 for seq, n in answers.items() if n > 1),
        "missing": len(sent) - answered,
        "answered_unacknowledged": sum(1 for seq in answers if seq not in sent),
    }


class _Answers:
    """Reads the recommendations topic from its start in a thread, counting answers per event."""

    def __init__(self, settings: Settings, t0_ms: int, read_committed: bool) -> None:
        from confluent_kafka import OFFSET_BEGINNING, Consumer

        from stream.kafka.config import assign_whole_topic, consumer_config

        level = "read_committed" if read_committed else "read_uncommitted"
        self.c = Consumer(consumer_config(settings, group_id=None, **{"isolation.level": level, **_QUIET}))
        assign_whole_topic(self.c, settings.topic("recommendations"), OFFSET_BEGINNING)
        self.t0_ms = t0_ms
        self.counts: Counter[int] = Counter()
        self.last_at = time.monotonic()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="faults-answers", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import orjson

        while not self._stop.is_set():
            for m in self.c.consume(2000, 0.2):
                if m.error() is None:
                    self.counts[orjson.loads(m.value())["event_ts"] - self.t0_ms] += 1
                    self.last_at = time.monotonic()

    def close(self) -> None:
        """Stop reading (idempotent); ``counts`` stays as it is from then on."""
        if self._stop.is_set():
            return
        self._stop.set()
        self.thread.join(10)
        self.c.close()


@dataclass
class _Load:
    """Produces one event per sequence number at a steady rate; keeps what the broker acknowledged."""

    settings: Settings
    rate: float
    seconds: float
    t0_ms: int
    acked: set[int] = field(default_factory=set)
    failed: int = 0
    produced: int = 0

    def run(self) -> None:
        import orjson
        from confluent_kafka import Producer

        from stream.kafka.config import producer_config

        # idempotent: a retried request after a broker failure must not enter an event twice (that would
        # count as a duplicated answer that the worker did not cause)
        p = Producer(producer_config(self.settings, **{"linger.ms": 5, "message.timeout.ms": 120_000, **_QUIET}))
        topic = self.settings.topic("clicks")

        n = int(self.rate * self.seconds)
        start = time.monotonic()
        for seq in range(n):
            delay = start + seq / self.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            user = f"u{seq % N_USERS}"
            value = orjson.dumps({"user_id": user, "item_id": f"i{(seq * 7919) % N_ITEMS}", "event_type": "click",
                                  "ts": self.t0_ms + seq})
            while True:
                try:
                    p.produce(topic, value, user.encode(),
                              on_delivery=lambda err, _msg, seq=seq: self._delivered(err, seq))
                    break
                except BufferError:  # the local queue is full while the broker is away: wait for room
                    p.poll(0.1)
            self.produced += 1
            p.poll(0)
        self.failed += p.flush(180)

    def _delivered(self, err: Any, seq: int) -> None:
        if err is None:
            self.acked.add(seq)
        else:
            self.failed += 1


# --------------------------------------------------------------------------- processes


def _tiny_model(path: Path) -> Path:
    """An untrained GRU4Rec over the load's catalogue: the faults do not depend on what it recommends."""
    import numpy as np

    from model.checkpoint import save_checkpoint
    from model.network import GRU4RecNet
    from model.params import GRU4RecParams
    from model.vocab import Vocabulary

    params = GRU4RecParams(layers=(32,), seed=5)
    return save_checkpoint(path, GRU4RecNet(N_ITEMS, params), Vocabulary(f"i{i}" for i in range(N_ITEMS)), params,
                           np.linspace(N_ITEMS, 1, N_ITEMS), {"source": "gruflow lab faults"})


@dataclass
class _Worker:
    name: str
    env: dict[str, str]
    port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    keep_down: bool = False

    def start(self) -> None:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "stream.cli", "worker"], env=self.env, stdout=log,
                                     stderr=subprocess.STDOUT, cwd=PROJECT_ROOT)
        log.close()
        self.starts += 1

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def supervise(self) -> str | None:
        """Restart the worker if it exited on its own; returns its exit code's description then."""
        if self.keep_down or self.proc is None or self.proc.poll() is None:
            return None
        code = self.proc.returncode
        self.start()
        return f"{self.name} exited with {code}; restarted"


def _wait_ready(workers: list[_Worker], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for w in workers:
            note = w.supervise()
            if note:
                _log(note)
        if all(w.ready() for w in workers):
            return
        time.sleep(0.5)
    raise RuntimeError(f"workers not ready within {timeout:.0f} s; logs: {[str(w.log_path) for w in workers]}")


# --------------------------------------------------------------------------- scenarios


@dataclass
class _Broker:
    """The embedded broker on a data directory, with the faults a scenario injects into its JVM."""

    base: Settings
    data_dir: Path
    kafka: Any = None

    def start(self) -> None:
        from stream.kafka.broker import EmbeddedKafka

        self.kafka = EmbeddedKafka.from_settings(self.base, data_dir=self.data_dir, quiet=True).start()

    def signal(self, sig: int) -> None:
        os.killpg(self.kafka.pid, sig)

    def kill_and_restart(self) -> float:
        """kill -9 the JVM, start a new one on the same data dir; returns the seconds the broker was away."""
        down = time.monotonic()
        self.signal(signal.SIGKILL)
        self.kafka.proc.wait(30)
        self.kafka.stop()  # forgets the dead JVM; a data dir is kept
        self.start()
        return time.monotonic() - down

    def stop(self) -> None:
        if self.kafka is not None:
            self.kafka.stop()


def _inject(scenario: str, broker: _Broker, workers: list[_Worker], pause_s: float) -> dict[str, Any]:
    if scenario == "worker-kill":
        victim = workers[-1]
        victim.keep_down = True
        assert victim.proc is not None
        os.kill(victim.proc.pid, signal.SIGKILL)
        victim.proc.wait(30)
        return {"killed_worker": victim.name}
    if scenario == "broker-pause":
        broker.signal(signal.SIGSTOP)
        try:
            time.sleep(pause_s)
        finally:
            broker.signal(signal.SIGCONT)
        return {"paused_s": pause_s}
    if scenario == "broker-kill":
        return {"broker_away_s": round(broker.kill_and_restart(), 1)}
    raise ValueError(f"unknown scenario {scenario!r}; choose from {', '.join(SCENARIOS)}")


def run_scenario(scenario: str, args: argparse.Namespace, broker: _Broker, work: Path, model_path: Path
                 ) -> dict[str, Any]:
    from stream.kafka.broker import free_port
    from stream.kafka.topics import ensure_topics

    run = f"{scenario.replace('-', '')}{time.strftime('%H%M%S')}"
    settings = broker.kafka.settings(broker.base).replace(
        topic_prefix=f"faults.{run}.", app_id=f"gruflow-faults-{run}", partitions=args.partitions,
        processing_guarantee=args.guarantee, web_host="127.0.0.1")
    ensure_topics(settings)
    workers = []
    for i in (1, 2):
        port = free_port()
        env = settings.replace(web_port=port, data_dir=work / run / f"w{i}").subprocess_env(**{
            ENV_PREFIX + "MODEL_PATH": str(model_path), ENV_PREFIX + "BROKER_SESSION_TIMEOUT_S": "6",
            ENV_PREFIX + "SCORING_THREADS": "1"})
        workers.append(_Worker(f"worker{i}", env, port, work / f"{run}-w{i}.log"))
    t0_ms = int(time.time() * 1000) - 600_000
    answers = _Answers(settings, t0_ms, read_committed=args.guarantee == "exactly_once")
    notes: list[str] = []
    try:
        for w in workers:
            w.start()
        _wait_ready(workers, 180)
        _log(f"{scenario}: 2 workers ready; {args.rate:,.0f} events/s for {args.seconds:.0f} s, the fault at "
             f"{args.seconds / 2:.0f} s")
        load = _Load(settings, args.rate, args.seconds, t0_ms)
        loader = threading.Thread(target=load.run, name="faults-load", daemon=True)
        started = time.monotonic()
        loader.start()
        fault: dict[str, Any] = {}
        injected = False
        next_progress = 10.0
        restarted_at = 0.0

        def supervise(phase: str) -> None:
            nonlocal restarted_at
            for w in workers:
                note = w.supervise()
                if note:
                    restarted_at = time.monotonic()
                    notes.append(f"{phase} {restarted_at - started:.0f} s: {note}")
                    _log(f"{scenario}: {note}")

        while loader.is_alive():
            loader.join(1.0)
            elapsed = time.monotonic() - started
            if not injected and elapsed >= args.seconds / 2:
                _log(f"{scenario}: injecting the fault at {elapsed:.0f} s")
                fault = _inject(scenario, broker, workers, args.pause)
                injected = True
                _log(f"{scenario}: fault over at {time.monotonic() - started:.0f} s: {fault}")
            supervise("load")
            if elapsed >= next_progress:
                next_progress += 10.0
                _log(f"{scenario}: {elapsed:.0f} s, sent {len(load.acked):,}, answered {len(answers.counts):,}")
        _log(f"{scenario}: load done ({len(load.acked):,} acknowledged, {load.failed} failed); draining ...")
        deadline = time.monotonic() + args.drain
        while time.monotonic() < deadline:
            quiet = time.monotonic() - max(answers.last_at, restarted_at)  # a restarted worker gets its time
            if quiet > args.quiet and all(answers.counts.get(seq, 0) for seq in load.acked):
                break
            if quiet > args.drain_quiet:
                break  # answers stopped: what is missing now stays missing
            supervise("drain")
            time.sleep(1.0)
        _log(f"{scenario}: drained at {time.monotonic() - started:.0f} s")
        answers.close()  # the counts are final: the reader thread no longer changes them
        result = {"scenario": scenario, **tally(load.acked, answers.counts, load.failed), **fault,
                  "worker_restarts": notes,
                  "seconds_to_drain": round(time.monotonic() - started - args.seconds, 1)}
        _log(f"{scenario}: {json.dumps(result)}")
        return result
    finally:
        answers.close()
        for w in workers:
            stop_process(w.proc)


def run_faults(args: argparse.Namespace) -> int:
    base = Settings.from_env()
    if not base.embedded:
        _log("gruflow lab faults kills and pauses the embedded broker: unset GRUFLOW_BOOTSTRAP_SERVERS")
        return 2
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in scenarios if s not in SCENARIOS]
    if unknown:
        _log(f"unknown scenario(s) {unknown}; choose from {', '.join(SCENARIOS)}")
        return 2
    work = Path(tempfile.mkdtemp(prefix="gruflow-faults-"))
    broker = _Broker(base, Path(args.broker_data_dir) if args.broker_data_dir else work / "kafka")
    results: list[dict[str, Any]] = []
    started = time.monotonic()
    try:
        model_path = _tiny_model(work / "faults-model.gfc")
        broker.start()
        _log(f"broker on {broker.kafka.bootstrap_servers}, data in {broker.data_dir}")
        for scenario in scenarios:
            results.append(run_scenario(scenario, args, broker, work, model_path))
    finally:
        broker.stop()
        if args.keep:
            _log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({
        "rate": args.rate, "seconds": args.seconds, "partitions": args.partitions, "workers": 2,
        "processing_guarantee": args.guarantee, "cpus": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2), "wall_s": round(time.monotonic() - started, 1),
        "scenarios": results,
    }))
    return 0


def add_faults_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated (default: {','.join(SCENARIOS)})")
    p.add_argument("--rate", type=float, default=500.0, help="offered events per second (default 500)")
    p.add_argument("--seconds", type=float, default=60.0, help="load per scenario; the fault at its middle (default 60)")
    p.add_argument("--pause", type=float, default=20.0, help="seconds the broker stays stopped in broker-pause (default 20)")
    p.add_argument("--drain", type=float, default=180.0, help="longest wait for answers after the load (default 180 s)")
    p.add_argument("--quiet", type=float, default=5.0,
                   help="every event answered: wait this long without new answers for duplicates (default 5 s)")
    p.add_argument("--drain-quiet", type=float, default=45.0,
                   help="stop draining after this long without any new answer or worker restart (default 45 s)")
    p.add_argument("--partitions", type=int, default=4, help="partitions of the scenario's topics (default 4)")
    p.add_argument("--guarantee", choices=("at_least_once", "exactly_once"), default="at_least_once",
                   help="the workers' processing guarantee (default at_least_once)")
    p.add_argument("--broker-data-dir", default=None, help="the broker's data dir (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (worker logs) at the end")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout (the default output)")
