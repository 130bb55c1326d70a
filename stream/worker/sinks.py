"""Where a micro-batch's output goes: recommendations, state changelog records and dead letters.

At-least-once (``BatchSink``): one aiokafka producer fed whole record batches, one produce request per
micro-batch; the worker waits for delivery of the whole batch before it writes RocksDB and acks the
input offsets, so a crash can only cause re-delivery, never loss.

Exactly-once: faust's transactional aiokafka producers, one per input partition (faust's
transactional id scheme); records go into the transaction that also commits that partition's input
offsets, so readers with isolation.level=read_committed see each event's outputs exactly once.

Every record is sent to the partition of the input event it came from: input topics, the changelog,
recommendations and dlq are co-partitioned and keyed by user id.

DLQ record format: the value is the ORIGINAL message bytes, unchanged; the key is the original key;
headers carry ``gruflow-reason`` (one of ``stream.pipeline.events.REASONS``), ``gruflow-detail`` (a short
human-readable explanation), ``gruflow-topic``, ``gruflow-partition``, ``gruflow-offset`` and
``gruflow-timestamp`` (the source message's timestamp, ms) as UTF-8 strings.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from stream import compat
from stream.settings import INPUT_MESSAGE_MAX_BYTES, Settings
from stream.worker.transactions import transactional_id


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


def dead_letter(key: bytes | None, value: bytes | None, reason: str, detail: str, topic: str, partition: int,
                offset: int, timestamp_ms: int | None, max_bytes: int = INPUT_MESSAGE_MAX_BYTES
                ) -> tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]:
    """The dlq record of a bad input: its original key and value, with the reason and source in headers.
    A key and value of more than ``max_bytes`` together (``stream.kafka.topics.dead_letter_budget``: a record that
    came through an input topic created elsewhere with a larger limit, or a dlq with a smaller one) are cut
    to that size, and ``gruflow-original-bytes`` says so: the whole record would not fit in the dlq, and
    failing on it would fail its batch again after every restart."""
    headers = dlq_headers(reason, detail, topic, partition, offset, timestamp_ms)
    size = len(key or b"") + len(value or b"")
    if size > max_bytes:
        key = key[:max_bytes] if key is not None else None
        value = value[:max_bytes - len(key or b"")] if value is not None else None
        headers.append(("gruflow-original-bytes", str(size).encode()))
    return key, value, headers


def dlq_headers(reason: str, detail: str, topic: str, partition: int, offset: int,
                timestamp_ms: int | None) -> list[tuple[str, bytes]]:
    return [("gruflow-reason", reason.encode()), ("gruflow-detail", detail[:500].encode("utf-8", "replace")),
            ("gruflow-topic", topic.encode()), ("gruflow-partition", str(partition).encode()),
            ("gruflow-offset", str(offset).encode()),
            ("gruflow-timestamp", str(timestamp_ms if timestamp_ms is not None else -1).encode())]


class SinkError(RuntimeError):
    """Records could not be delivered; the batch is not acked and will be processed again."""


# one record batch per topic-partition and produce request: under the broker's default message.max.bytes (1 MiB)
RECORD_BATCH_BYTES = 512 * 1024


class BatchTicket:
    """Delivery of one batch's records through ``BatchSink``: ``future`` is done when all are acknowledged."""

    def __init__(self, future: "asyncio.Future[Delivered]") -> None:
        self.future = future

    def check(self) -> Delivered:
        exc = self.future.exception()
        if exc is None:
            return self.future.result()
        raise exc if isinstance(exc, SinkError) else SinkError(f"batch not delivered: {exc!r}") from exc


