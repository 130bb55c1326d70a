"""Fakes around a real ``stream.worker.pipeline.Pipeline``, so its batch handling runs without a broker.

Only the Kafka-facing parts are fakes: the faust app and its consumer (generation, acks, commit lock), the
faust Table adapter (``MemoryTableStore``: the part of ``TableStore`` the pipeline uses, over encoded state
records in dicts) and the output sink (``FakeSink``: tickets the test delivers, and the transactional
``send``). The model, the metrics, the decoding and the batch computation are the real ones.

Every fake appends what it does to one shared ``journal`` list, so a test can check the ORDER of effects
(delivery before the RocksDB write, the write before the ack, batches in order).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import orjson
from faust.types import TP

from model.network import GRU4RecNet
from model.params import GRU4RecParams
from model.recommender import Recommender
from model.vocab import Vocabulary
from state.codec import UserState, decode
from state.store import MemoryStore
from stream.kafka.topics import TopicNames
from stream.observe.metrics import Metrics
from stream.pipeline.events import Event, Limits, Rejected, decode_event
from stream.pipeline.processor import PopularityBaseline, ProcessorConfig, process_batch
from stream.settings import Settings
from stream.worker.batch_consumer import Batch
from stream.worker.model_holder import ModelHolder
from stream.worker.pipeline import Pipeline
from stream.worker.sinks import BatchTicket, Delivered, Outgoing

N_ITEMS = 40
Journal = list  # of tuples: ("submit"|"send"|"deliver", n) / ("write", partition) / ("ack", tp, offsets) / ...


def tiny_model(version: int = 3) -> Recommender:
    """An untrained GRU4Rec with a fixed seed: its answers are deterministic, which is all a test needs."""
    net = GRU4RecNet(N_ITEMS, GRU4RecParams(layers=(8,), seed=5))
    popularity = np.linspace(N_ITEMS, 1, N_ITEMS)
    return Recommender(net, Vocabulary(f"i{r}" for r in range(N_ITEMS)), version=version, popularity=popularity)


@dataclass
class Rec:
    """The fields of an aiokafka ConsumerRecord that the pipeline reads."""

    key: bytes | None
    value: bytes | None
    offset: int
    timestamp: int
    headers: tuple = ()


def event_value(user: str, item: str, ts: int, etype: str = "click") -> bytes:
    return orjson.dumps({"user_id": user, "item_id": item, "event_type": etype, "ts": ts})


class Offsets:
    """Next offset per input partition, so records of successive batches follow each other."""

    def __init__(self) -> None:
        self.next: dict[TP, int] = defaultdict(int)

    def records(self, tp: TP, pairs: Sequence[tuple[bytes | None, bytes | None]], ts: int) -> tuple[TP, list[Rec]]:
        out = []
        for key, value in pairs:
            out.append(Rec(key, value, self.next[tp], ts))
            self.next[tp] += 1
        return tp, out


# --------------------------------------------------------------------------- the faust side


@dataclass
class FakeConsumer:
    journal: Journal
    flow_active: bool = True
    commit_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    acks: list[tuple[TP, list[int]]] = field(default_factory=list)

    def ack_offsets(self, tp: TP, offsets: list[int]) -> None:
        self.acks.append((tp, list(offsets)))
        self.journal.append(("ack", tp, tuple(offsets)))


@dataclass
class FakeAssignor:
    actives: set[TP] = field(default_factory=set)

    def assigned_actives(self) -> set[TP]:
        return self.actives


@dataclass
class FakeApp:
    consumer: FakeConsumer
    assignor: FakeAssignor
    consumer_generation_id: int = 1
    should_stop: bool = False


class MemoryTableStore:
    """What ``Pipeline`` uses of ``TableStore``, over encoded state records held per partition."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.data: dict[int, dict[bytes, bytes]] = defaultdict(dict)
        self.changelog_marks: list[tuple[dict[int, int], bool]] = []

    def get_partition(self, partition: int, keys: Sequence[bytes]) -> dict[bytes, UserState]:
        part = self.data[partition]
        return {k: decode(part[k]) for k in keys if k in part}

    def write_partition(self, partition: int, records: Sequence[tuple[bytes, bytes | None]],
                        created: Any = None) -> None:
        part = self.data[partition]
        for key, raw in records:
            if raw is None:
                part.pop(key, None)
            else:
                part[key] = raw
        self.journal.append(("write", partition, tuple(k for k, _ in records)))

    def mark_changelog_offsets(self, offsets: Mapping[int, int], *, on_commit: bool = False) -> None:
        self.changelog_marks.append((dict(offsets), on_commit))

    def iter_partition(self, partition: int) -> Iterator[tuple[bytes, bytes]]:
        yield from list(self.data[partition].items())

    def count_partitions(self, partitions: Sequence[int]) -> None:
        pass  # the counts are the dicts' sizes

    def users(self, partitions: Sequence[int]) -> int:
        return sum(len(self.data[p]) for p in partitions)

    def states(self) -> dict[bytes, UserState]:
        return {k: decode(raw) for part in self.data.values() for k, raw in part.items()}


