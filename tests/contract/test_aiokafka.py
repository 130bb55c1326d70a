"""aiokafka as gruflow uses it below faust: the consumer's private fetch settings (read when ``start()``
builds the fetcher), the producer's record-batch API (``BatchSink``) and the key hash (``TableStore``)."""

from __future__ import annotations

import asyncio
import importlib
import inspect
from typing import Any

import aiokafka
import pytest
from aiokafka.partitioner import DefaultPartitioner



class _Built(Exception):
    """Raised by the fetcher stand-in: start() got as far as building the fetcher."""


def test_start_hands_the_private_fetch_settings_to_the_fetcher(monkeypatch: pytest.MonkeyPatch) -> None:
    """``BatchConsumerThread`` writes ``_fetch_max_wait_ms``/``_fetch_min_bytes`` after aiokafka built the
    consumer (faust builds it); that only works while ``start()`` (not ``__init__``) passes them to the
    fetcher. The stand-ins skip the broker: bootstrap and topic wait do nothing, and the fetcher records
    its arguments. (faust's side of it: test_faust_consumer.py.)"""
    consumer_module = importlib.import_module(aiokafka.AIOKafkaConsumer.__module__)
    seen: dict[str, Any] = {}

    def fetcher(*args: Any, **kwargs: Any) -> Any:
        seen.update(kwargs)
        raise _Built

    async def nothing(*_: Any, **__: Any) -> None:
        return None

    async def start() -> None:
        kafka = aiokafka.AIOKafkaConsumer(bootstrap_servers="127.0.0.1:9", fetch_max_wait_ms=1500)
        kafka._fetch_max_wait_ms = 20
        kafka._fetch_min_bytes = 256 * 1024
        monkeypatch.setattr(kafka._client, "bootstrap", nothing)
        monkeypatch.setattr(kafka, "_wait_topics", nothing)
        monkeypatch.setattr(consumer_module, "Fetcher", fetcher)
        try:
            with pytest.raises(_Built):
                await kafka.start()
        finally:
            await kafka.stop()

    asyncio.run(start())
    assert seen["fetch_max_wait_ms"] == 20
    assert seen["fetch_min_bytes"] == 256 * 1024


class _PartitionRecords:
    """Stands in for aiokafka's PartitionRecords (parsed from a fetch response): yields offsets and keeps
    ``next_fetch_offset`` one past the last one yielded, as the real one does."""

    def __init__(self, offsets: list[int]) -> None:
        self.next_fetch_offset = offsets[0]
        self._offsets = iter(offsets)

    def __iter__(self) -> "_PartitionRecords":
        return self

    def __next__(self) -> int:
        offset = next(self._offsets)
        self.next_fetch_offset = offset + 1
        return offset


def test_paused_or_sought_partitions_neither_return_records_nor_move() -> None:
    """The takeover invariant (stream/worker/batch_consumer.py) rests on aiokafka's fetch semantics: records
    buffered for a partition are returned (``FetchResult.getall``, which ``Fetcher.fetched_records`` drains)
    only if the partition is not paused and its position is where the fetch started, and only returning
    them moves the position; a paused partition is left out of fetch requests; a seek drops what was
    buffered. Real aiokafka subscription state and FetchResult; the fetch response is stood in for."""
    from aiokafka.consumer.fetcher import Fetcher, FetchResult
    from aiokafka.structs import TopicPartition

    tp = TopicPartition("clicks", 0)

    async def check() -> tuple[list[int], int, list[int], int, list[int], int]:
        kafka = aiokafka.AIOKafkaConsumer(bootstrap_servers="127.0.0.1:9")
        try:
            kafka.assign([tp])
            subscriptions = kafka._subscription
            assignment = subscriptions.subscription.assignment
            state = assignment.state_value(tp)

            def fetched(offsets: list[int]) -> list[int]:
                return FetchResult(tp, assignment=assignment, partition_records=_PartitionRecords(offsets),
                                   backoff=0).getall(None)

            subscriptions.seek(tp, 5)
            kafka.pause(tp)
            while_paused = fetched([5, 6, 7])
            paused_at = state.position
            kafka.resume(tp)
            subscriptions.seek(tp, 2)  # a seek after the fetch went out: those records are not returned
            after_seek = fetched([5, 6, 7])
            sought_at = state.position
            resumed = fetched([2, 3])
            return while_paused, paused_at, after_seek, sought_at, resumed, state.position
        finally:
            await kafka.stop()

    while_paused, paused_at, after_seek, sought_at, resumed, position = asyncio.run(check())
    assert (while_paused, paused_at) == ([], 5)
    assert (after_seek, sought_at) == ([], 2)
    assert (resumed, position) == ([2, 3], 4)
    # the fetcher's side: no fetch request for a paused partition; fetched_records drains through getall;
    # seek_to drops the records buffered for the partition
    assert "tp_state.paused" in inspect.getsource(Fetcher._get_actions_per_node)
    assert ".getall(max_records)" in inspect.getsource(Fetcher.fetched_records)
    seek_to = inspect.getsource(Fetcher.seek_to)
    assert "del self._records[tp]" in seek_to and "self._subscriptions.seek(tp, offset)" in seek_to


