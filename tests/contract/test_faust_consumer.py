"""faust's consumer as ``BatchConsumer`` uses it: the drain-loop hook, fetching under faust's flow control,
and the ack bookkeeping that faust's commit reads (stream/batch_consumer.py)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import aiokafka
import pytest
from aiokafka.structs import ConsumerRecord
from faust.transport.consumer import Fetcher
from faust.transport.drivers.aiokafka import Transport as FaustAIOKafkaTransport
from faust.types import TP
from faust.types.tuples import ack_lock

from contractkit import CONSUMER, CONSUMER_THREAD, HOOKS, PRIVATE, resolve, run
from stream.app import Runtime
from stream.batch_consumer import FETCH_MIN_BYTES, BatchConsumer, BatchConsumerThread, BatchTransport, fetch_max_wait_ms


def record(tp: TP, offset: int) -> ConsumerRecord:
    return ConsumerRecord(topic=tp.topic, partition=tp.partition, offset=offset, timestamp=1_700_000_000_000,
                          timestamp_type=0, key=b"user", value=b"{}", checksum=None, serialized_key_size=4,
                          serialized_value_size=2, headers=())


def input_tps(rt: Runtime) -> tuple[TP, TP]:
    """Two partitions of an input topic, with acks enabled as faust's conductor enables them when the
    worker subscribes (``ack``/``ack_offsets`` ignore topics without)."""
    clicks = rt.pipeline.names.clicks
    if not rt.app.topics.acks_enabled_for(clicks):
        run(rt, rt.app.topics._update_indices())
    assert rt.app.topics.acks_enabled_for(clicks)
    return TP(clicks, 0), TP(clicks, 1)


def test_ack_offsets_keeps_the_bookkeeping_of_consumer_ack(runtime: Runtime) -> None:
    """``ack_offsets`` writes ``_acked``/``_acked_index``/``_n_acked`` exactly as faust's own ``ack`` does per
    message (offsets below the committed one and repeats ignored), so faust's commit picks the same offset."""
    consumer = runtime.app.consumer
    by_faust, by_gruflow = input_tps(runtime)
    offsets = [1, 3, 4, 4, 5, 7, 2, 6]
    for tp in (by_faust, by_gruflow):
        consumer._committed_offset[tp] = 3
    n0 = consumer._n_acked
    for off in offsets:
        consumer.ack(consumer._to_message(by_faust, record(by_faust, off)))
    n_faust = consumer._n_acked - n0
    n_gruflow = consumer.ack_offsets(by_gruflow, offsets)
    assert consumer._n_acked - n0 == 2 * n_faust
    assert n_gruflow == n_faust > 0
    assert list(consumer._acked[by_gruflow]) == list(consumer._acked[by_faust])
    assert consumer._acked_index[by_gruflow] == consumer._acked_index[by_faust]
    # faust's commit reads the bookkeeping: the same committable offset for both partitions
    chosen = consumer._new_offset(by_faust)
    assert chosen is not None and chosen == consumer._new_offset(by_gruflow)


def test_a_gap_lets_the_commit_pass_offsets_that_never_come(runtime: Runtime) -> None:
    """The drain loop reports offsets missing from a partition (transaction markers, compaction) with
    ``_add_gap`` BEFORE it acks the batch: faust's commit then moves past them."""
    consumer = runtime.app.consumer
    with_gap, without = input_tps(runtime)
    for tp in (with_gap, without):
        consumer.ack_offsets(tp, [0, 1, 2])
    run(runtime, consumer._add_gap(with_gap, 3, 5))
    for tp in (with_gap, without):
        consumer.ack_offsets(tp, [6])
    assert consumer._new_offset(without) == 3  # stops at the first offset never acked
    assert consumer._new_offset(with_gap) == 7  # the gap counts as acked


def test_ack_offsets_and_consumer_ack_share_faust_ack_lock(runtime: Runtime) -> None:
    """``ack_offsets`` takes ``faust.types.tuples.ack_lock``; it only protects the bookkeeping if faust's
    own ``ack`` (called from other threads too) takes the same lock."""
    consumer = runtime.app.consumer
    tp, _ = input_tps(runtime)
    message = consumer._to_message(tp, record(tp, 10))
    done = threading.Event()
    with ack_lock:
        t = threading.Thread(target=lambda: (consumer.ack(message), done.set()), daemon=True)
        t.start()
        blocked = not done.wait(0.3)
    t.join(10)
    assert blocked, "Consumer.ack did not wait for ack_lock"
    assert done.is_set() and 10 in consumer._acked_index[tp]