class BatchSink:
    """At-least-once output in one produce request per batch (the default).

    librdkafka sends one ProduceRequest per partition (confluentinc/librdkafka#1700): a batch's records
    for 8 partitions of two topics would be 16 requests, and the broker's work is per request
    (docs/hot-path.md). Here the records of each topic-partition are appended (in
    C) to one record batch with aiokafka's builder, and its producer sends every partition's batch in one
    request per broker, one request in flight; batches submitted meanwhile go together in the next one.
    ``submit`` returns at once; the worker waits for delivery before it writes RocksDB and acks."""

    def __init__(self, settings: Settings, recommendations: str, changelog: str, dlq: str) -> None:
        from stream.kafka.config import aiokafka_config

        self.topics = (recommendations, changelog, dlq)
        single = settings.topics.replication_factor <= 1
        self._config = {**aiokafka_config(settings), "client_id": f"{settings.process.app_id}-outputs",
                        # one replica: acks=1 is as durable as acks=all; more: all replicas, no duplicates
                        "acks": 1 if single else "all", "enable_idempotence": not single,
                        "linger_ms": 0, "max_batch_size": RECORD_BATCH_BYTES}
        self.producer: Any = None
        self._order: asyncio.Lock | None = None

    def submit(self, out: Outgoing) -> BatchTicket:
        return BatchTicket(asyncio.ensure_future(self._send(out)))

    async def _started(self) -> Any:
        if self.producer is None:
            from aiokafka import AIOKafkaProducer

            producer = AIOKafkaProducer(**self._config)
            try:
                await producer.start()
            except BaseException:
                await producer.stop()  # its connections and tasks; the batch fails, the next one retries
                raise
            self.producer = producer
        return self.producer

    async def _send(self, out: Outgoing) -> Delivered:
        rec_topic, cl_topic, dlq_topic = self.topics
        now_ms = int(time.time() * 1000)
        sent: list[tuple[str, int, int, Any]] = []  # (topic, partition, records, delivery future)
        if self._order is None:
            self._order = asyncio.Lock()
        # batches enter the producer whole and in order: a partition's records never overtake an earlier
        # batch's (the producer queues one record batch per partition until the request before it is out)
        async with self._order:
            producer = await self._started()
            for topic, by_partition in ((cl_topic, out.changelog), (rec_topic, out.recommendations)):
                for p, records in by_partition.items():
                    await self._enqueue(producer, topic, p, [(k, v, None) for k, v in records], now_ms, sent)
            for p, dead in out.dlq.items():
                await self._enqueue(producer, dlq_topic, p, dead, now_ms, sent)
        try:
            metas = await asyncio.gather(*(fut for _, _, _, fut in sent))
        except Exception as exc:  # noqa: BLE001 - any client error: the batch is not acked
            raise SinkError(f"batch not delivered: {exc!r}") from exc
        highest: dict[int, int] = {}
        for (topic, p, n, _), meta in zip(sent, metas):
            if topic == cl_topic:
                highest[p] = max(highest.get(p, -1), meta.offset + n - 1)
        return Delivered(highest, time.time())

    @staticmethod
    async def _enqueue(producer: Any, topic: str, partition: int, records: list[Any], now_ms: int,
                       sent: list[tuple[str, int, int, Any]]) -> None:
        builder, n = producer.create_batch(), 0
        for key, value, headers in records:
            if builder.append(timestamp=now_ms, key=key, value=value, headers=headers) is None:
                # full: it goes as it is, the rest in a new one (whose first record always fits)
                builder.close()
                sent.append((topic, partition, n, await producer.send_batch(builder, topic, partition=partition)))
                builder, n = producer.create_batch(), 0
                builder.append(timestamp=now_ms, key=key, value=value, headers=headers)
            n += 1
        if n:
            builder.close()
            sent.append((topic, partition, n, await producer.send_batch(builder, topic, partition=partition)))

    async def stop(self) -> None:
        """Deliver what is queued and close the connection (the worker's shutdown, on its loop)."""
        if self.producer is not None:
            producer, self.producer = self.producer, None
            await producer.stop()


class TransactionalSink:
    """Sends through faust's per-partition transactional producers (processing_guarantee=exactly_once)."""

    def __init__(self, app: Any, source_topic: str, recommendations: str, changelog: str, dlq: str) -> None:
        self.app = app
        self.source_topic = source_topic
        self.topics = (recommendations, changelog, dlq)

    def _transactional_id(self, partition: int) -> str:
        return transactional_id(self.app, self.source_topic, partition)

    async def send(self, out: Outgoing) -> tuple[list[tuple[int, Any]], list[Any]]:
        """Append the records to the open transactions; returns (changelog futures, all futures)."""
        rec_topic, cl_topic, dlq_topic = self.topics
        faust_producer = self.app.consumer.transactions.producer
        changelog_futs: list[tuple[int, Any]] = []
        futs: list[Any] = []
        partitions = set(out.recommendations) | set(out.changelog) | set(out.dlq)
        for p in sorted(partitions):
            tid = self._transactional_id(p)
            producer = compat.transaction_producers(faust_producer).get(tid)
            if producer is None:
                raise SinkError(f"no transactional producer for {tid} (partition revoked?)")
            async with compat.transaction_lock(faust_producer, tid):
                for key, value in out.changelog.get(p, ()):
                    fut = await producer.send(cl_topic, value, key=key, partition=p)
                    changelog_futs.append((p, fut))
                    futs.append(fut)
                for key, value in out.recommendations.get(p, ()):
                    futs.append(await producer.send(rec_topic, value, key=key, partition=p))
                for key, value, headers in out.dlq.get(p, ()):
                    futs.append(await producer.send(dlq_topic, value, key=key, partition=p, headers=headers))
        return changelog_futs, futs

    async def stop(self) -> None:
        pass  # faust owns the transactional producers
