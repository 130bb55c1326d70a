"""Where a micro-batch's output goes: recommendations, state changelog records and dead letters.

At-least-once: one confluent-kafka producer (C batching, a few µs per message instead of faust's
per-message send path); the worker waits for delivery of the whole batch before it writes RocksDB and
acks the input offsets, so a crash can only cause re-delivery, never loss.

Exactly-once: faust's transactional aiokafka producers, one per input partition (faust's
transactional id scheme); records go into the transaction that also commits that partition's input
offsets, so readers with isolation.level=read_committed see each event's outputs exactly once.

Every record is sent to the partition of the input event it came from: input topics, the changelog,
recommendations and dlq are co-partitioned and keyed by user id.

DLQ record format: the value is the ORIGINAL message bytes, unchanged; the key is the original key;
headers carry ``gruflow-reason`` (one of ``stream.events.REASONS``), ``gruflow-detail`` (a short
human-readable explanation), ``gruflow-topic``, ``gruflow-partition``, ``gruflow-offset`` and
``gruflow-timestamp`` (the source message's timestamp, ms) as UTF-8 strings.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from stream.settings import Settings


@dataclass
class Outgoing:
    """One batch's records, grouped by the input partition they belong to."""

    # partition -> [(key, value)]
    recommendations: dict[int, list[tuple[bytes, bytes]]] = field(default_factory=lambda: defaultdict(list))
    changelog: dict[int, list[tuple[bytes, bytes | None]]] = field(default_factory=lambda: defaultdict(list))
    # partition -> [(key, value, headers)]
    dlq: dict[int, list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]]] = field(
        default_factory=lambda: defaultdict(list))


@dataclass
class Delivered:
    changelog_offsets: dict[int, int]  # partition -> highest changelog offset written
    delivered_at: float  # wall clock (s) when the broker acknowledged the last record


def dlq_headers(reason: str, detail: str, topic: str, partition: int, offset: int,
                timestamp_ms: int | None) -> list[tuple[str, bytes]]:
    return [("gruflow-reason", reason.encode()), ("gruflow-detail", detail[:500].encode("utf-8", "replace")),
            ("gruflow-topic", topic.encode()), ("gruflow-partition", str(partition).encode()),
            ("gruflow-offset", str(offset).encode()),
            ("gruflow-timestamp", str(timestamp_ms if timestamp_ms is not None else -1).encode())]


class SinkError(RuntimeError):
    """Records could not be delivered; the batch is not acked and will be processed again."""


class Ticket:
    """Delivery of one batch's records: ``future`` resolves when the broker acknowledged all of them."""

    def __init__(self, loop: asyncio.AbstractEventLoop, changelog: str, count: int) -> None:
        self._loop = loop
        self._changelog = changelog
        self._lock = threading.Lock()
        self.remaining = count
        self.errors: list[str] = []
        self.changelog_offsets: dict[int, int] = {}
        self.delivered_at = time.time()
        self.future: asyncio.Future[None] = loop.create_future()
        if count == 0:
            self.future.set_result(None)

    def on_delivery(self, err: Any, msg: Any) -> None:  # librdkafka's poll thread
        with self._lock:
            if err is not None:
                self.errors.append(f"{msg.topic()}[{msg.partition()}]: {err}")
            elif msg.topic() == self._changelog:
                p, off = msg.partition(), msg.offset()
                if off > self.changelog_offsets.get(p, -1):
                    self.changelog_offsets[p] = off
            self.remaining -= 1
            done = self.remaining == 0
        if done:
            self.delivered_at = time.time()
            self._loop.call_soon_threadsafe(self._resolve)

    def _resolve(self) -> None:
        if not self.future.done():
            self.future.set_result(None)

    def check(self) -> Delivered:
        if self.errors:
            raise SinkError(f"{len(self.errors)} records failed: {self.errors[:3]}")
        return Delivered(dict(self.changelog_offsets), self.delivered_at)


