"""faust's transactional producers as exactly_once uses them: ``TransactionalSink`` sends into the
producer faust opened for the partition's transactional id, under faust's lock for it, and
``BatchConsumer._flush_transactions`` flushes all of them before a commit (stream/worker/sinks.py)."""

from __future__ import annotations

import asyncio
from typing import Any, Iterator

import pytest
from faust.types import TP

from contractkit import run
from stream.worker.app import Runtime
from stream.worker.transactions import FreshTransactionManager
from stream.worker.sinks import Outgoing, TransactionalSink


class RecordingProducer:
    """Stands in for aiokafka's transactional producer (no broker): records what faust and gruflow call."""

    def __init__(self, transactional_id: str | None) -> None:
        self.transactional_id = transactional_id
        self.calls: list[str] = []
        self.sent: list[tuple[str, bytes | None, bytes | None, int, Any]] = []
        self.fenced = False  # True: the broker gave this transactional id to a newer producer

    async def start(self) -> None:
        self.calls.append("start")

    async def begin_transaction(self) -> None:
        self.calls.append("begin_transaction")

    async def send(self, topic: str, value: bytes | None, key: bytes | None = None, partition: int | None = None,
                   headers: Any = None) -> "asyncio.Future[None]":
        self.sent.append((topic, key, value, partition, headers))
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut

    async def flush(self) -> None:
        self.calls.append("flush")

    async def send_offsets_to_transaction(self, offsets: Any, group_id: str) -> None:
        if self.fenced:
            from aiokafka.errors import ProducerFenced

            raise ProducerFenced()
        self.calls.append("send_offsets_to_transaction")
        self.offsets = (dict(offsets), group_id)

    async def commit_transaction(self) -> None:
        self.calls.append("commit_transaction")

    async def stop(self) -> None:
        self.calls.append("stop")


@pytest.fixture
def transactions(eos_runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, dict[str, Any]]]:
    """faust's producer, started, with its aiokafka producers replaced by recorders, and the assignor's topic group
    set as after an assignment (input topics and changelog are co-partitioned: group 0)."""
    producer = eos_runtime.app.consumer.transactions.producer
    made: dict[str, Any] = {}

    def new_producer(transactional_id: str | None = None) -> RecordingProducer:
        p = RecordingProducer(transactional_id)
        made[transactional_id or ""] = p
        return p

    monkeypatch.setattr(producer, "_new_producer", new_producer)
    monkeypatch.setattr(eos_runtime.app.assignor, "group_for_topic", lambda topic: 0)
    before = (dict(producer._transaction_producers), dict(producer._trn_locks))
    run(eos_runtime, producer.start())  # faust's Producer service: its own (recording) producer
    try:
        yield producer, made
    finally:
        run(eos_runtime, producer.stop())
        # faust keeps both mappings on the class: leave them as they were for the next app
        for mapping, old in zip((producer._transaction_producers, producer._trn_locks), before):
            mapping.clear()
            mapping.update(old)


def test_the_sink_computes_faust_transactional_ids(eos_runtime: Runtime, transactions: Any) -> None:
    """``TransactionalSink._transactional_id`` mirrors faust's id scheme for a partition's transaction."""
    sink = eos_runtime.pipeline.sink
    assert isinstance(sink, TransactionalSink)
    clicks = eos_runtime.pipeline.names.clicks
    manager = eos_runtime.app.consumer.transactions
    for p in range(2):
        assert manager._tps_to_transactional_ids({TP(clicks, p)}) == {sink._transactional_id(p)}


def test_the_sink_sends_into_the_producer_faust_began(eos_runtime: Runtime, transactions: Any) -> None:
    producer, made = transactions
    sink = eos_runtime.pipeline.sink
    tid = sink._transactional_id(1)
    run(eos_runtime, producer.begin_transaction(tid))
    assert made[tid].calls == ["start", "begin_transaction"]
    assert producer._transaction_producers[tid] is made[tid]
    assert isinstance(producer._trn_locks[tid], asyncio.Lock)

    out = Outgoing()
    out.changelog[1].append((b"u1", b"state"))
    out.recommendations[1].append((b"u1", b"recs"))
    out.dlq[1].append((b"bad", b"value", [("gruflow-reason", b"json")]))
    changelog_futs, futs = run(eos_runtime, sink.send(out))
    names = eos_runtime.pipeline.names
    assert [(t, k, v, p) for t, k, v, p, _ in made[tid].sent] == [
        (names.changelog, b"u1", b"state", 1), (names.recommendations, b"u1", b"recs", 1),
        (names.dlq, b"bad", b"value", 1)]
    assert [p for p, _ in changelog_futs] == [1] and len(futs) == 3


