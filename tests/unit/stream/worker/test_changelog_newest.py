"""Changelog replay keeps each user's newest state: a late record of an older state (a frozen worker's
in-flight write landing after the new owner's) is skipped, by recovery and by standbys alike."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from types import SimpleNamespace

import faust
from faust.types import TP, Message

from state.codec import UserState, applied_offsets, decode, encode, supersedes
from stream.worker.table_store import StateTable, TableStore, newest_records

CL = "newest-test-user-state-changelog"


def _record(click: int, purchase: int = -1, ts: int = 1) -> bytes:
    return encode(dataclasses.replace(UserState.empty(), last_ts_ms=ts, session_events=1, model_version=1,
                                      offsets=[click, purchase]))


def test_applied_offsets_reads_the_header_as_decode_does():
    raw = _record(123_456_789_012, 7)
    assert applied_offsets(raw) == tuple(decode(raw).offsets) == (123_456_789_012, 7)


def test_supersedes_needs_every_source_at_least_as_far_and_one_further():
    assert supersedes((10, 5), (9, 5)) and supersedes((10, 5), (10, -1))
    assert not supersedes((10, 5), (10, 5))  # the same events: last record wins, as faust does
    assert not supersedes((10, 4), (9, 5))  # incomparable: neither holds all of the other's events
    assert not supersedes((9, 5), (10, 5))


def test_a_late_older_record_is_skipped_and_everything_else_applies_in_order():
    new_owner = [(b"u", _record(100)), (b"u", _record(140))]
    zombie_late = [(b"u", _record(120))]
    assert newest_records(new_owner + zombie_late, {}) == [True, True, False]
    # what the local store already holds counts too: the zombie's own store has its state at 120
    assert newest_records(new_owner + zombie_late, {b"u": (120, -1)}) == [False, True, False]
    # equal offsets, incomparable offsets, tombstones and unreadable values apply as faust would
    assert newest_records([(b"u", _record(140))], {b"u": (140, -1)}) == [True]
    assert newest_records([(b"u", _record(130, 9))], {b"u": (140, 3)}) == [True]
    assert newest_records([(b"u", None), (b"u", _record(5))], {b"u": (140, -1)}) == [True, True]
    assert newest_records([(b"u", b"\x09junk"), (b"u", _record(5))], {b"u": (140, -1)}) == [True, True]
    # keys do not interfere
    assert newest_records([(b"a", _record(1)), (b"b", _record(0))], {b"a": (0, -1), b"b": (3, -1)}) == [True, False]


def _event(partition: int, offset: int, key: bytes, value: bytes | None) -> SimpleNamespace:
    return SimpleNamespace(message=Message(CL, partition, offset, 0.0, 0, {}, key, value, None))


def test_state_table_replays_newest_state_wins_into_rocksdb_and_persists_the_last_offset_read(tmp_path: Path,
                                                                                               caplog):
    app = faust.App("newest-test", store="rocksdb://", datadir=str(tmp_path), topic_partitions=2, Table=StateTable)
    table = app.Table("user-state", key_type=bytes, value_type=bytes, partitions=2, default=None)
    assert isinstance(table, StateTable)  # the app's Table setting makes every table of the app one
    store = TableStore(table, 2)
    skipped: list[int] = []
    table.keep_records = store.replay_filter
    store.on_superseded = skipped.append
    store.write_partition(1, [(b"v", _record(50))])  # v's local state is newer than the changelog's first record
    batch = [_event(0, 10, b"u", _record(100)), _event(0, 11, b"u", _record(140)),
             _event(1, 3, b"v", _record(40)), _event(0, 12, b"u", _record(120)),  # late: older than 140
             _event(1, 4, b"v", _record(60))]
    with caplog.at_level(logging.WARNING, logger="gruflow.worker"):
        table.apply_changelog_batch(batch)
    states = {**store.get_partition(0, [b"u"]), **store.get_partition(1, [b"v"])}
    assert states[b"u"].offsets == [140, -1] and states[b"v"].offsets == [60, -1]
    assert skipped == [2]
    assert any("skipped 2 state record(s)" in r.getMessage() for r in caplog.records)
    # the skipped record at offset 12 was read: recovery must not read it again
    assert table.data.persisted_offset(TP(CL, 0)) == 12
    assert table.data.persisted_offset(TP(CL, 1)) == 4
