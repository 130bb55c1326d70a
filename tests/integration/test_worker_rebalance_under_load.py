"""Rebalances during batches, under load: a worker joining a running group, and a worker frozen past its
session timeout that comes back (a network cut's stand-in: while it is stopped the group moves its
partitions to the other worker; when it resumes it still believes it holds them, with a batch in flight).

Each must leave what ``takeoverkit.check_takeover`` requires: every event answered at least once, first
answers equal to an uninterrupted offline run's, the bad records in the dlq, the users' final state equal
to the offline run's, and the group's committed offsets at the end of the input topics.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from stream.kafka.topics import ensure_topics
from takeoverkit import RATE, Load, alive, check_takeover, make_load, wait_serving
from workerkit import TopicReader, WorkerProc, save_tiny_model

pytestmark = pytest.mark.integration

SESSION_TIMEOUT_S = 6  # WorkerProc's GRUFLOW_BROKER_SESSION_TIMEOUT_S
GUARANTEES = ["at_least_once", "exactly_once"]


def _group_members(settings) -> int:
    from confluent_kafka.admin import AdminClient

    from stream.kafka.config import admin_config

    admin = AdminClient(admin_config(settings))
    (future,) = admin.describe_consumer_groups([settings.process.app_id], request_timeout=15).values()
    return len(future.result(timeout=20).members)


class _Group:
    """Workers of one group on one test's topics, readers of its outputs, and the load."""

    def __init__(self, kafka, tmp_path: Path, seed: int, load_s: float, guarantee: str, partitions: int = 4) -> None:
        self.kafka, self.tmp_path = kafka, tmp_path
        self.exactly_once = guarantee == "exactly_once"
        self.model_path = save_tiny_model(tmp_path / "tiny.gfc")
        self.settings = kafka.settings(partitions=partitions, processing_guarantee=guarantee)
        ensure_topics(self.settings)
        self.events, self.bad = make_load(seed=seed, n=int(RATE * load_s))
        self.recs = TopicReader(self.settings, self.settings.topic("recommendations"), read_committed=self.exactly_once)
        self.dlq = TopicReader(self.settings, self.settings.topic("dlq"), read_committed=self.exactly_once)
        self.load = Load(self.settings, self.events, self.bad)
        self.workers: list[WorkerProc] = []

    def worker(self, name: str) -> WorkerProc:
        from stream.kafka.broker import free_port

        w = WorkerProc(self.kafka, self.settings.replace(data_dir=self.tmp_path / name, web_port=free_port()),
                       self.model_path, self.tmp_path, name=name)
        self.workers.append(w)
        return w

    def finish_load(self, timeout: float) -> None:
        self.load.join(timeout)
        assert self.load.error is None and self.load.sent == len(self.load.records), \
            f"load failed: {self.load.error!r}"

    def check(self) -> None:
        check_takeover(self.settings, self.model_path, self.load, self.events, self.bad, self.recs, self.dlq,
                       self.workers, exactly_once=self.exactly_once)

    def close(self) -> None:
        for w in self.workers:
            if w.proc is not None and w.proc.poll() is None:
                os.kill(w.proc.pid, signal.SIGCONT)  # a stopped worker would never see the SIGTERM
                w.stop()
            w.kill()
        self.recs.close()
        self.dlq.close()


def _wait_http(w: WorkerProc, timeout: float = 120.0) -> None:
    """Until the worker's health endpoint answers: it is up a few seconds before its consumer joins the group."""
    deadline = time.monotonic() + timeout
    while True:
        alive([w])
        try:
            w.get("/livez")
            return
        except OSError:
            assert time.monotonic() < deadline, f"{w.log_path.name}: no health endpoint after {timeout:.0f} s"
            time.sleep(0.1)


@pytest.mark.parametrize("guarantee", GUARANTEES)
def test_a_third_worker_joining_under_load_loses_nothing(kafka, tmp_path: Path, guarantee: str) -> None:
    # six partitions: faust's assignor caps a member at ceil(partitions / members) and keeps the others where
    # they are, so with four a third member would get none (2 + 2 + 0) and nothing would move
    g = _Group(kafka, tmp_path, seed=23, load_s=14.0, guarantee=guarantee, partitions=6)
    try:
        w1, w2 = g.worker("w1").start(wait_ready=False), g.worker("w2").start(wait_ready=False)
        wait_serving([w1, w2])
        w3 = g.worker("w3").start(wait_ready=False)
        _wait_http(w3)  # a Python start takes long on a loaded machine; the group join follows within seconds
        g.load.start()
        deadline = time.monotonic() + 60
        while _group_members(g.settings) != 3:  # the group rebalances while w1 and w2 are mid-batch
            assert time.monotonic() < deadline, f"w3 did not join the group:\n{w3.log_tail()}"
            time.sleep(0.2)
        assert g.load.is_alive() and g.load.sent > 0, "w3 did not join while the load ran"
        print(f"w3 joined after {g.load.sent} of {len(g.load.records)} records were sent")
        g.finish_load(60)
        wait_serving(g.workers, timeout=120)
        g.check()
        assert w3.metric("gruflow_recommendations_out_total") > 0, "the joining worker got no partitions"
    finally:
        g.close()


@pytest.mark.parametrize("guarantee", GUARANTEES)
def test_a_worker_frozen_past_its_session_timeout_comes_back_and_loses_nothing(kafka, tmp_path: Path,
                                                                               guarantee: str) -> None:
    load_s, stop_after_s = 22.0, 3.0
    g = _Group(kafka, tmp_path, seed=29, load_s=load_s, guarantee=guarantee)
    try:
        w1, w2 = g.worker("w1").start(wait_ready=False), g.worker("w2").start(wait_ready=False)
        wait_serving([w1, w2])
        assert _group_members(g.settings) == 2
        g.load.start()
        time.sleep(stop_after_s)
        assert w2.wait_metric("gruflow_recommendations_out_total", lambda v: v > 0, timeout=10), "w2 answers nothing"
        os.kill(w2.proc.pid, signal.SIGSTOP)  # batches in flight: at 1,000 events/s a worker is never idle
        stopped = time.monotonic()
        deadline = stopped + SESSION_TIMEOUT_S + 30
        while _group_members(g.settings) != 1:  # the broker expired w2's session: its partitions moved to w1
            assert time.monotonic() < deadline, "w2's session did not expire"
            alive([w1])
            time.sleep(0.5)
        answered_by_w1 = w1.metric("gruflow_recommendations_out_total")
        time.sleep(2.0)  # w1 works on w2's partitions before w2 comes back
        os.kill(w2.proc.pid, signal.SIGCONT)
        print(f"w2 stopped for {time.monotonic() - stopped:.1f} s")
        assert g.load.is_alive(), "the load ended while w2 was stopped: w2 came back to an idle stream"
        g.finish_load(load_s * 3)
        wait_serving(g.workers, timeout=120)
        g.check()
        assert w1.metric("gruflow_recommendations_out_total") > answered_by_w1
        assert _group_members(g.settings) == 2
        assert w2.metric("gruflow_worker_freezes_total") >= 1, "the freeze guard did not count w2's freeze"
    finally:
        g.close()
