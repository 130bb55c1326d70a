"""Takeover under load: two workers in one group, one SIGKILLed with batches in flight, in both guarantees.

The survivor must answer every event at least once (exactly once under exactly_once, read_committed),
each event's first answer must be the one an uninterrupted offline run gives it (``expected_answers``),
every bad record must reach the dlq, the users' final state must equal the offline run's, and the group's
committed offsets must reach the end of the input topics: a takeover that skips records leaves a hole
below them, and faust never commits past a hole.

A re-answer (at-least-once redelivery of an event the dead worker had applied) is answered from the
user's current state, so it equals the offline answer to that event or to a later event of the same user,
never an older one.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import orjson
import pytest

from stream.kafka.topics import ensure_topics
from workerkit import (N_ITEMS, Ev, TopicReader, WorkerProc, answer_items, assert_same_states, committed_offsets,
                       expected_answers, expected_states, read_states, same_answer, save_tiny_model)

pytestmark = pytest.mark.integration

RATE = 1000  # events/s offered
LOAD_S = 14.0  # seconds of load
KILL_AFTER_S = 4.0  # the victim is killed this long into the load; its session expires 6 s later
BAD_EVERY = 97  # one malformed record in this many


def _load(seed: int, n: int) -> tuple[list[Ev], list[tuple[str, bytes, bytes]]]:
    """``n`` records in send order: click-only and purchase-only users (a user's events on one topic, so
    their order, and the offline answers, are known), and now and then a malformed record."""
    rng = np.random.default_rng(seed)
    t0 = int(time.time() * 1000) - 3_600_000
    clickers, buyers = 300, 60
    count: dict[int, int] = defaultdict(int)
    events: list[Ev] = []
    bad: list[tuple[str, bytes, bytes]] = []
    for i in range(n):
        if i % BAD_EVERY == BAD_EVERY - 1:
            b = len(bad)
            kind = ("clicks", "purchases")[b % 2]
            key = f"bad{b}".encode()
            value = (b"not json %d" % b, orjson.dumps({"user_id": f"other{b}", "item_id": "i1",
                                                       "event_type": "click", "ts": t0}),
                     orjson.dumps({"user_id": f"bad{b}", "event_type": "view", "ts": t0}))[b % 3]
            bad.append((kind, key, value))
            continue
        u = int(rng.integers(0, clickers + buyers))
        etype = "purchase" if u >= clickers else ("view", "click", "cart")[int(rng.integers(0, 3))]
        events.append(Ev(f"t{u}", f"i{int(rng.integers(0, N_ITEMS))}", t0 + 1000 * count[u] + u, etype))
        count[u] += 1
    return events, bad


class Load(threading.Thread):
    """Sends the records at ``RATE`` per second, in order, keyed by user."""

    def __init__(self, settings, events: list[Ev], bad: list[tuple[str, bytes, bytes]]) -> None:
        super().__init__(daemon=True)
        self.settings = settings
        self.records: list[tuple[str, bytes, bytes]] = []
        ev_it, bad_it = iter(events), iter(bad)
        for i in range(len(events) + len(bad)):
            if i % BAD_EVERY == BAD_EVERY - 1:
                self.records.append(next(bad_it))
            else:
                e = next(ev_it)
                self.records.append((e.kind, e.user.encode(), e.value()))
        self.sent = 0
        self.where: dict[int, tuple[int, int]] = {}  # record index -> (partition, offset), once delivered
        self.error: BaseException | None = None

    def run(self) -> None:
        from confluent_kafka import Producer

        from stream.kafka.config import producer_config

        try:
            p = Producer(producer_config(self.settings))
            start = time.monotonic()
            for i, (kind, key, value) in enumerate(self.records):
                due = start + i / RATE
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                p.produce(self.settings.topic(kind), value, key,
                          on_delivery=lambda err, m, i=i: err is None and self.where.__setitem__(
                              i, (m.partition(), m.offset())))
                p.poll(0)
                self.sent = i + 1
            assert p.flush(30) == 0, "load not delivered"
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


def _alive(worker: WorkerProc) -> bool:
    assert worker.proc is not None and worker.proc.poll() is None, f"the survivor exited:\n{worker.log_tail()}"
    return True


def _missing(load: Load, keys: set[tuple[str, int]]) -> str:
    """Where the unanswered events were: (topic, partition) -> how many, first and last offset."""
    where: dict[tuple[str, int], list[int]] = defaultdict(list)
    for i, (kind, key, value) in enumerate(load.records):
        doc = orjson.loads(value) if value.startswith(b"{") else {}
        if (doc.get("user_id"), doc.get("ts")) in keys and i in load.where:
            p, o = load.where[i]
            where[(kind, p)].append(o)
    return "unanswered: " + ", ".join(f"{k}: {len(v)} in [{min(v)}, {max(v)}]" for k, v in sorted(where.items()))


def _wait_both_serving(w1: WorkerProc, w2: WorkerProc, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for w in (w1, w2):
            assert w.proc is not None and w.proc.poll() is None, f"a worker exited:\n{w.log_tail()}"
        try:
            if w1.get("/readyz")[0] == 200 and w2.get("/readyz")[0] == 200:
                return
        except OSError:
            pass  # endpoints not up yet
        time.sleep(0.3)
    raise AssertionError(f"the two workers did not both become ready:\n{w1.log_tail(20)}\n{w2.log_tail(20)}")


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
def test_sigkill_of_one_of_two_workers_under_load_loses_nothing(kafka, tmp_path: Path, guarantee: str) -> None:
    from stream.kafka.broker import free_port

    exactly_once = guarantee == "exactly_once"
    model_path = save_tiny_model(tmp_path / "tiny.gfc")
    settings = kafka.settings(partitions=4, processing_guarantee=guarantee)
    ensure_topics(settings)
    events, bad = _load(seed=17, n=int(RATE * LOAD_S))
    want_answers = expected_answers(model_path, events, settings)
    by_user: dict[str, list[int]] = defaultdict(list)
    for e in events:
        by_user[e.user].append(e.ts)
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
        _wait_both_serving(survivor, victim)
        load.start()
        time.sleep(KILL_AFTER_S)
        assert victim.metric("gruflow_recommendations_out_total") > 0, "the victim had no partitions"
        victim.kill()  # SIGKILL, batches in flight: at 1,000 events/s the worker is never idle
        load.join(LOAD_S * 3)
        assert load.error is None and load.sent == len(load.records), f"load failed: {load.error!r}"

        want = {(e.user, e.ts) for e in events}
        try:
            seen = recs.poll_until(lambda c: _alive(survivor) and want <= set(c.answered()), 120,
                                   "an answer to every event")
        except AssertionError as exc:
            offsets = committed_offsets(settings, [settings.topic("clicks"), settings.topic("purchases")])
            raise AssertionError(f"{exc}\n{_missing(load, want - set(recs.seen.answered()))}\n"
                                 f"(committed, end): {offsets}") from None
        seen = recs.drain(quiet_s=3.0)
        assert _alive(survivor)

        # answers, in each partition's order (a user's answers are in one partition): the first to each
        # event is the offline one; a re-answer shows that user's state as of the event or later
        first: dict[tuple[str, int], list] = {}
        wrong_first, wrong_again = [], []
        for r in seen.recommendations():
            key = (r["user_id"], r["event_ts"])
            got = answer_items(r)
            if key not in first:
                first[key] = got
                if not same_answer(got, want_answers[key]):
                    wrong_first.append(key)
            else:
                later = [ts for ts in by_user[key[0]] if ts >= key[1]]
                if not any(same_answer(got, want_answers[(key[0], ts)]) for ts in later):
                    wrong_again.append(key)
        assert not wrong_first, f"{len(wrong_first)} first answers differ from the offline run, e.g. {wrong_first[:3]}"
        assert not wrong_again, f"{len(wrong_again)} re-answers match no offline answer of their event or a later " \
                                f"one, e.g. {wrong_again[:3]}"
        if exactly_once:
            twice = [k for k, n in seen.answered().items() if n > 1]
            assert not twice, f"{len(twice)} events answered twice under exactly_once, e.g. {twice[:3]}"

        dead = dlq.poll_until(lambda c: len(c.messages) >= len(bad), 60, "every bad record in the dlq")
        assert {(m.key(), m.value()) for m in dead.messages} >= {(k, v) for _, k, v in bad}

        inputs = [settings.topic("clicks"), settings.topic("purchases")]
        deadline = time.monotonic() + 60
        offsets = committed_offsets(settings, inputs)
        while time.monotonic() < deadline and any(c != end for c, end in offsets.values()):
            time.sleep(1.0)
            offsets = committed_offsets(settings, inputs)
        behind = {tp: v for tp, v in offsets.items() if v[0] != v[1]}
        assert not behind, f"committed offsets stopped short of the end (committed, end): {behind}"
        # the lag gauge is the committed lag: 0 once everything is committed
        assert survivor.wait_metric("gruflow_consumer_lag_messages", lambda v: v == 0, timeout=10)

        assert_same_states(read_states(settings, read_committed=True), expected_states(model_path, events, settings))
        assert survivor.proc.poll() is None and survivor.get("/readyz")[0] == 200, survivor.log_tail()
    finally:
        victim.kill()
        survivor.stop()
        survivor.kill()
        recs.close()
        dlq.close()
