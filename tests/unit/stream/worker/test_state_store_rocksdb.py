"""The worker's RocksDB state table on a real RocksDB (no broker: the app is built, never started): the
memory budget from the settings reaches every partition's database, and the user count is exact."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator

import pytest

from stream.worker.app import build_app, rocksdb_budget_bytes, table_dir
from stream.observe.metrics import Metrics
from stream.worker.model_holder import ModelHolder
from stream.settings import Settings, SettingsError


@pytest.fixture
def make_store(tmp_path: Path) -> Iterator[Any]:
    runtimes: list[Any] = []

    def make(**changes: Any) -> Any:
        settings = Settings.of(bootstrap_servers="127.0.0.1:9", data_dir=tmp_path / "var", partitions=2, **changes)
        runtime = build_app(settings, ModelHolder(None), Metrics.create(), 4096)  # type: ignore[arg-type]
        runtimes.append(runtime)
        return settings, runtime.pipeline.store

    yield make
    for runtime in runtimes:
        runtime.pipeline.executor.shutdown()
        runtime.app.loop.close()


def rocksdb_options_file(settings: Settings, partition: int) -> str:
    files = sorted(Path(table_dir(settings)).rglob(f"*-{partition}.db/OPTIONS-*"))
    assert files, "RocksDB wrote no OPTIONS file"
    return files[-1].read_text()


def test_rocksdb_memory_budget_reaches_every_partition(make_store: Any) -> None:
    settings, store = make_store(rocksdb_write_buffer_bytes=4 * 1024 * 1024, rocksdb_max_write_buffers=3,
                                 rocksdb_block_cache_bytes=12 * 1024 * 1024)
    for p in range(settings.topics.partitions):
        db = store._db(p)
        assert db.property_int_value("rocksdb.block-cache-capacity") == 12 * 1024 * 1024
        options = rocksdb_options_file(settings, p)
        assert re.search(r"^\s*write_buffer_size=4194304$", options, re.M)
        assert re.search(r"^\s*max_write_buffer_number=3$", options, re.M)
    assert rocksdb_budget_bytes(settings) == 3 * 4 * 1024 * 1024 + 12 * 1024 * 1024


def test_default_budget_is_far_below_fausts(make_store: Any) -> None:
    settings, store = make_store()
    db = store._db(0)
    faust_default = 3 * 64 * 1024 * 1024 + 2 * 1024 ** 3
    assert db.property_int_value("rocksdb.block-cache-capacity") == settings.store.rocksdb_block_cache_bytes
    assert rocksdb_budget_bytes(settings) <= 64 * 1024 * 1024 < faust_default


@pytest.mark.parametrize("name,value", [("GRUFLOW_ROCKSDB_MAX_WRITE_BUFFERS", "1"),
                                        ("GRUFLOW_ROCKSDB_WRITE_BUFFER_BYTES", "1000"),
                                        ("GRUFLOW_ROCKSDB_BLOCK_CACHE_BYTES", "-1")])
def test_unusable_budget_is_refused(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=name):
        Settings.from_env({name: value})


def test_user_count_is_exact_through_writes_and_recount(make_store: Any) -> None:
    settings, store = make_store()
    raw = b"any bytes: the count does not decode"
    store.write_partition(0, [(b"u%d" % i, raw) for i in range(50)])  # before any count: not counted
    store.mark_changelog_offsets({0: 49})  # faust's offset record lives in the same database
    assert store.users([0, 1]) == 0
    store.count_partitions([0, 1])
    assert store.users([0]) == 50 and store.users([1]) == 0
    # looked up by the store: 10 overwrites, 5 new users, 3 deletes, 2 deletes of absent keys
    store.write_partition(0, [(b"u%d" % i, raw) for i in range(45, 55)] + [(b"u%d" % i, None) for i in range(3)]
                          + [(b"gone%d" % i, None) for i in range(2)])
    assert store.users([0]) == 52
    # told by the caller which keys it creates (it read them as absent)
    store.write_partition(1, [(b"v1", raw), (b"v2", raw)], created={b"v1", b"v2"})
    store.write_partition(1, [(b"v1", raw), (b"v3", raw)], created={b"v3"})
    store.write_partition(1, [(b"v2", None)], created=set())
    assert store.users([1]) == 2
    assert store.users([0, 1]) == 54
    store.count_partitions([0, 1])  # a recount agrees with the running count
    assert store.users([0]) == 52 and store.users([1]) == 2
    store.count_partitions([1])  # partition 0 revoked: no longer counted
    assert store.users([0, 1]) == 2


def test_overwriting_a_corrupt_record_creates_no_user(make_store: Any) -> None:
    settings, store = make_store()
    store.write_partition(0, [(b"bad", b"\x00not a state record")])
    store.count_partitions([0])
    assert store.get_partition(0, [b"bad"]) == {} and store.corrupt == 1  # read as absent ...
    store.write_partition(0, [(b"bad", b"fresh")], created={b"bad"})  # ... so the caller calls it new
    assert store.users([0]) == 1


def test_memory_gauge_reads_rocksdbs_own_accounting(make_store: Any) -> None:
    settings, store = make_store(rocksdb_write_buffer_bytes=1024 * 1024, rocksdb_block_cache_bytes=1024 * 1024)
    empty = store.memory_bytes()
    value = bytes(200)
    for p in range(settings.topics.partitions):
        store.write_partition(p, [(b"p%d-u%d" % (p, i), value) for i in range(2000)])  # ~0.4 MB each
    grown = store.memory_bytes()
    assert grown - empty >= 2 * 2000 * 200
    assert grown <= settings.topics.partitions * rocksdb_budget_bytes(settings)