class ConfluentSink:
    """At-least-once output: a C producer polled by its own thread; ``submit`` returns a Ticket per batch,
    so the worker can compute the next batch while this one is in flight."""

    def __init__(self, settings: Settings, recommendations: str, changelog: str, dlq: str) -> None:
        from confluent_kafka import Producer

        from stream.kafka_config import low_latency, producer_config

        self.topics = (recommendations, changelog, dlq)
        self._changelog = changelog
        self.producer = Producer(producer_config(settings, batch_num_messages=100000, **low_latency(settings)))
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="gruflow-producer-poll", daemon=True)
        self._poller.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.producer.poll(0.05)

    def _produce(self, topic: str, partition: int, key: bytes | None, value: bytes | None, cb: Any,
                 headers: list[tuple[str, bytes]] | None = None) -> None:
        produce = self.producer.produce
        while True:
            try:
                if headers:
                    produce(topic, value, key, partition, on_delivery=cb, headers=headers)
                else:
                    produce(topic, value, key, partition, on_delivery=cb)
                return
            except BufferError:
                time.sleep(0.01)  # local queue full: the poll thread drains deliveries

    def submit(self, out: Outgoing) -> Ticket:
        rec_topic, cl_topic, dlq_topic = self.topics
        count = (sum(len(v) for v in out.changelog.values()) + sum(len(v) for v in out.recommendations.values())
                 + sum(len(v) for v in out.dlq.values()))
        ticket = Ticket(asyncio.get_running_loop(), cl_topic, count)
        cb = ticket.on_delivery
        for p, records in out.changelog.items():
            for key, value in records:
                self._produce(cl_topic, p, key, value, cb)
        for p, records in out.recommendations.items():
            for key, value in records:
                self._produce(rec_topic, p, key, value, cb)
        for p, dead in out.dlq.items():
            for key, value, headers in dead:
                self._produce(dlq_topic, p, key, value, cb, headers)
        return ticket

    async def send(self, out: Outgoing) -> Delivered:
        ticket = self.submit(out)
        await ticket.future
        return ticket.check()

    def close(self) -> None:
        self.producer.flush(10.0)
        self._stop.set()
        self._poller.join(2.0)


class TransactionalSink:
    """Sends through faust's per-partition transactional producers (processing_guarantee=exactly_once)."""

    def __init__(self, app: Any, source_topic: str, recommendations: str, changelog: str, dlq: str) -> None:
        self.app = app
        self.source_topic = source_topic
        self.topics = (recommendations, changelog, dlq)

    def _transactional_id(self, partition: int) -> str:
        group = self.app.assignor.group_for_topic(self.source_topic)
        return f"{self.app.conf.id}-{group}-{partition}"

    async def send(self, out: Outgoing) -> tuple[list[tuple[int, Any]], list[Any]]:
        """Append the records to the open transactions; returns (changelog futures, all futures)."""
        rec_topic, cl_topic, dlq_topic = self.topics
        faust_producer = self.app.consumer.transactions.producer
        changelog_futs: list[tuple[int, Any]] = []
        futs: list[Any] = []
        partitions = set(out.recommendations) | set(out.changelog) | set(out.dlq)
        for p in sorted(partitions):
            tid = self._transactional_id(p)
            producer = faust_producer._transaction_producers.get(tid)
            if producer is None:
                raise SinkError(f"no transactional producer for {tid} (partition revoked?)")
            async with faust_producer._trn_locks[tid]:
                for key, value in out.changelog.get(p, ()):
                    fut = await producer.send(cl_topic, value, key=key, partition=p)
                    changelog_futs.append((p, fut))
                    futs.append(fut)
                for key, value in out.recommendations.get(p, ()):
                    futs.append(await producer.send(rec_topic, value, key=key, partition=p))
                for key, value, headers in out.dlq.get(p, ()):
                    futs.append(await producer.send(dlq_topic, value, key=key, partition=p, headers=headers))
        return changelog_futs, futs

    def close(self) -> None:
        pass
