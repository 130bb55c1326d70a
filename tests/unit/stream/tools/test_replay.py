"""The replay's message building and pacing, without a broker (the broker round trip is in
tests/integration/test_broker.py)."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from model.data import event_table
from model.events import EventType
from stream.tools.replay import _Pacer, encode_event, iter_messages, time_order
from stream.settings import Settings
from stream.tools.tail import format_recommendation


def _table():
    # two sessions interleaved in time; the table itself is sorted by session
    return event_table(
        session_ids=[7, 7, 7, 3, 3],
        item_ids=["a", "b", "c", "x", "y"],
        times=[100.0, 300.0, 300.5, 200.0, 250.0],
        event_types=[EventType.VIEW, EventType.CART, EventType.PURCHASE, EventType.CLICK, EventType.VIEW],
    )


def test_messages_in_event_time_order_keyed_by_session_user():
    settings = Settings.of(topic_prefix="p.")
    messages = list(iter_messages(settings, _table()))
    events = [orjson.loads(value) for _, _, value, _ in messages]
    assert [e["ts"] for e in events] == sorted(e["ts"] for e in events) == [100000, 200000, 250000, 300000, 300500]
    for topic, key, _, ts in messages:
        assert key.decode() in ("3", "7")
    assert all(key.decode() == e["user_id"] for (_, key, _, _), e in zip(messages, events))
    assert [e["event_type"] for e in events] == ["view", "click", "view", "cart", "purchase"]
    assert [m[0] for m in messages] == ["p.clicks"] * 4 + ["p.purchases"]
    assert set(events[0]) == {"user_id", "item_id", "event_type", "ts"}


def test_limit_takes_the_earliest_events():
    df = _table()
    assert len(time_order(df, 2)) == 2
    items = [orjson.loads(v)["item_id"] for _, _, v, _ in iter_messages(Settings(), df, limit=2)]
    assert items == ["a", "x"]


def test_encode_event_drops_absent_optionals():
    event = orjson.loads(encode_event("u", 5, "view", 1, price=9.5, category=None))
    assert event == {"user_id": "u", "item_id": 5, "event_type": "view", "ts": 1, "price": 9.5}


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_pacer_rate_cap_spaces_events():
    clock = FakeClock()
    pacer = _Pacer(rate=200.0, speedup=None, clock=clock, sleep=clock.sleep)
    sent_at = []
    for i in range(21):
        pacer.wait(i, 0)
        sent_at.append(clock.now)
    assert sent_at[-1] == pytest.approx(20 / 200.0)
    assert np.all(np.diff(sent_at) >= 0)


def test_pacer_speedup_divides_event_time_gaps():
    clock = FakeClock()
    pacer = _Pacer(rate=None, speedup=100.0, clock=clock, sleep=clock.sleep)
    sent_at = []
    for i, ts in enumerate([5_000, 5_000, 6_000, 15_000]):  # event-time ms
        pacer.wait(i, ts)
        sent_at.append(clock.now)
    assert sent_at == pytest.approx([0.0, 0.0, 0.01, 0.1])


def test_pacer_uses_the_stricter_of_rate_and_speedup():
    clock = FakeClock()
    pacer = _Pacer(rate=10.0, speedup=1000.0, clock=clock, sleep=clock.sleep)
    for i, ts in enumerate([0, 1, 2, 60_000]):
        pacer.wait(i, ts)
    assert clock.now == pytest.approx(max(3 / 10.0, 60.0 / 1000.0))


def test_no_pacing_never_sleeps():
    clock = FakeClock()
    pacer = _Pacer(rate=None, speedup=None, clock=clock, sleep=clock.sleep)
    assert not pacer.active


@pytest.mark.parametrize("rate,speedup", [(0, None), (None, -1.0)])
def test_pacer_rejects_nonsense(rate, speedup):
    with pytest.raises(ValueError):
        _Pacer(rate, speedup)


def test_tail_line_format():
    value = orjson.dumps({"user_id": "u1", "items": [{"item_id": f"i{n}", "score": 1 / (n + 1)} for n in range(7)],
                          "model_version": 3, "event_ts": 1000, "published_ts": 1012})
    line = format_recommendation(value, items=2)
    assert line.startswith("user=u1  model=3  [i0(1), i1(0.5), +5]")
    assert "12 ms" in line
    assert format_recommendation(b"\xff not json").startswith("(unreadable)")
