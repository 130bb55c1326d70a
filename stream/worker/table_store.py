"""The faust Table adapter of ``state.store.StateStore``: per-partition RocksDB reads and writes in bulk.

faust's Table API works one key at a time and needs a "current event" to know the partition; the
batch path knows the partition of every event, so it reads with one multi-get per partition and writes
one RocksDB WriteBatch per partition. The changelog records are produced by the worker's sink (in
bulk, before the local write); ``mark_changelog_offsets`` then records how far the local store has
caught up with the changelog, exactly as faust does after its own changelog sends, so recovery after
a restart only replays what is newer.

The number of users per partition is exact and cheap to read: ``count_partitions`` counts the keys of
the active partitions once after each recovery (faust's changelog replay writes around this class), and
``write_partition`` keeps the counts up to date from then on. RocksDB's own key estimate is no user
count (it counts overwritten and deleted keys until a compaction drops them).

A local store can also be AHEAD of its changelog: its persisted offset names a record the changelog
does not have, because the cluster was replaced (an embedded broker without a data dir, a new cluster)
or the topic was recreated. faust then raises ConsistencyError at every start, a crash loop that only
deleting the data dir ends. ``ChangelogGuardRecovery`` catches that case first: it logs one error, wipes
the stale partitions (their records and persisted offsets) and lets faust's recovery rebuild them from
the changelog as it is.

A changelog can also end with an OLDER state of a user than one before it: under at_least_once nothing
fences a worker that stood still past its session timeout, so its in-flight records land after those of
the worker that took its partitions over. Replaying the changelog last-record-wins would hand the next
owner that stale state while the group's committed offsets are past the events it misses.
``StateTable`` therefore applies a changelog record only if it is not superseded (``state.codec.supersedes``)
by the state already stored, or applied earlier in the same batch, for its key.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Awaitable, Callable, Collection, Iterable, Iterator, Mapping, Sequence

import faust
from aiokafka.partitioner import murmur2
from faust.types import TP

from state.codec import StateCodecError, UserState, applied_offsets, decode, supersedes
from stream import compat

log = logging.getLogger("gruflow.worker")
_WIPE_CHUNK = 10_000  # deletes per RocksDB write batch while wiping a partition


class TableStore:
    def __init__(self, table: Any, partitions: int) -> None:
        self.table = table
        self.partitions = partitions
        self.corrupt = 0  # undecodable records met (treated as absent, overwritten by the next event)
        self._corrupt_keys: set[bytes] = set()  # stored but undecodable: overwriting one creates no user
        self._users: dict[int, int] = {}  # partition -> user records, for the partitions counted since recovery
        self._uncommitted: set[int] = set()  # partitions whose local store may hold aborted writes
        self.on_superseded: Callable[[int], None] = lambda n: None  # stale changelog records skipped

    @property
    def _store(self) -> Any:
        return self.table.data

    def partition_for(self, key: bytes) -> int:
        return (murmur2(key) & 0x7FFFFFFF) % self.partitions

    def _db(self, partition: int) -> Any:
        return compat.rocksdb_partition(self._store, partition)

    # --- batch API (the worker) ---------------------------------------------------------------
    def get_partition(self, partition: int, keys: Sequence[bytes]) -> dict[bytes, UserState]:
        return self.get_from(self._db(partition), keys) if keys else {}

    def partition_db(self, partition: int) -> Any:
        """The database handle of one partition, for ``get_from`` in another thread: resolved on the event
        loop, where faust opens and drops partitions, so another thread never opens one by itself."""
        return self._db(partition)

    def get_from(self, db: Any, keys: Sequence[bytes]) -> dict[bytes, UserState]:
        """The states of ``keys`` in one partition's database (a multi-get; RocksDB reads are thread-safe)."""
        if not keys:
            return {}
        values = db[list(keys)]
        out: dict[bytes, UserState] = {}
        for key, raw in zip(keys, values):
            if raw is not None:
                try:
                    out[key] = decode(raw)
                except StateCodecError:
                    self.corrupt += 1
                    self._corrupt_keys.add(key)
        return out

    def write_partition(self, partition: int, records: Sequence[tuple[bytes, bytes | None]],
                        created: Collection[bytes] | None = None) -> None:
        """Apply encoded records (None = delete) to the local RocksDB of one partition.

        ``created``: the keys of ``records`` the caller read as absent, which the records create; the
        caller then deletes only keys it read as present. None: each key is looked up here instead."""
        import rocksdict

        store = self._store
        db = self._db(partition)
        counted = partition in self._users
        if counted and created is None:
            present = db[[key for key, _ in records]]
            created = {key for (key, value), old in zip(records, present) if old is None and value is not None}
            deleted = sum(1 for (_, value), old in zip(records, present) if old is not None and value is None)
        else:
            deleted = sum(1 for _, value in records if value is None)
        batch = rocksdict.WriteBatch(raw_mode=True)
        index = compat.rocksdb_key_index(store)
        new = 0
        for key, value in records:
            if value is None:
                batch.delete(key)
                index.pop(key, None)
            else:
                batch.put(key, value)
                index[key] = partition
                if counted and key in created:  # type: ignore[operator]
                    if key in self._corrupt_keys:
                        self._corrupt_keys.discard(key)  # it was stored already
                    else:
                        new += 1
        db.write(batch)
        if counted:
            self._users[partition] += new - deleted

    def mark_changelog_offsets(self, offsets: Mapping[int, int], *, on_commit: bool = False) -> None:
        topic = self.table.changelog_topic.get_topic_name()
        for partition, offset in offsets.items():
            tp = TP(topic, partition)
            if on_commit:
                self.table.app.tables.persist_offset_on_commit(self._store, tp, offset)
            else:
                self._store.set_persisted_offset(tp, offset)

    def replay_filter(self, records: Sequence[tuple[int, bytes, bytes | None]]) -> list[bool]:
        """For changelog records (partition, key, value) in changelog order: which ones to apply, compared with
        what the partitions' local stores hold now (``newest_records`` below). Skipped ones are logged and counted."""
        by_partition: dict[int, list[int]] = {}
        for i, (partition, _, _) in enumerate(records):
            by_partition.setdefault(partition, []).append(i)
        keep = [True] * len(records)
        for partition, indexes in by_partition.items():
            keys = list({records[i][1] for i in indexes if records[i][2] is not None})
            stored: dict[bytes, tuple[int, ...]] = {}
            for key, raw in zip(keys, self._db(partition)[keys] if keys else ()):
                if raw is not None:
                    try:
                        stored[key] = applied_offsets(raw)
                    except StateCodecError:
                        pass  # an undecodable stored record is no newer than anything
            for i, kept in zip(indexes, newest_records([records[i][1:] for i in indexes], stored)):
                keep[i] = kept
        skipped = keep.count(False)
        if skipped:
            log.warning("changelog replay (recovery or standby) skipped %d state record(s) older than the state "
                        "already applied for their user (late writes of a worker that had lost the partition)", skipped)
            self.on_superseded(skipped)
        return keep

    def wipe_partition(self, partition: int) -> int:
        """Delete every record of one partition's local store, faust's persisted offset included (so that
        recovery reads its changelog from the start). Returns the number of keys deleted."""
        import rocksdict

        db = self._db(partition)
        index = compat.rocksdb_key_index(self._store)
        n = 0
        batch = rocksdict.WriteBatch(raw_mode=True)
        it = db.iter()  # an implicit snapshot: the deletes below do not disturb it
        it.seek_to_first()
        while it.valid():
            key = it.key()
            batch.delete(key)
            index.pop(key, None)
            n += 1
            if n % _WIPE_CHUNK == 0:
                db.write(batch)
                batch = rocksdict.WriteBatch(raw_mode=True)
            it.next()
        db.write(batch)
        return n

    def mark_uncommitted(self) -> None:
        """exactly_once, in a running worker that was fenced or frozen: its open transactions were aborted, but
        their writes reached the local store before the commit (as after an unclean exit, which the worker's
        start handles in stream/worker/main.py). Every partition is rebuilt from the committed changelog at
        its next recovery, else a key the new owner had not written yet would keep its aborted state."""
        self._uncommitted = set(range(self.partitions))

    def take_uncommitted(self, tps: Iterable[TP]) -> list[TP]:
        """Those of ``tps`` marked by ``mark_uncommitted``, wiped now (and unmarked) for a rebuild."""
        out = [tp for tp in tps if tp.partition in self._uncommitted]
        for tp in out:
            self._uncommitted.discard(tp.partition)
            self.wipe_partition(tp.partition)
        if out:
            log.warning("exactly_once: rebuilding %d partition(s) of the state table from the committed changelog "
                        "(this worker was fenced or frozen with transactions open)", len(out))
        return out

    def has_records(self, partition: int) -> bool:
        """Whether the partition's local store holds any user record (faust's offset key aside)."""
        return next(iter(self.iter_partition(partition)), None) is not None

    def on_stale_changelog(self, stale: Mapping[TP, tuple[int, int]]) -> None:
        """The local store is ahead of these changelog partitions: say so once, then wipe them."""
        log.error(
            "the changelog is behind the local state store in %s: %s. The Kafka cluster was replaced or the "
            "changelog topic recreated since this data dir was written; these partitions are rebuilt from the "
            "changelog as it is now (users' state the changelog lost is lost)",
            Path(self._store.path), "; ".join(
                f"{tp.topic}[{tp.partition}] local offset {persisted} >= changelog end offset {end}" if persisted >= 0
                else f"{tp.topic}[{tp.partition}] local records (no persisted offset), changelog empty"
                for tp, (persisted, end) in sorted(stale.items())))
        for tp in stale:
            self.wipe_partition(tp.partition)

    def iter_partition(self, partition: int) -> Iterator[tuple[bytes, bytes]]:
        """Every stored record of one partition (TTL sweeps, tools); skips faust's offset key."""
        db = self._db(partition)
        offset_key = self._store.offset_key
        it = db.iter()
        it.seek_to_first()
        while it.valid():
            key = it.key()
            if key != offset_key:
                yield key, it.value()
            it.next()

    def count_partitions(self, partitions: Sequence[int]) -> None:
        """Count the users of these partitions (a key scan each) and forget the counts of all others.
        Synchronous on purpose: no write can land between the scan and the count taking over."""
        offset_key = self._store.offset_key
        counts = {}
        for p in partitions:
            counts[p] = sum(1 for key in self._db(p).keys() if key != offset_key)
        self._users = counts

    def users(self, partitions: Sequence[int]) -> int:
        """Users in these partitions, exactly (0 for a partition not counted since the last recovery)."""
        return sum(self._users.get(p, 0) for p in partitions)

    def memory_bytes(self) -> int:
        """Memtables + block cache in use, over every partition database open (actives and standbys)."""
        total = 0
        for db in compat.rocksdb_open_partitions(self._store):
            try:
                for prop in ("rocksdb.cur-size-all-mem-tables", "rocksdb.block-cache-usage"):
                    total += int(db.property_int_value(prop) or 0)
            except Exception:  # noqa: BLE001 - a metric; a database closing in a rebalance counts as 0
                pass
        return total

    def disk_bytes(self) -> int:
        path = Path(self._store.path)
        if not path.exists():
            return 0
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())

    # --- read side of the StateStore protocol (tools): partition from the key, like the producers.
    # Writes go through the worker only: a local write without its changelog record would be lost
    # at the next recovery.
    def get_many(self, keys: Sequence[bytes]) -> dict[bytes, UserState]:
        out: dict[bytes, UserState] = {}
        by_p: dict[int, list[bytes]] = {}
        for k in keys:
            by_p.setdefault(self.partition_for(k), []).append(k)
        for p, ks in by_p.items():
            out.update(self.get_partition(p, ks))
        return out


