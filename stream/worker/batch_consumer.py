"""A faust consumer that hands the input topics to the worker in micro-batches.

faust's own path creates an Event, a queue entry and at least one event-loop round trip per message
(``wait_first(callback(message), ...)`` in faust's drain loop), so that overhead, not the
computation, would set a worker's throughput (docs/hot-path.md). This subclass keeps everything else
of faust — group membership, the partition assignor, table recovery and standbys, offset commits,
transactions — and only replaces the drain loop: records of the input topics are collected up to a
size/time bound and passed as one batch to ``batch_handler``; records of every other topic (table
changelogs during recovery) still go through faust's conductor one by one.

Offsets are acked in bulk (``ack_offsets``) with the same bookkeeping as ``Consumer.ack``, so faust's
commit logic (gaps, consecutive offsets, transactions) works unchanged. In exactly-once mode the
handler holds ``commit_lock`` while it sends a batch's outputs and acks its offsets, and commits (the
choice of offsets included) and revocations take the same lock, so a transaction never holds a batch's
outputs without its offsets (or the reverse).

Takeover (kill -9 of another member, a network cut, any rebalance during a batch) relies on one invariant:

    an input record that aiokafka returns is either handed to ``batch_handler`` or lies at or after a
    position that a seek sets LATER; records are never dropped otherwise.

aiokafka advances a partition's position as it returns records and only returns records from the current
position (a seek discards what it had buffered), so a record returned and then dropped is skipped for good
unless a later seek rewinds the partition. faust's rebalance flow is: revoke (every partition; the flow
stops), assign (new generation), table recovery (changelogs), then ``perform_seek`` of the input
partitions to the committed offsets. Here:

- The consumer thread counts the seeks of the input partitions (``BatchConsumerThread.seeks``) and tags
  every fetch result with the count at the moment aiokafka returned it; both happen on the thread's loop,
  so the tag says exactly which seek's positions the records come from. During a seek the input
  partitions are paused in aiokafka (paused partitions are neither fetched nor returned, nor their
  positions moved), and they are resumed only once the event loop has taken note of the seek
  (``_ready_seek``).
- A revocation clears ``_ready_seek``; the generation's seek sets it. Input records are handed over only
  if their tag is ``_ready_seek``, when collected and again when handed over. Anything else was returned
  before a seek that is still to come or has happened since, which rewinds to the committed offsets, at or
  before those records (nothing past the committed offset is forgotten: acked offsets are what gets
  committed).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable, Callable, Mapping, Set

from faust.transport.drivers.aiokafka import Transport as AIOKafkaTransport
from faust.types import TP

from stream import compat
from stream.kafka import record_guard
from stream.worker.transactions import FreshTransactionManager

# (tp, records) pairs; records are aiokafka ConsumerRecords of one partition, in offset order
Batch = list[tuple[TP, list[Any]]]
BatchHandler = Callable[[Batch, int], Awaitable[None]]
# faust hard-codes aiokafka's fetch_max_wait_ms=1500 and leaves fetch_min_bytes at 1. aiokafka keeps one
# fetch request per broker in flight and leaves out partitions whose records are still buffered, so a
# partition drained just after a request went out waited for that request: up to 1.5 s when the other
# partitions were quiet. And with fetch_min_bytes=1 the broker answers as soon as one record arrives, so
# under a steady trickle the fetcher spins: many fetches of a record or two, each costing CPU in the
# client and the broker (docs/hot-path.md). So the broker is asked to hold a fetch until
# it has FETCH_MIN_BYTES or the batch time bound has passed: the batch fills at the broker, and a backlog
# still comes back at once.
FETCH_MIN_BYTES = 256 * 1024


def fetch_max_wait_ms(batch_max_s: float) -> int:
    """The broker-side wait: the batch time bound, at least 5 ms (no spinning) and at most 500 ms."""
    return int(min(500.0, max(5.0, batch_max_s * 1000.0)))


class Fetched(dict):
    """A fetch result (tp -> records) and the number of input seeks done when aiokafka returned it."""

    def __init__(self, records: Mapping[Any, list[Any]], seeks: int) -> None:
        super().__init__(records)
        self.seeks = seeks


class BatchConsumerThread(compat.ConsumerThreadHooks):
    seeks = 0  # seeks of the input partitions so far; read and written on this thread's loop only

    def tag_fetched(self, records: Mapping[Any, list[Any]]) -> Fetched:
        return Fetched(records, self.seeks)  # no await in between: the count these records were returned under

    async def seek_inputs_to_committed(self, topics: frozenset[str]) -> tuple[Mapping[Any, int | None], int]:
        """Pause the input partitions (aiokafka then neither fetches nor returns them), seek them to the
        committed offsets, those without one to their beginning (auto_offset_reset=earliest: aiokafka
        leaves them where they are), and count the seek. They stay paused until ``resume_inputs``.
        Returns the committed offsets of every assigned partition (what faust's seek_to_committed
        returns) and the seek's count."""
        return await self.call_thread(self._seek_inputs, topics)

    async def _seek_inputs(self, topics: frozenset[str]) -> tuple[Mapping[Any, int | None], int]:
        consumer = self.kafka_consumer()
        inputs = [tp for tp in consumer.assignment() if tp.topic in topics]
        consumer.pause(*inputs)
        committed = await consumer.seek_to_committed()
        fresh = [tp for tp in inputs if not (committed.get(tp) or 0) > 0]
        if fresh:
            await consumer.seek_to_beginning(*fresh)
        self.seeks += 1
        return committed, self.seeks

    async def resume_inputs(self, topics: frozenset[str]) -> None:
        await self.call_thread(self._resume_inputs, topics)

    async def _resume_inputs(self, topics: frozenset[str]) -> None:
        consumer = self.kafka_consumer()
        consumer.resume(*(tp for tp in consumer.assignment() if tp.topic in topics))

    def before_consumer_created(self) -> None:
        # records aiokafka cannot parse come out marked instead of stopping the fetcher (the worker dead-letters
        # them); installed before the consumer builds its fetcher
        record_guard.install()

    def consumer_created(self, consumer: Any) -> None:
        # both are read when aiokafka builds its fetcher, at start()
        compat.set_fetch_bounds(consumer, fetch_max_wait_ms(self.consumer.batch_max_s), FETCH_MIN_BYTES)

    async def log_end_offsets(self, partitions: list[TP]) -> Mapping[TP, int]:
        """The log end offsets, asked of the broker. faust's exactly_once path reads aiokafka's cached last
        stable offset instead, which is None until a fetch of that partition came back: right after a
        rebalance, recovery read -1 as the changelog's end, found the local store "ahead" of it and
        stopped the worker (ConsistencyError). A read_committed consumer's end offsets are the last
        stable offsets."""
        return await self.kafka_consumer().end_offsets(partitions)


