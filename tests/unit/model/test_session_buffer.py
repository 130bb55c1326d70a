"""The fine-tuner's session buffer: bounds by event count and event-time age, sessions split by the gap,
the reservoir of evicted sessions, and the drained item statistics."""

from __future__ import annotations

import numpy as np

from model.session_buffer import SessionBuffer


def _fill(buf: SessionBuffer, n_users: int, per_user: int, t0: float = 1000.0, step: float = 10.0) -> None:
    t = t0
    for u in range(n_users):
        for e in range(per_user):
            buf.add(f"u{u}", f"i{(u + e) % 7}", t, 1)
            t += step


def test_buffer_bounded_by_count_and_reports_bytes() -> None:
    buf = SessionBuffer(max_events=50, max_age_s=1e9, session_gap_s=1e9)
    sizes = []
    for u in range(40):
        for e in range(3):
            buf.add(f"user{u}", f"item{e}", 1000.0 + u * 10 + e, 1)
        sizes.append(buf.nbytes)
        assert buf.n_events <= 50
    assert buf.n_events > 40
    assert buf.nbytes > 0
    assert max(sizes[20:]) - min(sizes[20:]) < min(sizes[20:])  # steady once full, not growing
    df = buf.to_frame()
    assert len(df) == buf.n_events
    assert set(df.columns) >= {"SessionId", "ItemId", "Time", "EventType"}
    assert df["SessionId"].dtype == np.int64 and df["Time"].dtype == np.float64 and df["EventType"].dtype == np.int8
    # the newest users are kept, the oldest evicted
    assert df["Time"].max() == 1000.0 + 39 * 10 + 2


def test_buffer_bounded_by_event_time_age() -> None:
    buf = SessionBuffer(max_events=10_000, max_age_s=100.0, session_gap_s=1e9)
    for i in range(100):
        buf.add(f"u{i}", "a", float(i * 10), 1)
    df = buf.to_frame()
    assert df["Time"].min() >= buf.newest_time - 100.0
    assert buf.n_events == len(df) < 100


def test_session_gap_splits_a_users_events() -> None:
    buf = SessionBuffer(max_events=100, max_age_s=1e9, session_gap_s=60.0)
    for t in (0.0, 10.0, 20.0, 500.0, 510.0):
        buf.add("u", "x", t, 1)
    df = buf.to_frame()
    assert df.groupby("SessionId").size().sort_index().tolist() == [3, 2]


def test_reservoir_keeps_a_bounded_sample_of_evicted_sessions() -> None:
    buf = SessionBuffer(max_events=20, max_age_s=1e9, session_gap_s=1e9, reservoir_sessions=5, seed=3)
    _fill(buf, n_users=60, per_user=2)
    assert buf.reservoir_size == 5
    df = buf.to_frame()
    assert (~df["Recent"]).sum() == 10  # 5 sessions x 2 events
    assert len(buf.to_frame(include_reservoir=False)) == buf.n_events


def test_drain_stats_counts_since_last_call() -> None:
    buf = SessionBuffer(max_events=100, max_age_s=1e9)
    buf.add("u", "a", 1.0)
    buf.add("u", "a", 2.0)
    buf.add("v", "b", 3.0)
    counts, last = buf.drain_stats()
    assert counts == {"a": 2, "b": 1} and last == {"a": 2.0, "b": 3.0}
    counts, last = buf.drain_stats()
    assert not counts and not last
