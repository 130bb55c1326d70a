"""faust's RocksDB store as ``TableStore`` uses it: one rocksdict DB per partition from ``_db_for_partition``
(raw bytes, multi-get, WriteBatch), and ``_key_index`` kept as faust's own writes keep it, so faust's
reads find what the batch path wrote (stream/worker/table_store.py)."""

from __future__ import annotations

import dataclasses

import rocksdict
from faust.types import TP

from state.codec import UserState, encode
from stream.worker.app import Runtime


def state(ts: int) -> UserState:
    return dataclasses.replace(UserState.empty(), last_ts_ms=ts, session_events=1, model_version=1)


def test_db_for_partition_is_a_raw_rocksdict_per_partition(runtime: Runtime) -> None:
    store = runtime.pipeline.store.table.data
    db0, db1 = store._db_for_partition(0), store._db_for_partition(1)
    assert isinstance(db0, rocksdict.Rdict) and db0 is not db1
    assert store._db_for_partition(0) is db0  # opened once, then cached
    batch = rocksdict.WriteBatch(raw_mode=True)
    batch.put(b"k", b"\x00\xffv")
    db0.write(batch)
    assert db0[[b"k", b"absent"]] == [b"\x00\xffv", None]  # multi-get: None for a missing key
    assert db1.get(b"k") is None


def test_dbs_holds_every_open_partition_database(runtime: Runtime) -> None:
    """``memory_bytes`` sums RocksDB's memory properties over ``_dbs``: the partition -> DB map of every
    database faust opened (actives and standbys)."""
    store = runtime.pipeline.store.table.data
    db0 = store._db_for_partition(0)
    assert store._dbs[0] is db0
    assert int(db0.property_int_value("rocksdb.cur-size-all-mem-tables") or 0) >= 0
    assert runtime.pipeline.store.memory_bytes() >= 0


def test_faust_reads_what_the_batch_path_wrote(runtime: Runtime) -> None:
    """``write_partition`` fills ``_key_index`` (key -> partition) as faust's ``_set`` does: faust's own read
    path outside an event (``table.data[key]``) then finds the key, and a deleted key is gone for it too."""
    ts = 1_700_000_000_000
    store = runtime.pipeline.store
    data = store.table.data
    raw = encode(state(ts))
    store.write_partition(1, [(b"alice", raw), (b"bob", raw)])
    assert data._key_index[b"alice"] == 1
    assert data[b"alice"] == raw
    assert store.get_partition(1, [b"alice", b"carol"])[b"alice"].last_ts_ms == ts
    store.write_partition(1, [(b"bob", None)])
    assert b"bob" not in data._key_index
    assert b"bob" not in data
    assert [k for k, _ in store.iter_partition(1)] == [b"alice"]


def test_changelog_offsets_persist_where_faust_recovery_reads_them(runtime: Runtime) -> None:
    """``mark_changelog_offsets`` uses faust's ``set_persisted_offset``; recovery reads ``persisted_offset``,
    and the offset record (``offset_key``) lives in the partition's DB, which ``iter_partition`` skips."""
    store = runtime.pipeline.store
    data = store.table.data
    changelog = store.table.changelog_topic.get_topic_name()
    assert changelog == runtime.pipeline.names.changelog
    store.mark_changelog_offsets({0: 41, 1: 7})
    assert data.persisted_offset(TP(changelog, 0)) == 41
    assert data.persisted_offset(TP(changelog, 1)) == 7
    assert store._db(0).get(data.offset_key) is not None
    assert list(store.iter_partition(0)) == []


def test_recovery_and_standbys_apply_the_changelog_through_the_state_table(runtime: Runtime) -> None:
    """Newest-state-wins replay (``StateTable``) relies on faust's recovery (actives and standbys alike)
    writing changelog records only through ``table.apply_changelog_batch``, and on the store's
    ``set_persisted_offset`` to record how far it read."""
    import inspect

    from faust.tables.recovery import Recovery

    from stream.worker.table_store import StateTable

    table = runtime.pipeline.store.table
    assert isinstance(table, StateTable) and table.keep_records == runtime.pipeline.store.replay_filter
    source = inspect.getsource(Recovery)
    assert source.count(".apply_changelog_batch(") >= 2  # the buffered standby/active path and the final flush
    assert "set_persisted_offset" not in source and "_db_for_partition" not in source  # no other write path
    assert callable(table.data.set_persisted_offset)