class BatchConsumer(compat.ConsumerHooks):
    batch_handler: BatchHandler | None = None
    batch_topics: frozenset[str] = frozenset()
    batch_max_events: int = 2000
    batch_max_s: float = 0.02

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commit_lock = asyncio.Lock()
        self._seek_lock = asyncio.Lock()  # one seek of the input partitions at a time
        self._last_seek: int | None = None  # count of the seek just done by the consumer thread
        self._ready_seek: int | None = None  # count of this generation's seek, once done; None before
        self._next: dict[TP, int] = {}  # input partition -> offset of the next record to hand over, if known
        # input partition -> committed offset the last seek resumed it from (None: from its beginning); every
        # record below it is reflected in the state table (read-your-writes requests start from here)
        self.resumed_at: dict[TP, int | None] = {}

    consumer_thread_class = BatchConsumerThread

    async def seek_to_committed(self) -> Mapping[TP, int]:
        """faust's seek (``perform_seek`` calls it), with the input partitions paused and counted."""
        committed, self._last_seek = await self.consumer_thread.seek_inputs_to_committed(self.batch_topics)
        self.resumed_at = {tp: off for tp, off in committed.items() if tp.topic in self.batch_topics}
        return committed

    async def perform_seek(self) -> None:
        """Seek to the committed offsets, note the seek's count, then resume the input partitions in
        aiokafka: records returned from then on come from the positions this seek set."""
        generation = self.app.consumer_generation_id
        async with self._seek_lock:
            self._ready_seek = None
            try:
                await super().perform_seek()
                if generation == self.app.consumer_generation_id:
                    inputs = sorted(tp for tp in self.assignment() if tp.topic in self.batch_topics)
                    self._next.clear()
                    read_offsets = self.read_offsets
                    self._next.update({tp: read_offsets[tp] for tp in inputs if read_offsets.get(tp)})
                    self._ready_seek = self._last_seek
                    self.log.info("input partitions sought (generation %s): %s", generation,
                                  ", ".join(f"{tp.topic}[{tp.partition}]@{self._next.get(tp, 'beginning')}"
                                            for tp in inputs))
            finally:
                await self.consumer_thread.resume_inputs(self.batch_topics)

    async def force_commit(self, topics: Any = None, start_new_transaction: bool = True) -> bool:
        """faust's commit with the offsets CHOSEN under ``commit_lock`` too: choosing them before the lock
        let a batch send its outputs (and ack) in between, so a transaction committed those outputs
        with older offsets, and a crash before the next commit processed that batch twice."""
        async with self.commit_lock:
            await self._flush_transactions()
            return await super().force_commit(topics, start_new_transaction=start_new_transaction)

    async def _flush_transactions(self) -> None:
        """Wait until every record sent in the open transactions is on the broker. aiokafka's
        commit_transaction sends EndTxn without waiting for records still queued behind a produce
        request in flight, and records sent after it are refused: the commit would carry offsets
        without their outputs. (The worker also waits for each batch's delivery before acking it.)"""
        if not self.in_transaction:
            return
        producers = compat.transaction_producers(self.transactions.producer)
        for producer in list(producers.values()):
            await producer.flush()

    async def on_partitions_revoked(self, revoked: Set[TP]) -> None:
        """A revocation first stops input records from being handed over until the next generation's seek
        (a batch being collected is dropped: that seek rewinds its partitions to the committed offsets).

        exactly_once: then commit what was acked before faust forgets the acks. faust drops the acked
        offsets of revoked partitions but keeps the open transactions of partitions assigned again
        to this worker, so those outputs would later be committed without their offsets (and be
        produced again when the batch is reprocessed). Holding ``commit_lock`` until the revocation is
        done also keeps a batch from sending outputs in between (``Pipeline`` re-checks the flow)."""
        self._ready_seek = None
        self._next.clear()
        if not self.in_transaction:
            await super().on_partitions_revoked(revoked)
            return
        async with self.commit_lock:
            try:
                await self._flush_transactions()
                await super().force_commit(start_new_transaction=True)
            except Exception as exc:  # noqa: BLE001 - outputs and offsets may disagree: crash, restart recovers
                self.log.exception("commit before revocation failed: %r", exc)
                await self.crash(exc)
                raise
            await super().on_partitions_revoked(revoked)

    async def _fetch(self, timeout: float) -> dict[TP, list[Any]] | None:
        """Records returned by aiokafka; None when stopping, or when the flow was stopped meanwhile (a
        revocation: its input records are not handed over, and recovery seeks the changelogs again)."""
        records, _active = await self.wait_next_records(timeout)
        if records is None or self.should_stop or not self.flow_active:
            return None
        return records

    async def drain(self, fetcher: Any) -> None:  # pragma: no cover - exercised by integration tests
        consumer_should_stop, fetcher_should_stop = self.stop_checks(fetcher)
        # The size/time bound counts from when the previous batch was handed over, not from when this one's
        # first record is seen: records that arrived while the previous batch was computed have waited
        # already, so a batch starts at once when that took longer than the bound. Records already
        # fetched are still taken (up to the size bound) once the time is up.
        handed_over = 0.0
        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                batch, seek = await self._collect(handed_over)
                if not batch or seek != self._ready_seek or self.should_stop:
                    await asyncio.sleep(0)
                    continue
                at = await self._hand_over(batch, seek)
                if at is not None:
                    handed_over = at
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                self.log.info("Broker stopped consumer, shutting down...")
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                self.log.info("Consumer shutting down for user cancel.")
                return
            raise
        except Exception as exc:
            self.log.exception("Drain messages raised: %r", exc)
            raise

    async def _collect(self, handed_over: float) -> tuple[dict[TP, list[Any]], int | None]:
        """One batch of input records (up to the size/time bound) and the seek count they were fetched
        under; records of other topics go to faust on the way."""
        next_offset = self._next
        seek: int | None = None  # the seek count of the records collected
        batch: dict[TP, list[Any]] = {}
        n = 0
        deadline = 0.0
        timeout = 1.0
        while True:
            records = await self._fetch(timeout)
            if records is None or self.should_stop:
                break
            fetched_under = getattr(records, "seeks", seek) if records else seek
            if fetched_under != seek:
                batch, n, deadline, seek = {}, 0, 0.0, fetched_under  # see the module docstring
            ready = seek is not None and seek == self._ready_seek
            before = n
            for tp, recs in records.items():
                if tp.topic in self.batch_topics:
                    if not ready:
                        continue  # returned before a seek that rewinds past them
                    first = next_offset.get(tp)
                    if first is not None and recs and recs[0].offset < first:
                        recs = [r for r in recs if r.offset >= first]
                    if recs:
                        batch.setdefault(tp, []).extend(recs)
                        n += len(recs)
                else:
                    await self._pass_on(tp, recs)
            if n == 0:
                break
            now = time.monotonic()
            if not deadline:
                deadline = max(now, handed_over + self.batch_max_s)
            elif n == before and now >= deadline:
                break  # time is up and nothing more was waiting
            timeout = max(0.0, deadline - now)
            if n >= self.batch_max_events:
                break
        return batch, seek

    async def _pass_on(self, tp: TP, recs: list[Any]) -> None:
        """Records of a topic that is not an input (a changelog during recovery): to faust one by one."""
        read_offset = self.read_offsets
        for record in recs:
            detail = record_guard.unreadable_detail(record)
            if detail is not None:
                # not an input (a changelog): there is no dead letter for it; its offset is
                # passed like a gap, as faust does for transaction markers
                self.log.error("skipped an unreadable record at %s offset %d: %s", tp, record.offset, detail)
                read_offset[tp] = record.offset
                continue
            message = self.to_message(tp, record)
            r0 = read_offset.get(tp)
            if r0 is None or message.offset >= r0:
                await self.callback(message)
                read_offset[tp] = message.offset

    async def _hand_over(self, batch: dict[TP, list[Any]], seek: int | None) -> float | None:
        """Gaps noted, offsets advanced, the batch handled and a commit if one is due; returns when it was
        handed over, or None when a revocation came while the gaps were added (nothing handed over)."""
        read_offset = self.read_offsets
        acks_enabled_for = self.app.topics.acks_enabled_for
        # gaps (transaction markers, compaction) must be known before the offsets are acked
        for tp, recs in batch.items():
            if acks_enabled_for(tp.topic):
                prev = read_offset.get(tp)
                for r in recs:
                    if prev and r.offset - prev > 1:
                        await self.add_gap(tp, prev + 1, r.offset)
                    prev = r.offset
        if seek != self._ready_seek:
            return None  # revoked while the gaps were added
        for tp, recs in batch.items():
            read_offset[tp] = recs[-1].offset
            self._next[tp] = recs[-1].offset + 1
        assert self.batch_handler is not None, "BatchConsumer.batch_handler is not set"
        handed_over = time.monotonic()
        # what a faust stream records per event: the livelock detector reports a partition whose
        # records wait while this time gets old, and one that never had any as never started
        inbound = self.app.monitor.stream_inbound_time
        for tp in batch:
            inbound[tp] = handed_over
        await self.batch_handler(list(batch.items()), self.app.consumer_generation_id)
        await self.commit_if_due()
        return handed_over


class BatchTransport(AIOKafkaTransport):
    """faust's aiokafka transport with the batching consumer (``app.transport = BatchTransport(...)``)."""

    Consumer = BatchConsumer
    TransactionManager = FreshTransactionManager
