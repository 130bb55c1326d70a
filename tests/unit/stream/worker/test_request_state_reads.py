"""The request path's state reads in the compute thread, on a real RocksDB (no broker: the app is built, never
started): with the partition's handle taken beforehand they return what the event loop's read returns, the
in-flight overlay first."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from state.codec import UserState, encode
from stream.observe.metrics import Metrics
from stream.settings import Settings
from stream.worker.app import build_app
from stream.worker.model_holder import ModelHolder


@pytest.fixture
def pipeline(tmp_path: Path) -> Iterator[object]:
    settings = Settings.of(bootstrap_servers="127.0.0.1:9", data_dir=tmp_path / "var", partitions=2)
    runtime = build_app(settings, ModelHolder(None), Metrics.create(), 4096)  # type: ignore[arg-type]
    yield runtime.pipeline
    runtime.pipeline.executor.shutdown()
    runtime.app.loop.close()


def _state(seed: int) -> UserState:
    rng = np.random.default_rng(seed)
    return UserState(rng.standard_normal(8).astype(np.float32), 1000 + seed, 1, 1, np.arange(3, dtype=np.int32))


def test_reads_in_the_compute_thread_see_the_overlay_then_rocksdb_like_the_loop(pipeline: object) -> None:
    p = pipeline  # type: ignore[assignment]
    store = p.store  # type: ignore[attr-defined]
    keys = [b"stored", b"in-flight", b"deleted-in-flight", b"absent"]
    store.write_partition(1, [(b"stored", encode(_state(1))), (b"in-flight", encode(_state(2))),
                              (b"deleted-in-flight", encode(_state(3)))])
    # a batch in flight: a newer state of one user, a tombstone of another
    p.view.stage(1, {1: [(b"in-flight", encode(_state(4))), (b"deleted-in-flight", None)]})  # type: ignore[attr-defined]
    db = store.partition_db(1)  # on the loop
    threaded = p.executor.submit(p.read_states, 1, keys, db).result()  # type: ignore[attr-defined]
    on_loop = p.read_states(1, keys)  # type: ignore[attr-defined]
    assert set(threaded) == set(on_loop) == {b"stored", b"in-flight"}
    assert threaded[b"in-flight"].last_ts_ms == on_loop[b"in-flight"].last_ts_ms == 1004  # the overlay's
    assert threaded[b"stored"].last_ts_ms == 1001
    np.testing.assert_array_equal(threaded[b"stored"].hidden, _state(1).hidden)
    # the batch is written: the keys leave the overlay and the same read now comes from RocksDB
    store.write_partition(1, [(b"in-flight", encode(_state(4))), (b"deleted-in-flight", None)])
    p.view.settle(1, [(b"in-flight", b""), (b"deleted-in-flight", None)])  # type: ignore[attr-defined]
    after = p.executor.submit(p.read_states, 1, keys, db).result()  # type: ignore[attr-defined]
    assert set(after) == {b"stored", b"in-flight"} and after[b"in-flight"].last_ts_ms == 1004