# --------------------------------------------------------------------------- the output side


@dataclass
class Meta:
    offset: int  # of a record in its topic-partition, as the broker would assign it


class FakeSink:
    """Batches go nowhere but into ``submitted``/``sent``. ``auto``: each ticket is delivered at once;
    otherwise the test calls ``deliver(i)`` (in any order) to acknowledge batch ``i``."""

    def __init__(self, journal: Journal, auto: bool = True) -> None:
        self.journal = journal
        self.auto = auto
        self.submitted: list[Outgoing] = []
        self.tickets: list[BatchTicket] = []
        self.sent: list[Outgoing] = []
        self._changelog_end: dict[int, int] = defaultdict(int)  # partition -> next changelog offset

    def _changelog_offsets(self, out: Outgoing) -> dict[int, list[int]]:
        offsets: dict[int, list[int]] = {}
        for p, recs in out.changelog.items():
            start = self._changelog_end[p]
            offsets[p] = list(range(start, start + len(recs)))
            self._changelog_end[p] = start + len(recs)
        return offsets

    def submit(self, out: Outgoing) -> BatchTicket:
        self.submitted.append(out)
        self.journal.append(("submit", len(self.submitted) - 1))
        ticket = BatchTicket(asyncio.get_running_loop().create_future())
        self.tickets.append(ticket)
        if self.auto:
            self.deliver(len(self.tickets) - 1)
        return ticket

    def deliver(self, i: int) -> None:
        offsets = self._changelog_offsets(self.submitted[i])
        self.journal.append(("deliver", i))
        self.tickets[i].future.set_result(Delivered({p: offs[-1] for p, offs in offsets.items() if offs}, time.time()))

    def fail(self, i: int, exc: BaseException) -> None:
        """Batch ``i`` is not delivered (the broker refused it, the connection broke)."""
        self.journal.append(("fail", i))
        self.tickets[i].future.set_exception(exc)

    async def send(self, out: Outgoing) -> tuple[list[tuple[int, Any]], list[Any]]:
        """The transactional sink's contract: (changelog futures by partition, every record's future)."""
        self.sent.append(out)
        self.journal.append(("send", len(self.sent) - 1))
        loop = asyncio.get_running_loop()
        changelog_futs, futs = [], []
        for p, offs in self._changelog_offsets(out).items():
            for off in offs:
                fut = loop.create_future()
                fut.set_result(Meta(off))
                changelog_futs.append((p, fut))
                futs.append(fut)
        for recs in (*out.recommendations.values(), *out.dlq.values()):
            for _ in recs:
                fut = loop.create_future()
                fut.set_result(Meta(-1))
                futs.append(fut)
        return changelog_futs, futs

    async def stop(self) -> None:
        pass


# --------------------------------------------------------------------------- assembly


