"""Takeover under load: two workers in one group, one SIGKILLed with batches in flight, in both guarantees.

The survivor must do everything ``takeoverkit.check_takeover`` requires: every event answered at least
once (exactly once under exactly_once), first answers equal to an uninterrupted offline run's, every bad
record in the dlq, the users' final state equal to the offline run's, and the group's committed offsets at
the end of the input topics.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from stream.kafka.topics import ensure_topics
from takeoverkit import RATE, Load, check_takeover, make_load, wait_serving
from workerkit import TopicReader, WorkerProc, save_tiny_model

pytestmark = pytest.mark.integration

LOAD_S = 14.0  # seconds of load
KILL_AFTER_S = 4.0  # the victim is killed this long into the load; its session expires 6 s later


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
def test_sigkill_of_one_of_two_workers_under_load_loses_nothing(kafka, tmp_path: Path, guarantee: str) -> None:
    from stream.kafka.broker import free_port

    exactly_once = guarantee == "exactly_once"
    model_path = save_tiny_model(tmp_path / "tiny.gfc")
    settings = kafka.settings(partitions=4, processing_guarantee=guarantee)
    ensure_topics(settings)
    events, bad = make_load(seed=17, n=int(RATE * LOAD_S))
    recs = TopicReader(settings, settings.topic("recommendations"), read_committed=exactly_once)
    dlq = TopicReader(settings, settings.topic("dlq"), read_committed=exactly_once)
    survivor = WorkerProc(kafka, settings.replace(data_dir=tmp_path / "w1", web_port=free_port()), model_path,
                          tmp_path, name="survivor")
    victim = WorkerProc(kafka, settings.replace(data_dir=tmp_path / "w2", web_port=free_port()), model_path,
                        tmp_path, name="victim")
    load = Load(settings, events, bad)
    try:
        # the survivor serves every partition first, then hands half of them to the victim: the group as it
        # grows, and a survivor that held the victim's partitions (and their transactional ids) before
        survivor.start()
        victim.start(wait_ready=False)
        wait_serving([survivor, victim])
        load.start()
        time.sleep(KILL_AFTER_S)
        assert victim.metric("gruflow_recommendations_out_total") > 0, "the victim had no partitions"
        victim.kill()  # SIGKILL, batches in flight: at 1,000 events/s the worker is never idle
        load.join(LOAD_S * 3)
        assert load.error is None and load.sent == len(load.records), f"load failed: {load.error!r}"
        check_takeover(settings, model_path, load, events, bad, recs, dlq, [survivor], exactly_once)
    finally:
        victim.kill()
        survivor.stop()
        survivor.kill()
        recs.close()
        dlq.close()
