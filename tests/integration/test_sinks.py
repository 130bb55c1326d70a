"""The worker's at-least-once output (``BatchSink``) against the real broker: whole batches in one request,
read back record by record."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

import pytest

from stream.kafka.config import assign_whole_topic, consumer_config
from stream.worker.sinks import RECORD_BATCH_BYTES, BatchSink, Outgoing, SinkError, dlq_headers
from stream.kafka.topics import TopicNames, ensure_topics


def _read(settings: Any, topic: str, expected: int, timeout: float = 30.0) -> list[Any]:
    import time

    from confluent_kafka import OFFSET_BEGINNING, Consumer

    c = Consumer(consumer_config(settings, group_id=None))
    try:
        assign_whole_topic(c, topic, OFFSET_BEGINNING)
        got: list[Any] = []
        deadline = time.monotonic() + timeout
        while len(got) < expected and time.monotonic() < deadline:
            got += [m for m in c.consume(1000, 0.5) if m.error() is None]
        return got
    finally:
        c.close()


def _sink(settings: Any) -> tuple[BatchSink, TopicNames]:
    names = TopicNames.from_settings(settings)
    return BatchSink(settings, names.recommendations, names.changelog, names.dlq), names


def test_batches_arrive_whole_in_order_with_their_changelog_offsets(kafka):
    settings = kafka.settings(partitions=2)
    ensure_topics(settings)
    sink, names = _sink(settings)
    big = b"x" * 40_000  # partition 1's changelog records fill several record batches
    n_big = 3 * RECORD_BATCH_BYTES // len(big)

    def batch(tag: str) -> Outgoing:
        out = Outgoing()
        for i in range(50):
            out.recommendations[i % 2].append((f"u{i}".encode(), f"{tag}-rec-{i}".encode()))
        out.changelog[0] += [(f"u{i}".encode(), f"{tag}-state-{i}".encode()) for i in range(0, 50, 2)]
        out.changelog[1] += [(f"u{i}".encode(), big) for i in range(n_big)]
        out.changelog[1].append((b"gone", None))  # a tombstone
        out.dlq[1].append((b"k", b"not json", dlq_headers("not_json", "bad", names.clicks, 1, 7, 123)))
        return out

    async def run() -> list[Any]:
        try:
            # submitted back to back: the second must not overtake the first on any partition
            first, second = sink.submit(batch("a")), sink.submit(batch("b"))
            await asyncio.wait([first.future, second.future])
            return [first.check(), second.check()]
        finally:
            await sink.stop()

    first, second = asyncio.run(run())
    assert second.delivered_at >= first.delivered_at

    recs = _read(settings, names.recommendations, 100)
    by_part: dict[int, list[bytes]] = defaultdict(list)
    for m in recs:
        by_part[m.partition()].append(m.value())
    assert sorted(len(v) for v in by_part.values()) == [50, 50]
    for p, values in by_part.items():
        tags = [v.split(b"-")[0] for v in values]
        assert tags == [b"a"] * 25 + [b"b"] * 25, f"partition {p}: batches interleaved"

    changelog = _read(settings, names.changelog, 2 * (25 + n_big + 1))
    last: dict[int, int] = {}
    for m in changelog:
        last[m.partition()] = max(last.get(m.partition(), -1), m.offset())
    assert second.changelog_offsets == last  # the highest offset the broker gave each partition
    assert first.changelog_offsets[1] < second.changelog_offsets[1]
    assert sum(1 for m in changelog if m.value() is None) == 2

    dead = _read(settings, names.dlq, 2)
    assert [m.value() for m in dead] == [b"not json", b"not json"]
    headers = dict(dead[0].headers())
    assert headers["gruflow-reason"] == b"not_json" and headers["gruflow-offset"] == b"7"


def test_an_undeliverable_batch_fails_its_ticket(kafka):
    settings = kafka.settings(partitions=2)
    ensure_topics(settings)
    sink, _ = _sink(settings)

    async def run() -> None:
        try:
            out = Outgoing()
            out.recommendations[5].append((b"u", b"v"))  # the topic has partitions 0 and 1 only
            ticket = sink.submit(out)
            await asyncio.wait([ticket.future])
            ticket.check()
        finally:
            await sink.stop()

    with pytest.raises(SinkError):
        asyncio.run(run())
