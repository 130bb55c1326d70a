"""The embedded broker killed (kill -9) and restarted on its data directory, and a worker whose local state
was written against another cluster (the embedded broker came back empty, or the cluster was replaced)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from confluent_kafka import Producer

from stream.kafka.broker import EmbeddedKafka
from stream.kafka.config import producer_config
from stream.kafka.topics import ensure_topics
from workerkit import TopicReader, WorkerProc, assert_same_states, expected_states, make_events, produce, \
    read_states, save_tiny_model

pytestmark = pytest.mark.integration


@pytest.fixture
def needs_embedded(kafka):
    if not kafka.embedded:
        pytest.skip("GRUFLOW_BOOTSTRAP_SERVERS is set: embedded broker lifecycle not under test")


def _kill_jvm(broker: EmbeddedKafka) -> None:
    pid = broker.pid
    assert pid is not None
    os.killpg(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while broker.running and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not broker.running, "the JVM survived SIGKILL"


def test_broker_killed_restarts_on_its_data_dir_with_its_records(needs_embedded, kafka, tmp_path: Path):
    data_dir = tmp_path / "kafka"
    first = EmbeddedKafka.from_settings(kafka.base, data_dir=data_dir, quiet=True).start()
    second = None
    try:
        settings = first.settings(kafka.settings(partitions=2))
        address = settings.connection.bootstrap_servers
        ensure_topics(settings)
        produce(settings, make_events(n_users=10, per_user=5, seed=1))
        # a client that lives through the broker's death: it must find the broker again at the same address
        producer = Producer(producer_config(settings))
        _kill_jvm(first)
        assert (data_dir / "data" / "meta.properties").is_file(), "the data dir was removed"
        producer.produce(settings.topic("clicks"), b'{"late": 1}', b"u0")  # queued while the broker is down

        second = EmbeddedKafka.from_settings(kafka.base, data_dir=data_dir, quiet=True).start()
        assert second.bootstrap_servers == address
        assert producer.flush(60) == 0, "the producer did not reach the restarted broker"
        reader = TopicReader(settings, settings.topic("clicks"))
        try:
            seen = reader.poll_until(lambda c: len(c.messages) >= 51, 60, "every record from before the kill")
            assert len(reader.drain().messages) == 51
            assert sum(m.value() == b'{"late": 1}' for m in seen.messages) == 1
        finally:
            reader.close()
    finally:
        first.stop()
        if second is not None:
            second.stop()
    assert (data_dir / "data" / "meta.properties").is_file(), "stop() removed the data dir"


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
def test_worker_meets_a_replaced_cluster_rebuilds_its_state_and_goes_on(needs_embedded, kafka, tmp_path: Path,
                                                                       guarantee: str):
    """The worker's RocksDB was written against a broker that is gone with its data (an embedded broker
    without a data dir); the cluster it meets now (the session's broker) has empty topics. It must log one
    error, rebuild from the new changelog and process the new events like a fresh worker would."""
    model_path = save_tiny_model(tmp_path / "tiny.gfc")
    settings = kafka.settings(partitions=2, processing_guarantee=guarantee)
    read_committed = guarantee == "exactly_once"
    before = make_events(n_users=12, per_user=8, seed=2)
    after = make_events(n_users=12, per_user=3, seed=3, t0=before[-1].ts + 1000)

    with EmbeddedKafka.from_settings(kafka.base, quiet=True) as old:
        old_settings = old.settings(settings)
        ensure_topics(old_settings)
        reader = TopicReader(old_settings, old_settings.topic("recommendations"), read_committed=read_committed)
        try:
            with WorkerProc(kafka, old_settings, model_path, tmp_path, name="old-cluster"):
                produce(old_settings, before)
                want = {(e.user, e.ts) for e in before}
                reader.poll_until(lambda c: want <= set(c.answered()), 120, "answers on the old cluster")
        finally:
            reader.close()

    ensure_topics(settings)
    reader = TopicReader(settings, settings.topic("recommendations"), read_committed=read_committed)
    worker = WorkerProc(kafka, settings, model_path, tmp_path, name="new-cluster")
    try:
        worker.start(timeout=180)
        produce(settings, after)
        want = {(e.user, e.ts) for e in after}
        reader.poll_until(lambda c: want <= set(c.answered()), 120, "answers on the new cluster")
        assert worker.proc is not None and worker.proc.poll() is None, worker.log_tail()
    finally:
        worker.stop()
        reader.close()
    log = worker.log_path.read_text(errors="replace")
    errors = [line for line in log.splitlines() if "the changelog is behind the local state store" in line]
    assert len(errors) == 1, log[-3000:]
    assert "ConsistencyError" not in log
    # the old users' states are gone with the old cluster: the new events start fresh sessions
    assert_same_states(read_states(settings), expected_states(model_path, after, settings))