def test_seek_to_committed_returns_the_committed_offsets_and_leaves_the_others(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``BatchConsumerThread._seek_inputs`` takes aiokafka's ``seek_to_committed()`` result as faust's
    committed offsets (every assigned partition, None without a commit) and seeks the partitions without
    a positive committed offset to their beginning itself: aiokafka leaves those where they are. The
    committed offsets come from the group coordinator (a broker); ``committed`` and the fetcher's
    ``seek_to`` are stood in for."""
    from aiokafka.structs import TopicPartition

    with_commit, at_zero, without = (TopicPartition("clicks", p) for p in range(3))
    stored = {with_commit: 5, at_zero: 0, without: None}
    sought: list[tuple[Any, int]] = []

    class SeekRecorder:
        def seek_to(self, tp: Any, offset: int) -> None:
            sought.append((tp, offset))

    async def committed(tp: Any) -> int | None:
        return stored[tp]

    async def seek() -> Any:
        kafka = aiokafka.AIOKafkaConsumer(bootstrap_servers="127.0.0.1:9", group_id="contract")
        try:
            kafka.assign([with_commit, at_zero, without])
            monkeypatch.setattr(kafka, "committed", committed)
            monkeypatch.setattr(kafka, "_fetcher", SeekRecorder())
            return await kafka.seek_to_committed()
        finally:
            monkeypatch.setattr(kafka, "_fetcher", None)
            await kafka.stop()

    assert asyncio.run(seek()) == stored
    assert sought == [(with_commit, 5)]


def test_record_batch_builder_appends_until_full() -> None:
    """``BatchSink._enqueue``: ``append`` returns None once a batch is full, ``close`` seals it."""
    async def fill() -> tuple[int, int]:
        producer = aiokafka.AIOKafkaProducer(bootstrap_servers="127.0.0.1:9", max_batch_size=4096)
        try:
            builder = producer.create_batch()
            n = 0
            while builder.append(timestamp=1_700_000_000_000, key=b"user", value=b"x" * 100,
                                 headers=[("gruflow-reason", b"json")]) is not None:
                n += 1
            builder.close()
            return n, builder.size()
        finally:
            await producer.stop()

    n, size = asyncio.run(fill())
    assert 0 < n < 4096 // 100
    assert 0 < size <= 4096


def test_table_store_partitions_keys_as_the_producers_do() -> None:
    """``TableStore.partition_for`` hashes with aiokafka's ``murmur2`` as aiokafka's (and so faust's)
    default partitioner does: tools read a user's state from the partition its events went to."""
    from stream.worker.table_store import TableStore

    partitions = list(range(8))
    store = TableStore(None, len(partitions))
    for i in range(200):
        key = f"user-{i}".encode()
        assert store.partition_for(key) == DefaultPartitioner()(key, partitions, partitions)
