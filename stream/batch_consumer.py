"""A faust consumer that hands the input topics to the worker in micro-batches.

faust's own path creates an Event, a queue entry and at least one event-loop round trip per message
(``wait_first(callback(message), ...)`` in ``Consumer._drain_messages``), which caps a worker at a few
thousand events/s (FIELD-NOTES). This subclass keeps everything else of faust — group membership, the
partition assignor, table recovery and standbys, offset commits, transactions — and only replaces the
drain loop: records of the input topics are collected up to a size/time bound and passed as one batch
to ``batch_handler``; records of every other topic (table changelogs during recovery) still go
through faust's conductor one by one.

Offsets are acked in bulk (``ack_offsets``) with the same bookkeeping as ``Consumer.ack``, so faust's
commit logic (gaps, consecutive offsets, transactions) works unchanged. In exactly-once mode the
handler holds ``commit_lock`` while it sends a batch's outputs and acks its offsets, and commits (the
choice of offsets included) and revocations take the same lock, so a transaction never holds a batch's
outputs without its offsets (or the reverse).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable, Callable, Sequence, Set

from aiokafka import TopicPartition
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread
from faust.transport.drivers.aiokafka import Consumer as AIOKafkaConsumer
from faust.transport.drivers.aiokafka import Transport as AIOKafkaTransport
from faust.types import TP
from faust.types.tuples import ack_lock

from stream import record_guard

# (tp, records) pairs; records are aiokafka ConsumerRecords of one partition, in offset order
Batch = list[tuple[TP, list[Any]]]
BatchHandler = Callable[[Batch, int], Awaitable[None]]
# faust hard-codes aiokafka's fetch_max_wait_ms=1500 and leaves fetch_min_bytes at 1. aiokafka keeps one
# fetch request per broker in flight and leaves out partitions whose records are still buffered, so a
# partition drained just after a request went out waited for that request: up to 1.5 s when the other
# partitions were quiet. And with fetch_min_bytes=1 the broker answers as soon as one record arrives, so
# under a steady trickle the fetcher spins (measured at 2,000 events/s on a warm embedded broker: ~600
# fetches/s of a record or two, 70-80% of a core in the client and a tenth of a core more in the broker,
# against 42 fetches/s and 25-31% with the settings below). So the broker is asked to hold a fetch until
# it has FETCH_MIN_BYTES or the batch time bound has passed: the batch fills at the broker, and a backlog
# still comes back at once.
FETCH_MIN_BYTES = 256 * 1024
SEEK_WAIT_S = 30.0  # how long a dropped batch waits for a running seek before seeking back itself


def fetch_max_wait_ms(batch_max_s: float) -> int:
    """The broker-side wait: the batch time bound, at least 5 ms (no spinning) and at most 500 ms."""
    return int(min(500.0, max(5.0, batch_max_s * 1000.0)))


class BatchConsumerThread(AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> Any:
        # records aiokafka cannot parse come out marked instead of stopping the fetcher (the worker dead-letters
        # them); installed before the consumer builds its fetcher
        record_guard.install()
        consumer = super()._create_worker_consumer(transport)
        # both are read when aiokafka builds its fetcher, at start()
        consumer._fetch_max_wait_ms = fetch_max_wait_ms(self.consumer.batch_max_s)
        consumer._fetch_min_bytes = FETCH_MIN_BYTES
        return consumer


class BatchConsumer(AIOKafkaConsumer):
    batch_handler: BatchHandler | None = None
    batch_topics: frozenset[str] = frozenset()
    batch_max_events: int = 2000
    batch_max_s: float = 0.02

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commit_lock = asyncio.Lock()
        self._seeks = 0  # perform_seek calls started so far
        self._sought_generation = -1  # the generation whose stream partitions were last sought
        self._held: set[TP] = set()  # input partitions whose resume waits for that seek

    def _new_consumer_thread(self) -> BatchConsumerThread:
        return BatchConsumerThread(self, loop=self.loop, beacon=self.beacon)

    def ack_offsets(self, tp: TP, offsets: Sequence[int]) -> int:
        """Mark many offsets of one partition processed (what ``Consumer.ack`` does per message)."""
        if not self.app.topics.acks_enabled_for(tp.topic):
            return 0
        n = 0
        with ack_lock:
            committed = self._committed_offset[tp]
            index = self._acked_index[tp]
            acked = self._acked[tp]
            for offset in offsets:
                if (committed is None or offset >= committed) and offset not in index:
                    index.add(offset)
                    acked.append(offset)
                    n += 1
            self._n_acked += n
        return n

    def resume_partitions(self, tps: Any) -> None:
        """faust resumes the input partitions when recovery ends BEFORE it seeks them to the committed
        offsets: records fetched in between were processed, then fetched and processed again after the
        seek (the same outputs twice in one transaction). Input partitions stay paused until this
        generation's seek is done (``perform_seek`` resumes them)."""
        tpset = set(tps)
        if self.in_transaction and self._sought_generation != self.app.consumer_generation_id:
            held = {tp for tp in tpset if tp.topic in self.batch_topics}
            self._held |= held
            tpset -= held
        super().resume_partitions(tpset)

    async def perform_seek(self) -> None:
        """Seek to the committed offsets, then resume the held input partitions. A batch collected while
        a seek ran is dropped by the drain loop, which then seeks again (records fetched after the first
        seek would otherwise be skipped). ``_seeks`` is odd while a seek runs. exactly_once only
        (at-least-once keeps faust's behaviour)."""
        if not self.in_transaction:
            await super().perform_seek()
            return
        self._seeks += 1
        generation = self.app.consumer_generation_id
        try:
            await super().perform_seek()
            # aiokafka leaves partitions without a committed offset where they are, so records fetched before
            # the seek and dropped would be skipped: start those at the beginning (auto_offset_reset=earliest)
            fresh = [tp for tp in self.assignment()
                     if tp.topic in self.batch_topics and not self._read_offset.get(tp)]
            if fresh:
                await self._thread.seek_to_beginning(*(TopicPartition(tp.topic, tp.partition) for tp in fresh))
        finally:
            self._seeks += 1
        if generation == self.app.consumer_generation_id:
            self._sought_generation = generation
            held, self._held = self._held, set()
            super().resume_partitions(held & self.assignment())

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
        producers = getattr(self.transactions.producer, "_transaction_producers", {})
        for producer in list(producers.values()):
            await producer.flush()

    async def on_partitions_revoked(self, revoked: Set[TP]) -> None:
        """exactly_once: commit what was acked before faust forgets the acks. faust drops the acked
        offsets of revoked partitions but keeps the open transactions of partitions assigned again
        to this worker, so those outputs would later be committed without their offsets (and be
        produced again when the batch is reprocessed). Holding ``commit_lock`` until the revocation is
        done also keeps a batch from sending outputs in between (``Pipeline`` re-checks the flow)."""
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
        records, _active = await self._wait_next_records(timeout)
        if records is None or self.should_stop:
            return None
        if not self.flow_active:
            # fetched while a rebalance stopped the flow: drop, and go back to the committed offsets
            try:
                await self.perform_seek()
            except Exception as exc:  # noqa: BLE001 - faust does the same: the next fetch retries
                self.log.warning("seek after stopped flow failed: %r", exc)
            return None
        return records

    async def _drain_messages(self, fetcher: Any) -> None:  # pragma: no cover - exercised by integration tests
        callback = self.callback
        consumer_should_stop = self._stopped.is_set
        fetcher_should_stop = fetcher._stopped.is_set
        read_offset = self._read_offset
        acks_enabled_for = self.app.topics.acks_enabled_for
        # The size/time bound counts from when the previous batch was handed over, not from when this one's
        # first record is seen: records that arrived while the previous batch was computed have waited
        # already, so a batch starts at once when that took longer than the bound. Records already
        # fetched are still taken (up to the size bound) once the time is up.
        handed_over = 0.0
        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                generation = self.app.consumer_generation_id
                seeks = self._seeks
                batch: dict[TP, list[Any]] = {}
                n = 0
                deadline = 0.0
                timeout = 1.0
                while True:
                    records = await self._fetch(timeout)
                    if records is None or self.should_stop:
                        break
                    if self.app.consumer_generation_id != generation:
                        break  # rebalanced under us: this batch is stale, the next loop refetches
                    before = n
                    for tp, recs in records.items():
                        if tp.topic in self.batch_topics:
                            r0 = read_offset.get(tp)
                            if r0 is not None:
                                recs = [r for r in recs if r.offset >= r0]
                            if recs:
                                batch.setdefault(tp, []).extend(recs)
                                n += len(recs)
                        else:
                            for record in recs:
                                detail = record_guard.unreadable_detail(record)
                                if detail is not None:
                                    # not an input (a changelog): there is no dead letter for it; its offset is
                                    # passed like a gap, as faust does for transaction markers
                                    self.log.error("skipped an unreadable record at %s offset %d: %s",
                                                   tp, record.offset, detail)
                                    read_offset[tp] = record.offset
                                    continue
                                message = self._to_message(tp, record)
                                r0 = read_offset.get(tp)
                                if r0 is None or message.offset >= r0:
                                    await callback(message)
                                    read_offset[tp] = message.offset
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
                if not batch or self.app.consumer_generation_id != generation or self.should_stop \
                        or self._seeks != seeks:
                    if batch and self._seeks != seeks and not self.should_stop \
                            and self.app.consumer_generation_id == generation:
                        # a seek ran while this batch was collected: some of its records may come from the new
                        # position, where the fetcher has moved past them. Once that seek is done (it may still
                        # be running: a batch dropped then, without seeking back, was skipped for good and its
                        # offsets later acked as a gap), go back to the committed offsets so that dropping the
                        # batch skips nothing.
                        waited = time.monotonic() + SEEK_WAIT_S
                        while self._seeks % 2 and not self.should_stop and time.monotonic() < waited:
                            await asyncio.sleep(0.01)
                        self.log.info("a batch of %d records was collected across a seek: dropped, seeking back "
                                      "to the committed offsets", n)
                        try:
                            await self.perform_seek()
                        except Exception as exc:  # noqa: BLE001 - as in _fetch: a failed seek is retried later
                            self.log.warning("seek after a dropped batch failed: %r", exc)
                    await asyncio.sleep(0)
                    continue
                # gaps (transaction markers, compaction) must be known before the offsets are acked
                for tp, recs in batch.items():
                    if acks_enabled_for(tp.topic):
                        prev = read_offset.get(tp)
                        for r in recs:
                            if prev and r.offset - prev > 1:
                                await self._add_gap(tp, prev + 1, r.offset)
                            prev = r.offset
                assert self.batch_handler is not None, "BatchConsumer.batch_handler is not set"
                handed_over = time.monotonic()
                # what a faust stream records per event: the livelock detector reports a partition whose
                # records wait while this time gets old, and one that never had any as never started
                inbound = self.app.monitor.stream_inbound_time
                for tp in batch:
                    inbound[tp] = handed_over
                await self.batch_handler(list(batch.items()), generation)
                if self.app.consumer_generation_id == generation and self._seeks == seeks:
                    for tp, recs in batch.items():
                        read_offset[tp] = recs[-1].offset
                commit_every = self._commit_every
                if commit_every is not None and self._n_acked >= commit_every:
                    self._n_acked = 0
                    await self.commit()
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


class BatchTransport(AIOKafkaTransport):
    """faust's aiokafka transport with the batching consumer (``app.transport = BatchTransport(...)``)."""

    Consumer = BatchConsumer
