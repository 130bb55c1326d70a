"""Every place gruflow reaches below the public API of faust-streaming, aiokafka, mode and prometheus_client.

Upgrading one of them means reading this file (and docs/upgrading.md, which explains each touch):
the rest of gruflow uses only the public names defined here. tests/contract pins every touch against
the installed versions (tests/contract/contractkit.py lists them; test_inventory.py checks that no
other product module touches a private name).

- ``ConsumerHooks`` / ``ConsumerThreadHooks``: faust's aiokafka consumer and its consumer thread, with
  the private methods gruflow overrides routed to public ones (``drain``, ``tag_fetched``, ...) and
  faust's offset bookkeeping exposed as properties.
- ``RecoveryHooks``: faust's table recovery with a hook before its offset check.
- Functions for single touches: transactional producers, RocksDB partitions, aiokafka's fetch bounds and
  record-set class, histogram internals.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np
from aiokafka.consumer import fetcher as _aiokafka_fetcher
from faust.tables.recovery import Recovery
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread
from faust.transport.drivers.aiokafka import Consumer as AIOKafkaConsumer
from faust.types import TP
from faust.types.tuples import ack_lock


# --- faust's consumer -------------------------------------------------------------------------------------
class ConsumerThreadHooks(AIOKafkaConsumerThread):
    """faust's consumer thread (it owns the aiokafka consumer and runs on its own loop)."""

    async def _fetch_records(self, consumer: Any, active_partitions: Any, timeout: float | None = None,
                             max_records: int | None = None) -> Any:
        records = await super()._fetch_records(consumer, active_partitions, timeout=timeout,
                                               max_records=max_records)
        return self.tag_fetched(records)  # synchronous: nothing runs on this loop in between

    def tag_fetched(self, records: Mapping[Any, list[Any]]) -> Any:
        """Called on the thread's loop with every fetch result as aiokafka returns it."""
        return records

    def _create_worker_consumer(self, transport: Any) -> Any:
        self.before_consumer_created()
        consumer = super()._create_worker_consumer(transport)
        self.consumer_created(consumer)
        return consumer

    def before_consumer_created(self) -> None:
        """Called before faust builds the aiokafka consumer."""

    def consumer_created(self, consumer: Any) -> None:
        """Called with the aiokafka consumer faust built, before it starts."""

    async def _highwaters(self, partitions: list[TP]) -> Mapping[TP, int]:
        return await self.log_end_offsets(partitions)

    async def log_end_offsets(self, partitions: list[TP]) -> Mapping[TP, int]:
        """What faust's ``highwaters`` returns (runs on the thread's loop)."""
        return await super()._highwaters(partitions)

    def kafka_consumer(self) -> Any:
        """The aiokafka consumer (call on the thread's loop)."""
        return self._ensure_consumer()


class ConsumerHooks(AIOKafkaConsumer):
    """faust's aiokafka consumer with its drain loop replaceable (``drain``) and its offset bookkeeping
    (read offsets, acks, commit cadence) reachable under public names."""

    consumer_thread_class: type[ConsumerThreadHooks] = ConsumerThreadHooks

    def _new_consumer_thread(self) -> ConsumerThreadHooks:
        return self.consumer_thread_class(self, loop=self.loop, beacon=self.beacon)

    async def _drain_messages(self, fetcher: Any) -> None:
        await self.drain(fetcher)

    async def drain(self, fetcher: Any) -> None:
        """Replaces faust's drain loop (``Consumer._drain_messages``)."""
        await super()._drain_messages(fetcher)

    @property
    def consumer_thread(self) -> Any:
        return self._thread

    @property
    def read_offsets(self) -> dict[TP, int | None]:
        """faust's last offset handed to the app per partition (the dict itself: writes are faust's too)."""
        return self._read_offset

    @property
    def committed_offsets(self) -> Mapping[TP, int | None]:
        return self._committed_offset

    def stop_checks(self, fetcher: Any) -> tuple[Callable[[], bool], Callable[[], bool]]:
        """(consumer stopping, fetcher stopping): mode's Service events."""
        return self._stopped.is_set, fetcher._stopped.is_set

    async def wait_next_records(self, timeout: float) -> tuple[Any, Any]:
        return await self._wait_next_records(timeout)

    def to_message(self, tp: TP, record: Any) -> Any:
        return self._to_message(tp, record)

    async def add_gap(self, tp: TP, offset_from: int, offset_to: int) -> None:
        await self._add_gap(tp, offset_from, offset_to)

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

    async def commit_if_due(self) -> None:
        """Commit when faust's commit_every acks have accumulated (what faust's drain loop does)."""
        commit_every = self._commit_every
        if commit_every is not None and self._n_acked >= commit_every:
            self._n_acked = 0
            await self.commit()