def test_flush_before_commit_reaches_every_open_transaction(eos_runtime: Runtime, transactions: Any) -> None:
    """``_flush_transactions`` finds the producers through ``_transaction_producers`` (with a default of {}:
    were the name gone it would silently flush nothing, so this test is what notices)."""
    producer, made = transactions
    sink = eos_runtime.pipeline.sink
    tids = [sink._transactional_id(p) for p in range(2)]
    for tid in tids:
        run(eos_runtime, producer.begin_transaction(tid))
    run(eos_runtime, eos_runtime.app.consumer._flush_transactions())
    assert all(made[tid].calls[-1] == "flush" for tid in tids)


def test_every_rebalance_starts_the_transactional_producers_afresh(eos_runtime: Runtime, transactions: Any) -> None:
    """faust builds the consumer's transaction manager from ``Transport.TransactionManager`` (so
    ``BatchTransport`` installs ``FreshTransactionManager``), whose ``on_rebalance`` stops every open
    transactional producer with faust's ``stop_transaction`` (it drops it from ``_transaction_producers``)
    before faust's own ``on_rebalance`` begins those of the assigned partitions: a partition this worker
    keeps gets a new producer too."""
    producer, made = transactions
    manager = eos_runtime.app.consumer.transactions
    assert isinstance(manager, FreshTransactionManager)
    clicks = eos_runtime.pipeline.names.clicks
    kept, dropped = (eos_runtime.pipeline.sink._transactional_id(p) for p in range(2))
    for tid in (kept, dropped):
        run(eos_runtime, producer.begin_transaction(tid))
    old = {tid: made[tid] for tid in (kept, dropped)}
    run(eos_runtime, manager.on_rebalance({TP(clicks, 0)}, set(), set()))
    assert all(p.calls[-1] == "stop" for p in old.values())
    assert made[kept] is not old[kept] and made[kept].calls == ["start", "begin_transaction"]
    assert producer._transaction_producers == {kept: made[kept]}


def test_commit_commits_each_partition_in_its_own_transaction(eos_runtime: Runtime, transactions: Any) -> None:
    """``FreshTransactionManager.commit`` (faust's consumer commits through it) sends each partition's offset to
    the transaction of the id the sink sends in, commits it and begins the next, as faust's own commit."""
    producer, made = transactions
    manager = eos_runtime.app.consumer.transactions
    clicks = eos_runtime.pipeline.names.clicks
    tids = [eos_runtime.pipeline.sink._transactional_id(p) for p in range(2)]
    for tid in tids:
        run(eos_runtime, producer.begin_transaction(tid))
    assert run(eos_runtime, manager.commit({TP(clicks, 0): 10, TP(clicks, 1): 20})) is True
    for p, tid in enumerate(tids):
        assert made[tid].calls[-3:] == ["send_offsets_to_transaction", "commit_transaction", "begin_transaction"]
        assert made[tid].offsets == ({TP(clicks, p): 10 * (p + 1)}, eos_runtime.app.conf.id)


@pytest.mark.parametrize("rebalance", [True, False])
def test_a_fenced_commit_reports_failure_and_crashes_only_if_no_rebalance_follows(
        eos_runtime: Runtime, transactions: Any, monkeypatch: pytest.MonkeyPatch, rebalance: bool) -> None:
    """A newer producer holds the transactional id: the commit returns False and counts it. If a rebalance
    begins within the grace (the partition moved while this worker stood still), the app is not crashed; if
    none does (a transaction timeout), it is crashed as faust's own commit would (a restart goes back to the
    broker's committed offsets)."""
    producer, made = transactions
    manager = eos_runtime.app.consumer.transactions
    app = eos_runtime.app
    crashed: list[BaseException] = []

    async def crash(exc: BaseException) -> None:
        crashed.append(exc)

    monkeypatch.setattr(app, "crash", crash)
    monkeypatch.setattr(manager, "fence_grace_s", 0.5)

    def fenced() -> float | None:
        return eos_runtime.metrics.registry.get_sample_value("gruflow_transactions_fenced_total")

    before = fenced()
    tid = eos_runtime.pipeline.sink._transactional_id(0)
    run(eos_runtime, producer.begin_transaction(tid))
    made[tid].fenced = True

    async def commit_then_wait() -> bool:
        ok = await manager.commit({TP(eos_runtime.pipeline.names.clicks, 0): 5})
        if rebalance:
            app.rebalancing_count += 1  # what faust's on_rebalance_start does
        await asyncio.sleep(1.0)  # past the grace
        return ok

    assert run(eos_runtime, commit_then_wait()) is False
    assert "commit_transaction" not in made[tid].calls
    assert before is not None and fenced() == before + 1
    assert (crashed == []) if rebalance else (len(crashed) == 1 and type(crashed[0]).__name__ == "ProducerFenced")
