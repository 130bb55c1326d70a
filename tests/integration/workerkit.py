"""Helpers for the worker integration tests: a tiny model, worker subprocesses, produce/consume, and the
expected per-user state computed offline by the same pure processor (a run without Kafka, kills or
rebalances to compare against)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import orjson

from model.checkpoint import load_checkpoint, save_checkpoint
from model.network import GRU4RecNet
from model.params import GRU4RecParams
from model.vocab import Vocabulary
from state.codec import UserState, decode
from state.store import MemoryStore
from stream.pipeline.events import Event
from stream.pipeline.processor import ProcessorConfig, process_batch
from stream.settings import Settings
from stream.tools import harness

REPO = Path(__file__).resolve().parents[2]
N_ITEMS = 300


def save_tiny_model(path: Path, hidden: int = 16, version: int = 1) -> Path:
    params = GRU4RecParams(layers=(hidden,), seed=11)
    vocab = Vocabulary(f"i{r}" for r in range(N_ITEMS))
    net = GRU4RecNet(N_ITEMS, params)
    popularity = np.linspace(N_ITEMS, 1, N_ITEMS)
    return save_checkpoint(path, net, vocab, params, popularity, {"version": version})


@dataclass
class Ev:
    """One input event as a test produces it."""

    user: str
    item: str
    ts: int
    etype: str = "click"

    @property
    def kind(self) -> str:
        return "purchases" if self.etype == "purchase" else "clicks"

    def value(self) -> bytes:
        return orjson.dumps({"user_id": self.user, "item_id": self.item, "event_type": self.etype, "ts": self.ts})


def make_events(n_users: int, per_user: int, seed: int, t0: int | None = None, *, purchases: bool = False,
                prefix: str = "u") -> list[Ev]:
    """Interleaved sessions of ``n_users`` users; unique ts per user event (the answer's key)."""
    rng = np.random.default_rng(seed)
    t0 = t0 if t0 is not None else int(time.time() * 1000) - 3_600_000
    out: list[Ev] = []
    for j in range(per_user):
        for u in range(n_users):
            etype = ("view", "click", "cart")[int(rng.integers(0, 3))]
            if purchases and j % 4 == 3 and u % 2 == 0:  # even users also buy
                etype = "purchase"
            out.append(Ev(f"{prefix}{u}", f"i{int(rng.integers(0, N_ITEMS))}", t0 + 1000 * j + u, etype))
    return out


def produce(settings: Settings, events: Iterable[Ev], raw: Iterable[tuple[str, bytes | None, bytes | None]] = ()
            ) -> int:
    from confluent_kafka import Producer

    from stream.kafka.config import producer_config

    p = Producer(producer_config(settings))
    n = 0
    for e in events:
        p.produce(settings.topic(e.kind), e.value(), e.user.encode())
        n += 1
    for kind, key, value in raw:
        p.produce(settings.topic(kind), value, key)
        n += 1
    left = p.flush(30)
    assert left == 0, f"{left} test events not delivered"
    return n


@dataclass
class Collected:
    messages: list[Any] = field(default_factory=list)

    def recommendations(self) -> list[dict]:
        return [orjson.loads(m.value()) for m in self.messages]

    def answered(self) -> dict[tuple[str, int], int]:
        counts: dict[tuple[str, int], int] = defaultdict(int)
        for r in self.recommendations():
            counts[(r["user_id"], r["event_ts"])] += 1
        return counts


class TopicReader:
    """Reads one topic from the beginning, keeping everything seen so far."""

    def __init__(self, settings: Settings, topic: str, read_committed: bool = False) -> None:
        from confluent_kafka import OFFSET_BEGINNING, Consumer

        from stream.kafka.config import assign_whole_topic, consumer_config

        extra = {"isolation.level": "read_committed" if read_committed else "read_uncommitted"}
        self.consumer = Consumer(consumer_config(settings, group_id=None, **extra))
        assign_whole_topic(self.consumer, topic, OFFSET_BEGINNING)
        self.seen = Collected()

    def poll_until(self, done: Any, timeout: float, what: str) -> Collected:
        deadline = time.monotonic() + timeout
        while not done(self.seen):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; "
                                     f"{len(self.seen.messages)} messages so far")
            for m in self.consumer.consume(1000, 0.5):
                if m.error() is None:
                    self.seen.messages.append(m)
        return self.seen

    def drain(self, quiet_s: float = 2.0) -> Collected:
        """Keep reading until nothing arrived for ``quiet_s``."""
        last = time.monotonic()
        while time.monotonic() - last < quiet_s:
            batch = self.consumer.consume(1000, 0.3)
            for m in batch:
                if m.error() is None:
                    self.seen.messages.append(m)
                    last = time.monotonic()
        return self.seen

    def close(self) -> None:
        self.consumer.close()


