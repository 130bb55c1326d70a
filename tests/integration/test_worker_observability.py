"""What a real worker tells its operators: an exact user count across a restart, its own metric families
with every reason series at 0, and no false stall ERRORs in its log."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from stream.online import model_sync
from stream.pipeline.events import REASONS as DLQ_REASONS
from stream.kafka.topics import ensure_topics
from workerkit import TopicReader, WorkerProc, make_events, produce, save_tiny_model

pytestmark = pytest.mark.integration

TRAINER_FAMILIES = {"gruflow_model_promotions", "gruflow_model_rejections", "gruflow_finetune_rounds",
                    "gruflow_trainer_buffer_events"}


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    return save_tiny_model(tmp_path / "tiny.gfc")


def test_user_count_is_exact_after_a_restart(kafka, tmp_path: Path, model_path: Path) -> None:
    n_users = 2000
    settings = kafka.settings(partitions=4)
    ensure_topics(settings)
    first = make_events(n_users=n_users, per_user=2, seed=21)
    more = make_events(n_users=n_users + 50, per_user=1, seed=22, t0=first[-1].ts + 1000)  # 50 new users
    reader = TopicReader(settings, settings.topic("recommendations"))
    try:
        with WorkerProc(kafka, settings, model_path, tmp_path, name="before") as worker:
            produce(settings, first)
            reader.poll_until(lambda c: len(c.messages) >= len(first), 120, "an answer to every event")
            assert worker.wait_metric("gruflow_state_entries", lambda v: v == n_users, timeout=20), \
                f"state_entries {worker.metric('gruflow_state_entries')} for {n_users} users"
        with WorkerProc(kafka, settings, model_path, tmp_path, name="after") as worker:
            # after the recovery the count is taken again from the partitions: exact, not RocksDB's estimate
            assert worker.wait_metric("gruflow_state_entries", lambda v: v == n_users, timeout=20), \
                f"state_entries {worker.metric('gruflow_state_entries')} for {n_users} users after a restart"
            produce(settings, more)
            reader.poll_until(lambda c: len(c.messages) >= len(first) + len(more), 120, "answers to the new events")
            assert worker.wait_metric("gruflow_state_entries", lambda v: v == n_users + 50, timeout=20), \
                f"state_entries {worker.metric('gruflow_state_entries')} for {n_users + 50} users"
    finally:
        reader.close()


def test_healthy_worker_exports_its_own_metrics_and_logs_no_stall(kafka, tmp_path: Path, model_path: Path) -> None:
    """faust's livelock detector runs every 7 s; with its timeout at 2 s it judges every assigned partition
    within the run. A worker that answers every event is healthy: no partition may be reported stalled."""
    settings = kafka.settings(partitions=2)
    ensure_topics(settings)
    reader = TopicReader(settings, settings.topic("recommendations"))
    worker = WorkerProc(kafka, settings, model_path, tmp_path, name="healthy", STREAM_PROCESSING_TIMEOUT="2")
    try:
        with worker:
            families = {f.name: f for f in text_string_to_metric_families(worker.get("/metrics")[1])}
            assert not TRAINER_FAMILIES & set(families), "a worker exports trainer families"
            dlq = {s.labels["reason"]: s.value for s in families["gruflow_dlq"].samples
                   if s.name == "gruflow_dlq_total"}
            assert dlq == {r: 0.0 for r in DLQ_REASONS}, "reason series must exist at 0 before any dead letter"
            refusals = {s.labels["reason"] for s in families["gruflow_model_refusals"].samples}
            assert refusals == set(model_sync.REFUSAL_REASONS)
            sent = 0
            t0 = int(time.time() * 1000) - 600_000
            deadline = time.monotonic() + 24
            while time.monotonic() < deadline:  # a steady trickle: the changelog's end keeps moving
                batch = make_events(n_users=20, per_user=1, seed=sent, t0=t0 + sent * 100)
                sent += produce(settings, batch)
                time.sleep(1.0)
            reader.poll_until(lambda c: len(c.messages) >= sent, 60, "an answer to every event")
        log = worker.log_path.read_text(errors="replace")
        assert "Restore complete" in log or "ready" in log.lower(), "the worker log is not the one expected"
        stalls = [line for line in log.splitlines()
                  if "has not started processing" in line or "Stream stopped processing" in line]
        assert not stalls, f"{len(stalls)} stall reports from a healthy worker, e.g. {stalls[:2]}"
    finally:
        worker.kill()
        reader.close()
