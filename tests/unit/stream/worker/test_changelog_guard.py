"""The worker's repair of a local store that is ahead of its changelog (a replaced cluster), and the faust
internals it relies on (pinned here: a faust upgrade that moves them fails these tests, not a worker)."""

from __future__ import annotations

import asyncio
import inspect
from pathlib import Path

import faust
from faust.tables.recovery import Recovery
from faust.types import TP

from stream import compat
from stream.worker.table_store import ChangelogGuardRecovery, TableStore, install_changelog_guard, stale_partitions

CL = "app-user-state-changelog"


def test_stale_partitions_are_those_whose_persisted_offset_reaches_the_end_offset():
    a, b, c, d, e = (TP(CL, p) for p in range(5))
    persisted = {a: 57, b: 9, c: None, d: 0, e: -1}
    ends = {a: 0, b: 10, c: 0, d: 0, e: 0}
    # a: changelog emptied; b: caught up (last applied 9, next 10); c: never persisted; d: record 0 gone;
    # e: faust's "nothing" marker
    assert stale_partitions(persisted, ends) == {a: (57, 0), d: (0, 0)}
    assert stale_partitions({a: 57}, {}) == {}  # no end offset known: nothing to judge
    # no persisted offset (exactly_once before its first commit): stale only with records and an empty changelog
    with_records = {c, e}.__contains__
    assert stale_partitions({c: None, e: -1, b: None}, {c: 0, e: 0, b: 4}, with_records) == {c: (-1, 0), e: (-1, 0)}
    assert stale_partitions({c: None}, {c: 0}, lambda tp: False) == {}


def _app_with_table(tmp_path: Path, partitions: int = 2) -> tuple[faust.App, TableStore]:
    app = faust.App("guard-test", store="rocksdb://", datadir=str(tmp_path), topic_partitions=partitions)
    table = app.Table("user-state", key_type=bytes, value_type=bytes, partitions=partitions, default=None)
    return app, TableStore(table, partitions)


def test_wipe_partition_deletes_records_and_persisted_offset_of_that_partition_only(tmp_path):
    _app, store = _app_with_table(tmp_path)
    store.write_partition(0, [(b"u%d" % i, b"x" * 10) for i in range(25)])
    store.write_partition(1, [(b"v1", b"y")])
    tp0, tp1 = TP(CL, 0), TP(CL, 1)
    store.mark_changelog_offsets({0: 24, 1: 0})
    assert store.table.data.persisted_offset(tp0) == 24

    assert store.wipe_partition(0) == 26  # 25 users + faust's offset record

    assert list(store.iter_partition(0)) == []
    assert store.table.data.persisted_offset(tp0) is None
    assert store.get_partition(0, [b"u1"]) == {}
    assert not store.has_records(0) and store.has_records(1)
    assert store.table.data.persisted_offset(tp1) == 0
    assert [k for k, _ in store.iter_partition(1)] == [b"v1"]


def test_the_guard_replaces_fausts_recovery_and_overrides_the_hook_faust_awaits():
    # faust builds its Recovery lazily into TableManager._recovery and awaits
    # _build_offsets(consumer, tps, destination, title) before its consistency check
    params = list(inspect.signature(Recovery._build_offsets).parameters)
    assert params == ["self", "consumer", "tps", "destination", "title"]
    assert "_build_offsets" in compat.RecoveryHooks.__dict__ and issubclass(ChangelogGuardRecovery, compat.RecoveryHooks)
    assert "check_offsets" in ChangelogGuardRecovery.__dict__
    source = inspect.getsource(Recovery)
    loop = source[source.index("async def _restart_recovery"):]
    assert loop.index("self._build_highwaters") < loop.index("self._build_offsets") < \
        loop.index("raise ConsistencyError")


def test_guard_wipes_stale_partitions_before_faust_reads_their_offsets(tmp_path, caplog):
    app, store = _app_with_table(tmp_path)
    tp0, tp1 = TP(CL, 0), TP(CL, 1)

    async def end_offsets(tps):  # the broker's log end offsets, for a replaced cluster
        return {tp0: 0, tp1: 10}

    install_changelog_guard(app, store, end_offsets)
    recovery = app.tables.recovery
    assert isinstance(recovery, ChangelogGuardRecovery)

    store.write_partition(0, [(b"u1", b"old")])
    store.write_partition(1, [(b"v1", b"kept")])
    store.mark_changelog_offsets({0: 500, 1: 3})
    destination = {tp0: 500, tp1: 3}

    class Consumer:  # faust's own offset query in _build_offsets
        async def earliest_offsets(self, *tps):
            return {tp0: 0, tp1: 0}

    from collections import Counter

    counter: Counter = Counter(destination)
    with caplog.at_level("ERROR", logger="gruflow.worker"):
        asyncio.run(recovery._build_offsets(Consumer(), {tp0, tp1}, counter, "active"))

    assert counter[tp0] == -1  # read partition 0's changelog from its start
    assert counter[tp1] == 3
    assert store.get_partition(0, [b"u1"]) == {} and store.table.data.persisted_offset(tp0) is None
    assert [k for k, _ in store.iter_partition(1)] == [b"v1"]
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1
    assert f"{CL}[0] local offset 500 >= changelog end offset 0" in errors[0].getMessage()
    assert f"{CL}[1]" not in errors[0].getMessage()


def test_after_mark_uncommitted_each_partition_is_rebuilt_once_at_its_next_recovery(tmp_path, caplog):
    """exactly_once, a fenced or frozen worker: the local store may hold aborted writes, so every partition it
    recovers next is wiped and read from the changelog's start, once; a later recovery keeps its offsets."""
    app, store = _app_with_table(tmp_path)
    tp0, tp1 = TP(CL, 0), TP(CL, 1)

    async def end_offsets(tps):  # the changelog is ahead of the store: nothing stale by offsets
        return {tp0: 100, tp1: 100}

    install_changelog_guard(app, store, end_offsets)
    recovery = app.tables.recovery
    store.write_partition(0, [(b"u1", b"aborted")])
    store.write_partition(1, [(b"v1", b"aborted")])
    store.mark_changelog_offsets({0: 40, 1: 50})
    store.mark_uncommitted()

    class Consumer:
        async def earliest_offsets(self, *tps):
            return {tp0: 0, tp1: 0}

    from collections import Counter

    first: Counter = Counter({tp0: 40})
    with caplog.at_level("WARNING", logger="gruflow.worker"):
        asyncio.run(recovery._build_offsets(Consumer(), {tp0}, first, "active"))  # only partition 0 comes back
    assert first[tp0] == -1 and store.get_partition(0, [b"u1"]) == {}
    assert [k for k, _ in store.iter_partition(1)] == [b"v1"]  # not recovered yet: left as it is, still marked
    assert any("rebuilding 1 partition" in r.getMessage() for r in caplog.records)

    later: Counter = Counter({tp0: 60, tp1: 50})
    asyncio.run(recovery._build_offsets(Consumer(), {tp0, tp1}, later, "active"))
    assert later[tp0] == 60  # rebuilt once already
    assert later[tp1] == -1 and store.get_partition(1, [b"v1"]) == {}
