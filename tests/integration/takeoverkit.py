"""Load and checks shared by the takeover tests (a worker killed, stopped, or joining under load).

``Load`` sends click-only and purchase-only users (a user's events on one topic, so their order, and an
offline run's answers, are known) at ``RATE`` events/s with a malformed record now and then.
``check_takeover`` then requires what docs/takeover.md promises after any takeover:

- every event answered at least once (exactly once under exactly_once, read_committed);
- each event's first answer equal to an uninterrupted offline run's (``expected_answers``); a re-answer
  (at-least-once redelivery of an event already applied) is answered from the user's current state, so it
  equals the offline answer to that event or to a later event of the same user, never an older one;
- every bad record in the dlq;
- the group's committed offsets at the end of the input topics (a takeover that skips records leaves a
  hole below them, and faust never commits past a hole) and the committed-lag gauge at 0;
- the users' final state (the changelog) equal to the offline run's.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Iterable

import numpy as np
import orjson

from workerkit import (N_ITEMS, Ev, TopicReader, WorkerProc, answer_items, assert_same_states, committed_offsets,
                       expected_answers, expected_states, read_states, same_answer)

RATE = 1000  # events/s offered
BAD_EVERY = 97  # one malformed record in this many


def make_load(seed: int, n: int) -> tuple[list[Ev], list[tuple[str, bytes, bytes]]]:
    """``n`` records in send order: the events, and the malformed records ((topic kind, key, value))."""
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


def alive(workers: Iterable[WorkerProc]) -> bool:
    for w in workers:
        assert w.proc is not None and w.proc.poll() is None, f"a worker exited:\n{w.log_tail()}"
    return True


def wait_serving(workers: list[WorkerProc], timeout: float = 90.0) -> None:
    """Until every worker answers /readyz with 200 (they join one group, so they become ready together)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive(workers)
        try:
            if all(w.get("/readyz")[0] == 200 for w in workers):
                return
        except OSError:
            pass  # endpoints not up yet
        time.sleep(0.3)
    raise AssertionError("the workers did not all become ready:\n" + "\n".join(w.log_tail(20) for w in workers))


def _missing(load: Load, keys: set[tuple[str, int]]) -> str:
    """Where the unanswered events were: (topic, partition) -> how many, first and last offset."""
    where: dict[tuple[str, int], list[int]] = defaultdict(list)
    for i, (kind, key, value) in enumerate(load.records):
        doc = orjson.loads(value) if value.startswith(b"{") else {}
        if (doc.get("user_id"), doc.get("ts")) in keys and i in load.where:
            p, o = load.where[i]
            where[(kind, p)].append(o)
    return "unanswered: " + ", ".join(f"{k}: {len(v)} in [{min(v)}, {max(v)}]" for k, v in sorted(where.items()))


def _check_answers(recs: TopicReader, events: list[Ev], model_path: Path, settings, exactly_once: bool) -> None:
    want_answers = expected_answers(model_path, events, settings)
    by_user: dict[str, list[int]] = defaultdict(list)
    for e in events:
        by_user[e.user].append(e.ts)
    # answers, in each partition's order (a user's answers are in one partition)
    first: dict[tuple[str, int], list] = {}
    wrong_first, wrong_again = [], []
    seen = recs.drain(quiet_s=3.0)
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


def _wait_committed_to_end(settings, timeout: float = 60.0) -> None:
    inputs = [settings.topic("clicks"), settings.topic("purchases")]
    deadline = time.monotonic() + timeout
    offsets = committed_offsets(settings, inputs)
    while time.monotonic() < deadline and any(c != end for c, end in offsets.values()):
        time.sleep(1.0)
        offsets = committed_offsets(settings, inputs)
    behind = {tp: v for tp, v in offsets.items() if v[0] != v[1]}
    assert not behind, f"committed offsets stopped short of the end (committed, end): {behind}"


def check_takeover(settings, model_path: Path, load: Load, events: list[Ev], bad: list[tuple[str, bytes, bytes]],
                   recs: TopicReader, dlq: TopicReader, workers: list[WorkerProc], exactly_once: bool) -> None:
    """After the load was sent: everything in the module docstring, with ``workers`` (those that should be
    running) kept alive throughout."""
    want = {(e.user, e.ts) for e in events}
    try:
        recs.poll_until(lambda c: alive(workers) and want <= set(c.answered()), 120, "an answer to every event")
    except AssertionError as exc:
        offsets = committed_offsets(settings, [settings.topic("clicks"), settings.topic("purchases")])
        raise AssertionError(f"{exc}\n{_missing(load, want - set(recs.seen.answered()))}\n"
                             f"(committed, end): {offsets}") from None
    _check_answers(recs, events, model_path, settings, exactly_once)
    alive(workers)

    dead = dlq.poll_until(lambda c: len(c.messages) >= len(bad), 60, "every bad record in the dlq")
    assert {(m.key(), m.value()) for m in dead.messages} >= {(k, v) for _, k, v in bad}

    _wait_committed_to_end(settings)
    # the lag gauge is the committed lag: 0 once everything is committed
    for w in workers:
        assert w.wait_metric("gruflow_consumer_lag_messages", lambda v: v == 0, timeout=10), w.log_tail()

    assert_same_states(read_states(settings, read_committed=True), expected_states(model_path, events, settings))
    for w in workers:
        assert w.proc is not None and w.proc.poll() is None and w.get("/readyz")[0] == 200, w.log_tail()
