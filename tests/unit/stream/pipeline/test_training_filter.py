"""The trainer's input filter (stream/pipeline/training_filter.py) and the buffer's per-user removal."""

from __future__ import annotations

import numpy as np
import pytest

from model.finetune import SessionBuffer
from stream.pipeline.training_filter import (ALREADY_FLAGGED, LOW_DIVERSITY, RATE, REGULAR_TIMING, SESSION_LENGTH,
                                    SOURCE_NOT_ALLOWED, FilterConfig, TrainingFilter)
from stream.pipeline.control import control_action, event_source, forget_request

ON = FilterConfig(enabled=True)


def _feed(f: TrainingFilter, user: str, items: list[str], times: list[float], source: str = "") -> list:
    return [f.observe(user, i, t, source) for i, t in zip(items, times)]


def test_human_like_sessions_pass() -> None:
    rng = np.random.default_rng(0)
    f = TrainingFilter(ON)
    for u in range(50):
        times = np.cumsum(rng.lognormal(np.log(45.0), 1.0, size=20))
        items = [f"i{int(i)}" for i in rng.integers(0, 500, size=20)]
        assert all(v.learn for v in _feed(f, f"u{u}", items, times.tolist())), u


@pytest.mark.parametrize("gap,jitter,reason", [(0.5, 0.3, RATE), (20.0, 0.0, REGULAR_TIMING)])
def test_bot_sessions_are_flagged_once_judged(gap: float, jitter: float, reason: str) -> None:
    rng = np.random.default_rng(1)
    f = TrainingFilter(ON)
    n = 12
    times = np.cumsum(gap * (1 + jitter * rng.uniform(-1, 1, size=n)))
    verdicts = _feed(f, "bot", [f"i{j}" for j in range(n)], times.tolist())
    k = ON.min_events - 1
    assert all(v.learn for v in verdicts[:k])  # too short to judge
    assert not verdicts[k].learn and verdicts[k].reason == reason and verdicts[k].newly_flagged
    assert all(v.reason == ALREADY_FLAGGED and not v.newly_flagged for v in verdicts[k + 1:])
    assert f.is_flagged("bot")
    f.forget("bot")
    assert not f.is_flagged("bot")


def test_session_length_and_diversity() -> None:
    f = TrainingFilter(FilterConfig(enabled=True, max_session_events=10))
    times = np.cumsum(np.random.default_rng(2).uniform(5, 90, size=12)).tolist()
    v = _feed(f, "long", [f"i{j}" for j in range(12)], times)
    assert v[10].reason == SESSION_LENGTH
    v = _feed(TrainingFilter(ON), "hammer", ["same"] * 12, times)
    first = next(i for i, x in enumerate(v) if not x.learn)
    assert v[first].reason == LOW_DIVERSITY and 1 / (first + 1) < ON.min_item_diversity <= 1 / first


def test_source_allow_list_applies_even_without_anomaly_checks() -> None:
    f = TrainingFilter(FilterConfig(enabled=False, sources=frozenset({"shop-web"})))
    assert f.observe("u", "i", 1.0, "shop-web").learn
    assert f.observe("u", "i", 2.0, "unknown-sdk").reason == SOURCE_NOT_ALLOWED
    assert f.observe("u", "i", 3.0, "").reason == SOURCE_NOT_ALLOWED


def test_config_from_settings() -> None:
    from stream.settings import Settings

    cfg = FilterConfig.from_settings(Settings.of(training_filter=True, training_sources="a, b,", filter_min_events=4))
    assert cfg.enabled and cfg.sources == frozenset({"a", "b"}) and cfg.min_events == 4


def test_event_source_is_the_json_field() -> None:
    assert event_source(b'{"event_source": "web"}') == "web"
    assert event_source(b'{"event_source": 3}') == ""
    assert event_source(b"not json") == "" and event_source(None) == ""


def test_control_records() -> None:
    key, value = forget_request("user-1")
    assert control_action(key, value) == "user-1"
    assert control_action(key, b'{"action": "other"}') is None
    assert control_action(None, value) is None
    assert control_action(b"\xff", value) is None


def test_buffer_remove_user_drops_sessions_reservoir_and_counts() -> None:
    buf = SessionBuffer(max_events=8, max_age_s=1e9, session_gap_s=10.0, reservoir_sessions=10)
    t = 0.0
    for rnd in range(3):
        for u in ("a", "b", "c"):
            for _ in range(2):
                buf.add(u, f"x{u}", t, 1)
                t += 1.0
        t += 100.0  # a new session for everyone: older ones go to the reservoir when evicted
    assert "a" in buf.users() and buf.reservoir_size > 0
    before = buf.n_events
    removed = buf.remove_user("a")
    assert removed > 0 and "a" not in buf.users()
    assert buf.n_events < before
    df = buf.to_frame()
    assert "xa" not in set(df["ItemId"])
    counts, _ = buf.drain_stats()
    assert "xa" not in counts and counts["xb"] > 0
    buf.add("a", "xa", t, 1)  # a new event after the request is kept
    assert "a" in buf.users()