@dataclass
class Rig:
    """A real Pipeline and the fakes around it."""

    pipeline: Pipeline
    app: FakeApp
    store: MemoryTableStore
    sink: FakeSink
    metrics: Metrics
    names: TopicNames
    journal: Journal

    def tp(self, kind: str, partition: int = 0) -> TP:
        return TP(getattr(self.names, kind), partition)

    def sample(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    def close(self) -> None:
        self.pipeline.executor.shutdown(wait=True)


def make_rig(*, exactly_once: bool = False, auto_deliver: bool = True, **settings: Any) -> Rig:
    # a long session timeout: a test process slowed by a loaded machine is no "freeze" (stream/worker/freeze_guard.py)
    s = Settings.of(**{"top_k": 5, "broker_session_timeout_s": 600.0, **settings})
    names = TopicNames.from_settings(s)
    journal: Journal = []
    app = FakeApp(FakeConsumer(journal), FakeAssignor({TP(names.changelog, p) for p in range(s.topics.partitions)}))
    store = MemoryTableStore(journal)
    sink = FakeSink(journal, auto=auto_deliver)
    metrics = Metrics.create(role="worker")
    pipeline = Pipeline(app, s, names, store, ModelHolder(tiny_model()), metrics, sink, exactly_once,  # type: ignore[arg-type]
                        s.worker.max_message_bytes)
    return Rig(pipeline, app, store, sink, metrics, names, journal)


# --------------------------------------------------------------------------- the offline reference


def decoded(rig: Rig, batch: Batch) -> list[Event]:
    """The batch's valid events, decoded as the worker decodes them (the order of the batch)."""
    s = rig.pipeline.settings
    limits = Limits(s.worker.max_message_bytes, s.worker.max_id_bytes)
    kinds = rig.names.kinds()
    now_ms = int(time.time() * 1000)
    out = []
    for tp, records in batch:
        if tp.topic not in kinds:
            continue
        for r in records:
            res = decode_event(r.value, r.key, kinds[tp.topic], limits, topic=tp.topic, partition=tp.partition,
                               offset=r.offset, append_ts_ms=r.timestamp, now_ms=now_ms)
            if not isinstance(res, Rejected):
                out.append(res)
    return out


@dataclass
class Offline:
    """The same events stepped through ``process_batch`` directly: what the worker's states and answers
    must be. One ``step`` per micro-batch, so the batch boundaries (and so the session waves) match."""

    model: Recommender
    cfg: ProcessorConfig
    store: MemoryStore = field(default_factory=MemoryStore)
    popularity: PopularityBaseline = field(default_factory=PopularityBaseline)
    outputs: list[tuple[bytes, dict]] = field(default_factory=list)

    @classmethod
    def like(cls, rig: Rig) -> "Offline":
        s = rig.pipeline.settings
        cfg = ProcessorConfig(k=s.scoring.top_k, session_gap_ms=int(s.worker.session_gap_s * 1000))
        return cls(rig.pipeline.holder.current, cfg)

    def step(self, events: list[Event]) -> None:
        keys = list(dict.fromkeys(e.key for e in events))
        result = process_batch(self.model, events, self.store.get_many(keys), self.cfg, self.popularity)
        self.store.put_many(result.states)
        self.outputs.extend((k, answer(v)) for k, v in result.outputs)

    def state(self, key: bytes) -> UserState | None:
        return self.store.get_many([key]).get(key)


def answer(value: bytes) -> dict:
    """A recommendation message without its publishing time (wall clock, differs between two runs)."""
    msg = orjson.loads(value)
    msg.pop("published_ts", None)
    return msg


def same_state(got: UserState, want: UserState) -> None:
    """Equal user states; the hidden vectors up to float32 rounding (another thread computed them)."""
    a, b = dataclasses.asdict(got), dataclasses.asdict(want)
    ha, hb = a.pop("hidden"), b.pop("hidden")
    assert (ha is None) == (hb is None)
    if ha is not None:
        np.testing.assert_allclose(ha, hb, rtol=1e-5, atol=1e-6)
    for name in a:
        np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]), err_msg=name)