def set_fetch_bounds(consumer: Any, max_wait_ms: int, min_bytes: int) -> None:
    """aiokafka's fetch wait and minimum size (faust hard-codes them); read when the consumer starts."""
    consumer._fetch_max_wait_ms = max_wait_ms
    consumer._fetch_min_bytes = min_bytes


def use_record_set_class(cls: type) -> None:
    """Make aiokafka's fetcher build ``cls`` over each fetched partition's bytes instead of its
    MemoryRecords (its only use there); ``cls`` must behave like MemoryRecords, and its records like those
    ``PartitionRecords._consumer_record`` reads."""
    _aiokafka_fetcher.MemoryRecords = cls


# --- faust's transactional producers (exactly_once) -------------------------------------------------------
def transaction_producers(faust_producer: Any) -> dict[str, Any]:
    """transactional id -> aiokafka producer, as faust keeps them (empty outside exactly_once)."""
    return getattr(faust_producer, "_transaction_producers", {})


def transaction_lock(faust_producer: Any, transactional_id: str) -> Any:
    """The lock faust holds while it sends in that transaction."""
    return faust_producer._trn_locks[transactional_id]


# --- faust's RocksDB store and table recovery --------------------------------------------------------------
def rocksdb_partition(store: Any, partition: int) -> Any:
    """The rocksdict database of one partition of a faust RocksDB store (opened on first use)."""
    return store._db_for_partition(partition)


def rocksdb_key_index(store: Any) -> dict[bytes, int]:
    """faust's key -> partition index, kept in step with writes done outside faust."""
    return store._key_index


def rocksdb_open_partitions(store: Any) -> list[Any]:
    return list(store._dbs.values())


class RecoveryHooks(Recovery):
    """faust's table recovery with ``check_offsets`` called where faust has read the persisted offsets of a
    set of partitions (active, then standby) and before its consistency check and its seeks."""

    async def _build_offsets(self, consumer: Any, tps: Any, destination: Any, title: str) -> None:
        await self.check_offsets(tps, destination)
        await super()._build_offsets(consumer, tps, destination, title)

    async def check_offsets(self, tps: Any, destination: Any) -> None:
        """May set ``destination[tp] = None``: faust then reads that changelog from its start."""


def install_recovery(app: Any, make: Callable[..., Recovery], **kwargs: Any) -> None:
    """Give the app's table manager its Recovery (before the worker starts: faust creates its own lazily,
    on first use of ``app.tables.recovery``)."""
    tables = app.tables
    tables._recovery = make(app, tables, beacon=tables.beacon, loop=tables.loop, **kwargs)


# --- prometheus_client ------------------------------------------------------------------------------------
def observe_many(histogram: Any, values: np.ndarray) -> None:
    """Histogram.observe for many values at once (one bucket pass in numpy instead of N Python calls)."""
    if values.shape[0] == 0:
        return
    # prometheus_client keeps per-bucket (non-cumulative) counters and a sum
    bounds = np.asarray(histogram._upper_bounds, dtype=np.float64)
    idx = np.searchsorted(bounds, values, side="left")
    counts = np.bincount(idx, minlength=bounds.shape[0])
    for i, c in enumerate(counts.tolist()):
        if c:
            histogram._buckets[i].inc(c)
    histogram._sum.inc(float(values.sum()))