def read_states(settings: Settings, read_committed: bool = True) -> dict[str, UserState]:
    """Final per-user state as the changelog holds it (last record per key; tombstones delete)."""
    from confluent_kafka import Consumer, TopicPartition

    from stream.kafka.config import consumer_config
    from stream.kafka.topics import changelog_topic

    topic = changelog_topic(settings)
    c = Consumer(consumer_config(settings, group_id=None,
                                 **{"isolation.level": "read_committed" if read_committed else "read_uncommitted"}))
    try:
        parts = [TopicPartition(topic, p, 0) for p in range(settings.topics.partitions)]
        ends = {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in range(settings.topics.partitions)}
        c.assign(parts)
        states: dict[str, UserState] = {}
        pos = {p: 0 for p in ends}
        deadline = time.monotonic() + 60
        while any(pos[p] < ends[p] for p in ends) and time.monotonic() < deadline:
            for m in c.consume(1000, 0.5):
                if m.error() is not None:
                    continue
                pos[m.partition()] = m.offset() + 1
                key = m.key().decode()
                if m.value() is None:
                    states.pop(key, None)
                else:
                    states[key] = decode(m.value())
            for p in ends:  # transaction markers occupy the last offsets of a partition
                if pos[p] < ends[p]:
                    low = c.position([TopicPartition(topic, p)])[0].offset
                    if low >= ends[p]:
                        pos[p] = ends[p]
        return states
    finally:
        c.close()


def offline_run(model_path: Path, events: list[Ev], settings: Settings
                ) -> tuple[dict[str, UserState], dict[tuple[str, int], list]]:
    """An uninterrupted run without Kafka: the pure processor, one event at a time per user (batching
    does not change results). Returns the final states and every event's answer, keyed (user, ts); an
    answer is its ``[(item_id, score)]``."""
    from model.events import EventType

    model = load_checkpoint(model_path).recommender(1)
    cfg = ProcessorConfig(k=settings.scoring.top_k, session_gap_ms=int(settings.worker.session_gap_s * 1000))
    store = MemoryStore()
    answers: dict[tuple[str, int], list] = {}
    batch = [Event(e.user, e.item, int(EventType.parse(e.etype)), e.ts, e.user.encode(), e.kind, 0, -1, e.ts,
                   1 if e.kind == "purchases" else 0) for e in events]
    for i in range(0, len(batch), 64):
        part = batch[i:i + 64]
        keys = list(dict.fromkeys(e.key for e in part))
        result = process_batch(model, part, store.get_many(keys), cfg)
        store.put_many(result.states)
        for e, (_key, value) in zip(part, result.outputs):
            answers[(e.user_id, e.ts_ms)] = answer_items(orjson.loads(value))
    return {k.decode(): v for k, v in store.get_many(list(store)).items()}, answers


def expected_states(model_path: Path, events: list[Ev], settings: Settings) -> dict[str, UserState]:
    """The states a single uninterrupted worker must end with (``offline_run``)."""
    return offline_run(model_path, events, settings)[0]


def expected_answers(model_path: Path, events: list[Ev], settings: Settings) -> dict[tuple[str, int], list]:
    """Every event's answer in an uninterrupted run (``offline_run``)."""
    return offline_run(model_path, events, settings)[1]


def answer_items(recommendation: dict) -> list[tuple[str, float]]:
    return [(str(i["item_id"]), float(i["score"])) for i in recommendation["items"]]


def same_answer(got: list[tuple[str, float]], want: list[tuple[str, float]], tol: float = 1e-4) -> bool:
    """The same top-K up to rounding: the scores agree position by position, and items may differ only
    where scores tie within ``tol`` (their order among near-equal scores, or which tied item made the
    cut at the K-th place)."""
    if len(got) != len(want):
        return False
    if any(abs(g[1] - w[1]) > tol for g, w in zip(got, want)):
        return False
    g_scores, w_scores = dict(got), dict(want)
    cut = want[-1][1] if want else 0.0
    for item in set(g_scores) ^ set(w_scores):
        score = g_scores.get(item, w_scores.get(item))
        if abs(score - cut) > tol:  # only a tie at the cut may swap an item in or out
            return False
    return all(abs(g_scores[i] - w_scores[i]) <= tol for i in set(g_scores) & set(w_scores))


