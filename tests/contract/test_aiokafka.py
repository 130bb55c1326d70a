"""aiokafka as gruflow uses it below faust: the consumer's private fetch settings (read when ``start()``
builds the fetcher), the producer's record-batch API (``BatchSink``) and the key hash (``TableStore``)."""

from __future__ import annotations

import asyncio
import importlib
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
    from stream.table_store import TableStore

    partitions = list(range(8))
    store = TableStore(None, len(partitions))
    for i in range(200):
        key = f"user-{i}".encode()
        assert store.partition_for(key) == DefaultPartitioner()(key, partitions, partitions)
