"""faust's consumer as ``BatchConsumer`` uses it: the drain-loop hook, fetching under faust's flow control,
and the ack bookkeeping that faust's commit reads (stream/worker/batch_consumer.py)."""

from __future__ import annotations

import asyncio
import inspect
import re
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
from stream.worker.app import Runtime
from stream.worker.batch_consumer import FETCH_MIN_BYTES, BatchConsumer, BatchConsumerThread, BatchTransport, fetch_max_wait_ms


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


def _in_order(source: str, *calls: str) -> list[int]:
    """Where each call first occurs in ``source``, after the previous one (-1: absent or out of order)."""
    at, found = 0, []
    for call in calls:
        i = source.find(call, at)
        found.append(i)
        at = max(at, i)
    return found


def test_perform_seek_seeks_through_seek_to_committed_and_records_its_offsets(
        runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    """faust's ``Consumer.perform_seek`` gets the committed offsets from ``self.seek_to_committed()`` (the
    override that seeks, pauses and counts on the consumer thread) and sets ``_read_offset`` and
    ``_committed_offset`` from them, a partition without a committed offset (aiokafka: None) falsy; the
    override then knows where each input partition's next record starts. The consumer thread only runs
    with a broker: its seek is replaced here by the offsets it returns (tests/integration/
    test_worker_takeover.py runs it for real)."""
    consumer = runtime.app.consumer
    committed, fresh = input_tps(runtime)
    resumed: list[frozenset[str]] = []

    async def seek_inputs_to_committed(topics: frozenset[str]) -> tuple[dict[TP, int | None], int]:
        assert topics == consumer.batch_topics
        return {committed: 5, fresh: None}, 7

    async def resume_inputs(topics: frozenset[str]) -> None:
        resumed.append(topics)

    monkeypatch.setattr(consumer._thread, "seek_inputs_to_committed", seek_inputs_to_committed)
    monkeypatch.setattr(consumer._thread, "resume_inputs", resume_inputs)
    monkeypatch.setattr(consumer, "assignment", lambda: {committed, fresh})
    run(runtime, consumer.perform_seek())
    assert consumer._read_offset[committed] == 5
    assert not consumer._read_offset.get(fresh)
    assert consumer._committed_offset[committed] == 5
    assert consumer._ready_seek == 7  # the seek faust's call went through
    assert consumer._next == {committed: 5}
    assert resumed == [consumer.batch_topics]


def test_recovery_seeks_the_inputs_after_the_changelogs_and_before_the_flow_resumes() -> None:
    """The takeover invariant counts on faust's rebalance order: the assignment starts the transactional
    producers (``transactions.on_rebalance``, where ``FreshTransactionManager`` replaces them) before table
    recovery; recovery reads the changelogs, then ``perform_seek`` of the stream partitions, then resumes the
    flow. So the seek that sets ``_ready_seek`` comes after every record of the revoked generation, and
    nothing is sent before the fresh producers exist. Only a broker runs the flow itself; this pins its order
    in faust's source."""
    from faust.app.base import App
    from faust.tables.recovery import Recovery

    assigned = inspect.getsource(App._on_partitions_assigned)
    order = _in_order(assigned, "consumer.pause_partitions", "consumer.transactions.on_rebalance",
                      "self.tables.on_rebalance")
    assert -1 not in order and order == sorted(order), order
    for fn in (Recovery._resume_streams, Recovery.on_recovery_completed):
        order = _in_order(inspect.getsource(fn), "consumer.resume_partitions", "consumer.perform_seek()",
                          "consumer.resume_flow()")
        assert -1 not in order and order == sorted(order), (fn.__qualname__, order)
    # faust's own perform_seek is where the override is called from
    assert "await self.seek_to_committed()" in inspect.getsource(resolve(CONSUMER).perform_seek)


def test_faust_never_pauses_or_resumes_partitions_in_aiokafka() -> None:
    """faust's ``pause_partitions``/``resume_partitions`` only filter which partitions its fetch asks for; the
    aiokafka pause of the input partitions during a seek is ``BatchConsumerThread``'s alone, so faust cannot
    resume them while the seek is still to be noted (``_ready_seek``)."""
    import faust.app.base
    import faust.tables.recovery
    import faust.transport.consumer
    import faust.transport.drivers.aiokafka

    base = resolve(CONSUMER)
    for name in ("pause_partitions", "resume_partitions"):
        source = inspect.getsource(getattr(base, name))
        assert "_thread" not in source and "call_thread" not in source, name
    for module in (faust.transport.drivers.aiokafka, faust.transport.consumer, faust.tables.recovery,
                   faust.app.base):
        # app.flow_control is faust's own gate (a mode FlowControlEvent), not a consumer
        calls = re.findall(r"(?<!flow_control)\.(pause|resume)\(", inspect.getsource(module))
        assert not calls, f"{module.__name__} now calls aiokafka's pause/resume"


async def _in_place(fun: Any, *args: Any, **kwargs: Any) -> Any:
    """``call_thread`` without the consumer thread (its loop only runs with a broker): the call, awaited here."""
    return await fun(*args, **kwargs)


def test_faust_fetches_through_the_thread_fetch_records(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every fetch of faust's consumer (``_wait_next_records`` -> thread ``getmany``) runs
    ``self._fetch_records(consumer, active_partitions, timeout=, max_records=)`` on the consumer thread:
    the override tags the result with the seek count there. The thread's loop needs a broker; here
    ``call_thread`` runs the call in place and faust's base ``_fetch_records`` (aiokafka's fetcher) returns
    fixed records."""
    consumer = runtime.app.consumer
    thread = consumer._thread
    tp, _ = input_tps(runtime)
    records = {tp: [record(tp, 0)]}
    calls: list[tuple[Any, ...]] = []

    async def base_fetch_records(self: Any, kafka: Any, active_partitions: Any, timeout: float | None = None,
                                 max_records: int | None = None) -> Any:
        calls.append((kafka, set(active_partitions), timeout, max_records))
        return records

    async def build() -> Any:
        return aiokafka.AIOKafkaConsumer(bootstrap_servers="127.0.0.1:9", max_poll_records=123)

    kafka = run(runtime, build())
    try:
        monkeypatch.setattr(resolve(CONSUMER_THREAD), "_fetch_records", base_fetch_records)
        monkeypatch.setattr(thread, "call_thread", _in_place)
        monkeypatch.setattr(thread, "_consumer", kafka)
        monkeypatch.setattr(thread, "seeks", 3)
        consumer.resume_partitions([tp])
        got, active = run(runtime, consumer._wait_next_records(0.25))
    finally:
        run(runtime, kafka.stop())
    assert calls == [(kafka, {tp}, 0.25, 123)]
    assert got == records and getattr(got, "seeks", None) == 3


def test_highwaters_runs_the_thread_highwaters(eos_runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    """faust's recovery reads a changelog's end through ``consumer.highwaters``, which runs the thread's
    ``_highwaters(partitions)``: in exactly_once the override asks the broker (``end_offsets``) where faust's
    own reads aiokafka's cached ``last_stable_offset`` (the stand-in has none)."""
    consumer = eos_runtime.app.consumer
    thread = consumer._thread
    tp, _ = input_tps(eos_runtime)
    asked: list[Any] = []

    class Kafka:
        async def end_offsets(self, partitions: Any) -> dict[Any, int]:
            asked.append(list(partitions))
            return {p: 41 for p in partitions}

    monkeypatch.setattr(thread, "call_thread", _in_place)
    monkeypatch.setattr(thread, "_consumer", Kafka())
    assert run(eos_runtime, consumer.highwaters(tp)) == {tp: 41}
    assert [list(a) for a in asked] == [[tp]]


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