def committed_offsets(settings: Settings, topics: Iterable[str]) -> dict[tuple[str, int], tuple[int, int]]:
    """(topic, partition) -> (offset the worker group committed, -1001 if none; end offset). Reads the group's
    offsets without joining it (no subscribe, no commits of its own)."""
    from confluent_kafka import Consumer, TopicPartition

    from stream.kafka.config import consumer_config

    c = Consumer(consumer_config(settings, group_id=settings.process.app_id, **{"enable.auto.commit": False}))
    try:
        tps = [TopicPartition(t, p) for t in topics for p in range(settings.topics.partitions)]
        return {(tp.topic, tp.partition): (tp.offset, c.get_watermark_offsets(tp, timeout=10)[1])
                for tp in c.committed(tps, timeout=15)}
    finally:
        c.close()


def assert_same_states(got: dict[str, UserState], want: dict[str, UserState],
                       hidden_for: set[str] | None = None) -> None:
    """Same users, session counts and times; same hidden state for ``hidden_for`` (default all). Users
    with events on both topics are applied in arrival order across the two topics, which no offline
    run can predict, so their hidden state is left out."""
    assert set(got) == set(want), f"users differ: missing {sorted(set(want) - set(got))[:5]}, " \
                                  f"extra {sorted(set(got) - set(want))[:5]}"
    for user, w in want.items():
        g = got[user]
        assert (g.session_events, g.last_ts_ms) == (w.session_events, w.last_ts_ms), user
        assert (g.hidden is None) == (w.hidden is None), user
        if w.hidden is not None and (hidden_for is None or user in hidden_for):
            np.testing.assert_allclose(g.hidden, w.hidden, rtol=1e-4, atol=1e-5, err_msg=user)


class WorkerProc:
    """``python -m stream.cli worker`` (or another long-running ``command``, such as ``trainer``, that serves
    /readyz and /metrics on ``settings.process.web_port``) as a subprocess, configured through GRUFLOW_* variables."""

    def __init__(self, kafka: Any, settings: Settings, model_path: Path, log_dir: Path, name: str = "worker",
                 command: str = "worker", **env: str) -> None:
        self.settings = settings
        self.command = command
        self.log_path = log_dir / f"{name}-{int(time.time() * 1000)}.log"
        self.env = kafka.env(settings, GRUFLOW_MODEL_PATH=str(model_path), GRUFLOW_TORCH_THREADS="1",
                             GRUFLOW_BROKER_SESSION_TIMEOUT_S="6", GRUFLOW_LOG_LEVEL="INFO", **env)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.settings.process.web_port}"

    def start(self, wait_ready: bool = True, timeout: float = 120.0) -> "WorkerProc":
        self.process = harness.GruflowProcess(self.command, self.env, self.settings.process.web_port, self.log_path,
                                              cwd=REPO).start(wait=False)
        self.proc = self.process.proc
        if wait_ready:
            self.wait_ready(timeout)
        return self

    def get(self, path: str) -> tuple[int, str]:
        return harness.http_get(self.url + path)

    def request(self, path: str, body: bytes | None = None, timeout: float = 10.0) -> tuple[int, dict]:
        """GET ``path`` (POST with a JSON ``body``): the status and the decoded JSON answer, errors included."""
        import urllib.error
        import urllib.request

        req = urllib.request.Request(self.url + path, data=body, method="POST" if body is not None else "GET",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, orjson.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, orjson.loads(exc.read())

    def wait_ready(self, timeout: float = 120.0) -> None:
        try:
            self.process.wait_ready(timeout)
        except harness.NotReady as exc:
            raise AssertionError(str(exc)) from None

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels``."""
        return harness.total(harness.scrape(self.url), name, **labels)

    def wait_metric(self, name: str, ok: Any, timeout: float = 15.0, **labels: str) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ok(self.metric(name, **labels)):
                return True
            time.sleep(0.5)
        return False

    def log_tail(self, n: int = 60) -> str:
        return harness.log_tail(self.log_path, n)

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM and wait (SIGKILL after ``timeout``)."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"worker did not stop within {timeout:.0f} s of SIGTERM:\n{self.log_tail()}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def __enter__(self) -> "WorkerProc":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        finally:
            self.kill()
