"""Two workers share the partitions; when one stops, the other takes its partitions over with their state."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from stream.kafka.topics import ensure_topics
from workerkit import (TopicReader, WorkerProc, assert_same_states, expected_states, make_events, produce,
                       read_states, save_tiny_model)

pytestmark = pytest.mark.integration


def test_two_workers_share_partitions_and_one_takes_over(kafka, tmp_path: Path) -> None:
    from stream.kafka.broker import free_port

    model_path = save_tiny_model(tmp_path / "tiny.gfc")
    settings = kafka.settings(partitions=4)
    ensure_topics(settings)
    # same group (app id) and topics; each worker has its own web port and RocksDB directory
    s1 = settings.replace(data_dir=tmp_path / "w1", web_port=free_port())
    s2 = settings.replace(data_dir=tmp_path / "w2", web_port=free_port())
    first = make_events(n_users=40, per_user=4, seed=8)
    second = make_events(n_users=40, per_user=3, seed=9, t0=first[-1].ts + 1000)
    reader = TopicReader(settings, settings.topic("recommendations"))
    w1 = WorkerProc(kafka, s1, model_path, tmp_path, name="w1")
    w2 = WorkerProc(kafka, s2, model_path, tmp_path, name="w2")
    try:
        w1.start()
        w2.start()
        # both ready only once the group settled on an assignment that includes w2
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (w1.get("/readyz")[0] == w2.get("/readyz")[0] == 200):
            time.sleep(0.5)
        produce(settings, first)
        reader.poll_until(lambda c: {(e.user, e.ts) for e in first} <= set(c.answered()), 90, "first answers")
        w1.wait_metric("gruflow_recommendations_out_total",
                       lambda v: v + w2.metric("gruflow_recommendations_out_total") >= len(first))
        out1 = w1.metric("gruflow_recommendations_out_total")
        out2 = w2.metric("gruflow_recommendations_out_total")
        assert out1 > 0 and out2 > 0, f"partitions not shared: w1 answered {out1}, w2 {out2}"
        assert out1 + out2 >= len(first)

        assert w2.stop() == 0
        produce(settings, second)
        reader.poll_until(lambda c: {(e.user, e.ts) for e in second} <= set(c.answered()), 120,
                          "answers after the takeover")
        assert w1.wait_metric("gruflow_recommendations_out_total", lambda v: v >= out1 + len(second))
        # w2's users continued their sessions on w1: as if one worker had seen everything
        assert_same_states(read_states(settings), expected_states(model_path, first + second, settings))
    finally:
        w2.stop()
        w1.stop()
        w1.kill()
        w2.kill()
        reader.close()