def test_to_message_keeps_the_record_position(runtime: Runtime) -> None:
    """Records of other topics (changelogs during recovery) go to faust's conductor as ``_to_message``
    makes them; the drain loop then sets ``_read_offset`` from ``message.offset``."""
    consumer = runtime.app.consumer
    tp, _ = input_tps(runtime)
    message = consumer._to_message(tp, record(tp, 42))
    assert (message.tp, message.offset, message.key, message.value) == (tp, 42, b"user", b"{}")
    assert message.generation_id == runtime.app.consumer_generation_id


def test_read_offset_is_none_until_a_partition_is_read(runtime: Runtime) -> None:
    """The drain loop and the lag gauge read ``_read_offset.get(tp)`` and treat None as "nothing read yet"."""
    consumer = runtime.app.consumer
    tp, _ = input_tps(runtime)
    assert consumer._read_offset.get(tp) is None
    consumer._read_offset[tp] = 5
    assert consumer._read_offset.get(tp) == 5


def test_commit_every_is_the_broker_commit_every_setting(runtime: Runtime) -> None:
    """The drain loop commits after ``_commit_every`` acks, as faust's own loop does."""
    assert runtime.app.consumer._commit_every == runtime.app.conf.broker_commit_every


def test_perform_seek_records_committed_and_read_offsets(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    """faust's ``perform_seek`` leaves ``_read_offset`` falsy for a partition without a committed offset:
    ``BatchConsumer.perform_seek`` (exactly_once) seeks exactly those to the beginning."""
    consumer = runtime.app.consumer
    committed, fresh = input_tps(runtime)

    async def seek_to_committed() -> dict[TP, int]:
        return {committed: 5, fresh: -1}

    monkeypatch.setattr(consumer, "seek_to_committed", seek_to_committed)
    run(runtime, consumer.perform_seek())
    assert consumer._read_offset[committed] == 5
    assert not consumer._read_offset.get(fresh)
    assert consumer._committed_offset[committed] == 5


def test_exactly_once_seek_starts_fresh_partitions_at_the_beginning(eos_runtime: Runtime,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    consumer = eos_runtime.app.consumer
    committed, fresh = input_tps(eos_runtime)
    sought: list[Any] = []

    async def seek_to_committed() -> dict[TP, int]:
        return {committed: 5, fresh: -1}

    async def seek_to_beginning(*partitions: Any) -> None:
        sought.extend(partitions)

    monkeypatch.setattr(consumer, "seek_to_committed", seek_to_committed)
    monkeypatch.setattr(consumer, "assignment", lambda: {committed, fresh})
    monkeypatch.setattr(consumer._thread, "seek_to_beginning", seek_to_beginning)
    run(eos_runtime, consumer.perform_seek())
    assert [(p.topic, p.partition) for p in sought] == [(fresh.topic, fresh.partition)]
    assert all(isinstance(p, aiokafka.TopicPartition) for p in sought)


def test_wait_next_records_fetches_the_active_partitions(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    """``BatchConsumer._fetch`` takes ``(records, active partitions)`` from ``_wait_next_records``, which
    asks the consumer thread for the active (resumed, not paused) partitions."""
    consumer = runtime.app.consumer
    tp, paused = input_tps(runtime)
    asked: list[Any] = []
    records = {tp: [record(tp, 0), record(tp, 1)]}

    async def getmany(active_partitions: Any, timeout: float) -> Any:
        asked.append(set(active_partitions))
        return records

    monkeypatch.setattr(consumer._thread, "getmany", getmany)
    consumer.resume_partitions([tp, paused])
    consumer.pause_partitions([paused])
    got, active = run(runtime, consumer._wait_next_records(0.01))
    assert got == records
    assert set(active) == {tp} and asked == [{tp}]


def test_fetcher_runs_the_consumer_drain_loop(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    """faust's Fetcher service calls ``app.consumer._drain_messages(fetcher)``: the hook the batch path
    replaces; the drain loop stops on ``fetcher._stopped``."""
    consumer = runtime.app.consumer
    called: list[Any] = []

    async def drain(fetcher: Any) -> None:
        called.append(fetcher)
        await fetcher._stopped.wait()

    monkeypatch.setattr(consumer, "_drain_messages", drain)
    fetcher = Fetcher(runtime.app, loop=runtime.app.loop)

    async def start_and_stop() -> bool:
        await fetcher.start()
        for _ in range(500):
            if called:
                break
            await asyncio.sleep(0.01)
        running = not fetcher._stopped.is_set()
        await fetcher.stop()
        return running

    assert run(runtime, start_and_stop())
    assert called == [fetcher]
    assert fetcher._stopped.is_set()


def test_the_consumer_thread_builds_the_aiokafka_consumer_with_the_batch_fetch_settings(runtime: Runtime) -> None:
    """faust builds the worker's aiokafka consumer through the overridden ``_new_consumer_thread`` and
    ``_create_worker_consumer``; the batch bounds reach aiokafka's private fetch settings."""
    consumer = runtime.app.consumer
    assert isinstance(consumer._thread, BatchConsumerThread)

    async def build() -> Any:
        return consumer._thread._create_consumer(runtime.app.loop)

    kafka = run(runtime, build())
    try:
        assert isinstance(kafka, aiokafka.AIOKafkaConsumer)
        assert kafka._fetch_max_wait_ms == fetch_max_wait_ms(consumer.batch_max_s)
        assert kafka._fetch_min_bytes == FETCH_MIN_BYTES
    finally:
        run(runtime, kafka.stop())


def test_in_worker_makes_the_consumer_transactional(eos_runtime: Runtime) -> None:
    """``build_app`` sets ``app.in_worker`` before the consumer exists; faust caches ``in_transaction``
    from it, and the consumer copies it (BatchConsumer's exactly_once paths test it)."""
    assert eos_runtime.app.in_transaction is True
    assert eos_runtime.app.consumer.in_transaction is True
    assert eos_runtime.app.consumer.transactions.producer is not None


def _plain_faust_consumer(rt: Runtime) -> Any:
    transport = FaustAIOKafkaTransport(rt.app.conf.broker_consumer, rt.app, loop=rt.app.loop)

    async def noop(*_: Any) -> None:
        return None

    return transport.create_consumer(callback=noop, on_partitions_revoked=noop, on_partitions_assigned=noop)


def test_gruflow_names_do_not_collide_with_faust(runtime: Runtime) -> None:
    """Every private name the batch classes define either overrides a faust name listed in the inventory,
    or is gruflow's own and absent from faust: a newer faust that adds ``_fetch`` or ``_held`` would
    otherwise be silently overridden (or override gruflow's)."""
    declared = {(t.owner, t.name) for t in PRIVATE + HOOKS}
    plain = _plain_faust_consumer(runtime)
    problems = []
    for cls, base_owner, base_instance in ((BatchConsumer, CONSUMER, plain),
                                          (BatchConsumerThread, CONSUMER_THREAD, plain._thread)):
        base = resolve(base_owner)
        own = {n for n in vars(cls) if not n.startswith("__") and n != "_abc_impl"}  # abc bookkeeping
        if cls is BatchConsumer:  # instance attributes gruflow's __init__ adds
            own |= set(vars(runtime.app.consumer)) - set(vars(base_instance))
        for name in own:
            on_base = hasattr(base, name) or hasattr(base_instance, name)
            if name.startswith("_") and on_base and (base_owner, name) not in declared:
                problems.append(f"{cls.__name__}.{name} overrides faust's but is not in the inventory")
            if not on_base and (base_owner, name) in declared:
                problems.append(f"{cls.__name__}.{name} overrides nothing in faust any more")
            if not name.startswith("_") and on_base and callable(getattr(cls, name, None)) \
                    and (base_owner, name) not in declared:
                problems.append(f"{cls.__name__}.{name} overrides faust's public method but is not in the inventory")
    assert BatchTransport.Consumer is BatchConsumer
    assert not problems, problems