# --------------------------------------------------------------------------- stale changelog records


def newest_records(records: Sequence[tuple[bytes, bytes | None]],
                   stored: Mapping[bytes, tuple[int, ...]]) -> list[bool]:
    """For one partition's changelog records (key, value; None = tombstone) in changelog order, given the
    applied offsets of the states stored before them: whether to apply each. A state record is skipped when
    the newest state of its key so far supersedes it; everything else is applied as faust would (last record
    wins), including tombstones and records whose offsets cannot be read or compared."""
    newest: dict[bytes, tuple[int, ...] | None] = dict(stored)
    keep = []
    for key, value in records:
        offsets: tuple[int, ...] | None = None
        if value is not None:
            try:
                offsets = applied_offsets(value)
            except StateCodecError:
                pass
        current = newest.get(key)
        if offsets is not None and current is not None and supersedes(current, offsets):
            keep.append(False)
            continue
        newest[key] = offsets
        keep.append(True)
    return keep


class StateTable(faust.Table):  # type: ignore[misc]
    """faust's Table, replaying its changelog newest-state-wins (``newest_records``). Recovery and standby
    replicas both go through ``apply_changelog_batch``, a public method of faust's tables."""

    keep_records: Callable[[Sequence[tuple[int, bytes, bytes | None]]], list[bool]] | None = None

    def apply_changelog_batch(self, batch: Iterable[Any]) -> None:
        events = list(batch)
        if self.keep_records is None or not events:
            super().apply_changelog_batch(events)
            return
        keep = self.keep_records([(e.message.partition, e.message.key, e.message.value) for e in events])
        super().apply_changelog_batch([e for e, kept in zip(events, keep) if kept])
        if not all(keep):
            # the store persists the highest offset it applied; the skipped records were read too
            highest: dict[TP, int] = {}
            for e in events:
                highest[e.message.tp] = max(e.message.offset, highest.get(e.message.tp, -1))
            for tp, offset in highest.items():
                self.data.set_persisted_offset(tp, offset)


