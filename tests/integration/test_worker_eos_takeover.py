"""exactly_once: the surviving worker recovers the partitions of a SIGKILLed one.

faust's recovery reads the changelog highwaters from the consumer's cached last stable offsets under
transactions; right after an assignment they are unknown, and a worker holding state used to fail
faust's consistency check (ConsistencyError) at the rebalance and exit. The survivor can still exit
later, fenced by the broker (ProducerFenced, a separate open bug): the test then restarts it, as a
supervisor would, and checks that every event was answered once and the states are exact.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from stream.kafka.topics import ensure_topics
from workerkit import (TopicReader, WorkerProc, assert_same_states, expected_states, make_events, produce,
                       read_states, save_tiny_model)

pytestmark = pytest.mark.integration


def test_exactly_once_survivor_recovers_the_taken_over_partitions(kafka, tmp_path: Path) -> None:
    from stream.kafka.broker import free_port

    model_path = save_tiny_model(tmp_path / "tiny.gfc")
    settings = kafka.settings(partitions=4, processing_guarantee="exactly_once")
    ensure_topics(settings)
    s1 = settings.replace(data_dir=tmp_path / "w1", web_port=free_port())
    s2 = settings.replace(data_dir=tmp_path / "w2", web_port=free_port())
    first = make_events(n_users=40, per_user=4, seed=18)
    second = make_events(n_users=40, per_user=3, seed=19, t0=first[-1].ts + 1000)
    reader = TopicReader(settings, settings.topic("recommendations"), read_committed=True)
    w1 = WorkerProc(kafka, s1, model_path, tmp_path, name="eos-w1")
    w2 = WorkerProc(kafka, s2, model_path, tmp_path, name="eos-w2")
    try:
        w1.start()
        w2.start()
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not (w1.get("/readyz")[0] == w2.get("/readyz")[0] == 200):
            time.sleep(0.5)
        produce(settings, first)
        reader.poll_until(lambda c: {(e.user, e.ts) for e in first} <= set(c.answered()), 120, "first answers")
        assert w1.metric("gruflow_recommendations_out_total") > 0, "w1 holds no partitions: nothing to test"

        w2.kill()
        produce(settings, second)
        want = {(e.user, e.ts) for e in second}
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and w1.proc.poll() is None and not want <= set(reader.seen.answered()):
            reader.poll_until(lambda c: True, 1, "")
            time.sleep(0.5)
        log = w1.log_path.read_text(errors="replace")
        assert "ConsistencyError" not in log, "the survivor failed faust's consistency check at the takeover"
        if w1.proc.poll() is not None:  # fenced after the recovery: restarted, as a supervisor would
            w1 = WorkerProc(kafka, s1, model_path, tmp_path, name="eos-w1-restarted").start(timeout=180)
        reader.poll_until(lambda c: want <= set(c.answered()), 180, "answers after the takeover")
        answered = reader.drain(quiet_s=4.0).answered()
        assert max(answered.values()) == 1, "an event was answered twice under exactly_once"
        assert_same_states(read_states(settings), expected_states(model_path, first + second, settings))
    finally:
        w2.kill()
        w1.stop()
        w1.kill()
        reader.close()
