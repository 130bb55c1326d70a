"""Crashes and lost disks: SIGKILL mid-stream (at-least-once and exactly-once), deleted RocksDB directory.

The reference is the same pure processor run offline over the same events (an uninterrupted run):
the final per-user states read from the changelog must match it, so nothing was lost and nothing was
applied twice.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from stream.worker.app import table_dir
from stream.kafka.topics import ensure_topics
from workerkit import (TopicReader, WorkerProc, assert_same_states, expected_states, make_events, produce,
                       read_states, save_tiny_model)

pytestmark = pytest.mark.integration


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    return save_tiny_model(tmp_path / "tiny.gfc")


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
def test_sigkill_mid_stream_then_restart_loses_no_state(kafka, tmp_path: Path, model_path: Path,
                                                        guarantee: str) -> None:
    exactly_once = guarantee == "exactly_once"
    settings = kafka.settings(partitions=4, processing_guarantee=guarantee, batch_max_events=50)
    ensure_topics(settings)
    first = make_events(n_users=40, per_user=30, seed=4)
    second = make_events(n_users=40, per_user=10, seed=5, t0=first[-1].ts + 1000)
    events = first + second
    reader = TopicReader(settings, settings.topic("recommendations"), read_committed=exactly_once)
    worker = WorkerProc(kafka, settings, model_path, tmp_path, name="w1")
    try:
        worker.start()
        produce(settings, first)
        # kill while the first events are still being processed (small batches keep it busy)
        reader.poll_until(lambda c: len(c.messages) >= 100, 90, "the first answers")
        worker.kill()
        produce(settings, second)
        restarted = WorkerProc(kafka, settings, model_path, tmp_path, name="w1-restarted")
        with restarted:
            want = {(e.user, e.ts) for e in events}
            seen = reader.poll_until(lambda c: want <= set(c.answered()), 120, "an answer to every event")
            if exactly_once:
                seen = reader.drain(quiet_s=4.0)  # anything duplicated would show up here
                answered = seen.answered()
                assert set(answered) == want
                assert max(answered.values()) == 1, "an event was answered twice under exactly_once"
        assert_same_states(read_states(settings, read_committed=True), expected_states(model_path, events, settings))
    finally:
        worker.kill()
        reader.close()


def test_deleted_rocksdb_directory_is_rebuilt_from_the_changelog(kafka, tmp_path: Path, model_path: Path) -> None:
    settings = kafka.settings(partitions=4)
    ensure_topics(settings)
    first = make_events(n_users=20, per_user=5, seed=6)
    second = make_events(n_users=20, per_user=3, seed=7, t0=first[-1].ts + 1000)
    reader = TopicReader(settings, settings.topic("recommendations"))
    try:
        with WorkerProc(kafka, settings, model_path, tmp_path, name="before") as worker:
            produce(settings, first)
            reader.poll_until(lambda c: {(e.user, e.ts) for e in first} <= set(c.answered()), 90, "first answers")
        local = Path(table_dir(settings))
        assert any(local.rglob("*.sst")) or any(local.rglob("*.log")), "no RocksDB files were written"
        shutil.rmtree(local)
        with WorkerProc(kafka, settings, model_path, tmp_path, name="after") as worker:
            assert worker.wait_metric("gruflow_state_entries", lambda v: v >= 20), "state not restored"
            produce(settings, second)
            reader.poll_until(lambda c: {(e.user, e.ts) for e in second} <= set(c.answered()), 90, "second answers")
        # the second events continued the restored sessions: same result as one uninterrupted run
        assert_same_states(read_states(settings), expected_states(model_path, first + second, settings))
    finally:
        reader.close()