# --------------------------------------------------------------------------- a replaced cluster


def stale_partitions(persisted: Mapping[TP, int | None], ends: Mapping[TP, int | None],
                     has_records: Callable[[TP], bool] = lambda tp: False) -> dict[TP, tuple[int, int]]:
    """Changelog partitions whose local store is ahead of the changelog, with (persisted offset, end offset);
    -1 for "records but no persisted offset".

    The persisted offset is the offset of the last changelog record applied locally, so it is below the
    partition's end offset (the next offset to be written) unless the records it counts are gone. A store
    with records but no persisted offset yet (exactly_once persists offsets at commits, so a worker
    stopped before its first commit leaves none) is stale when the changelog is empty: its records are
    not in it. ``has_records`` is asked only for that case.
    """
    out: dict[TP, tuple[int, int]] = {}
    for tp, offset in persisted.items():
        end = ends.get(tp)
        if end is None:
            continue
        if offset is not None and offset >= 0:
            if offset >= end:
                out[tp] = (offset, end)
        elif end == 0 and has_records(tp):
            out[tp] = (-1, end)
    return out


# partitions -> the broker's log end offsets (None where it did not answer)
EndOffsets = Callable[[Iterable[TP]], Awaitable[Mapping[TP, int | None]]]


class ChangelogGuardRecovery(compat.RecoveryHooks):
    """faust's table recovery, with the local-store-ahead-of-changelog case repaired instead of fatal.

    ``check_offsets`` runs for the active and for the standby partitions after faust read their persisted
    offsets and before its consistency check and its seeks: a stale partition's offset is reset there, so
    faust reads its changelog from the start, into a wiped store.

    The end offsets come from ``end_offsets``: the broker's log end, asked of the broker itself, so the
    check does not depend on what faust's consumer has cached.
    """

    def __init__(self, app: Any, tables: Any, *, on_stale: Callable[[Mapping[TP, tuple[int, int]]], None],
                 has_records: Callable[[TP], bool], end_offsets: EndOffsets,
                 take_uncommitted: Callable[[Iterable[TP]], list[TP]] = lambda tps: [], **kwargs: Any) -> None:
        super().__init__(app, tables, **kwargs)
        self._on_stale = on_stale
        self._has_records = has_records
        self._end_offsets = end_offsets
        self._take_uncommitted = take_uncommitted

    async def check_offsets(self, tps: Any, destination: Any) -> None:
        for tp in self._take_uncommitted(tps or ()):
            destination[tp] = None  # wiped: faust reads its changelog from the earliest offset
        if tps:
            ends = await self._end_offsets(tps)
            stale = stale_partitions({tp: destination.get(tp) for tp in tps}, ends, self._has_records)
            if stale:
                self._on_stale(stale)
                for tp in stale:
                    destination[tp] = None  # faust then starts from the changelog's earliest offset


def install_changelog_guard(app: Any, store: TableStore, end_offsets: EndOffsets) -> None:
    """Give the app's table manager a ``ChangelogGuardRecovery`` (before the worker starts: faust creates
    its own Recovery lazily, on first use of ``app.tables.recovery``)."""
    compat.install_recovery(app, ChangelogGuardRecovery, on_stale=store.on_stale_changelog,
                            has_records=lambda tp: store.has_records(tp.partition), end_offsets=end_offsets,
                            take_uncommitted=store.take_uncommitted)
