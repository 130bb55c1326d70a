from __future__ import annotations

import orjson
import pytest

from model.events import EventType
from stream.pipeline import events as ev
from stream.pipeline.events import Event, Limits, Rejected, decode_event

NOW = 1_764_000_000_000  # fixed wall clock for the "future" check
LIMITS = Limits(max_message_bytes=4096, max_id_bytes=32)


def _msg(**fields: object) -> bytes:
    base: dict[str, object] = {"user_id": "u1", "item_id": "i9", "event_type": "click", "ts": NOW - 1000}
    base.update(fields)
    return orjson.dumps({k: v for k, v in base.items() if v is not _DROP})


_DROP = object()


def _decode(value: bytes | None, key: bytes | None = b"u1", kind: str = ev.CLICKS) -> Event | Rejected:
    return decode_event(value, key, kind, LIMITS, topic="t.clicks", partition=3, offset=17, append_ts_ms=NOW,
                        now_ms=NOW)


def test_valid_click_decodes_with_source_metadata() -> None:
    e = _decode(_msg(item_id=12345, price=9.5, quantity=2, session_id="s", category=7, extra={"x": 1}))
    assert isinstance(e, Event)
    assert (e.user_id, e.item_id, e.event_type, e.ts_ms) == ("u1", "12345", int(EventType.CLICK), NOW - 1000)
    assert (e.key, e.topic, e.partition, e.offset, e.source) == (b"u1", "t.clicks", 3, 17, 0)


def test_purchase_on_purchases_topic_and_iso_timestamp() -> None:
    e = _decode(_msg(event_type="purchase", ts="2025-11-24T15:00:00Z"), kind=ev.PURCHASES)
    assert isinstance(e, Event) and e.event_type == int(EventType.PURCHASE) and e.source == 1
    naive = _decode(_msg(ts="2025-11-24T15:00:00"))
    assert isinstance(naive, Event) and naive.ts_ms == e.ts_ms  # naive ISO = UTC


@pytest.mark.parametrize("value,key,kind,reason", [
    (b"{not json", b"u1", ev.CLICKS, ev.NOT_JSON),
    (None, b"u1", ev.CLICKS, ev.NOT_JSON),
    (b"[1,2]", b"u1", ev.CLICKS, ev.NOT_OBJECT),
    (b'"str"', b"u1", ev.CLICKS, ev.NOT_OBJECT),
    (_msg(item_id=_DROP), b"u1", ev.CLICKS, ev.MISSING_FIELD),
    (_msg(ts=None), b"u1", ev.CLICKS, ev.MISSING_FIELD),
    (_msg(user_id=5), b"u1", ev.CLICKS, ev.BAD_TYPE),
    (_msg(item_id=1.5), b"u1", ev.CLICKS, ev.BAD_TYPE),
    (_msg(item_id=True), b"u1", ev.CLICKS, ev.BAD_TYPE),
    (_msg(event_type=3), b"u1", ev.CLICKS, ev.BAD_TYPE),
    (_msg(price="cheap"), b"u1", ev.CLICKS, ev.BAD_TYPE),
    (_msg(quantity=1.5), b"u1", ev.CLICKS, ev.BAD_TYPE),
    (_msg(user_id="", ), b"", ev.CLICKS, ev.EMPTY_ID),
    (_msg(item_id=""), b"u1", ev.CLICKS, ev.EMPTY_ID),
    (_msg(user_id="u" * 33), b"u" * 33, ev.CLICKS, ev.ID_TOO_LONG),
    (_msg(item_id="é" * 20), b"u1", ev.CLICKS, ev.ID_TOO_LONG),  # 20 chars, 40 bytes
    (_msg(event_type="like"), b"u1", ev.CLICKS, ev.UNKNOWN_EVENT_TYPE),
    (_msg(event_type="purchase"), b"u1", ev.CLICKS, ev.WRONG_TOPIC),
    (_msg(event_type="view"), b"u1", ev.PURCHASES, ev.WRONG_TOPIC),
    (_msg(ts="yesterday"), b"u1", ev.CLICKS, ev.BAD_TIMESTAMP),
    (_msg(ts=True), b"u1", ev.CLICKS, ev.BAD_TIMESTAMP),
    (_msg(ts=[1]), b"u1", ev.CLICKS, ev.BAD_TIMESTAMP),
    (_msg(ts=1_700_000_000), b"u1", ev.CLICKS, ev.ABSURD_TIMESTAMP),  # seconds, not milliseconds
    (_msg(ts=NOW + 2 * 86_400_000), b"u1", ev.CLICKS, ev.ABSURD_TIMESTAMP),
    (_msg(ts=-5), b"u1", ev.CLICKS, ev.ABSURD_TIMESTAMP),
    (_msg(pad="x" * 5000), b"u1", ev.CLICKS, ev.OVERSIZE),
    (_msg(), None, ev.CLICKS, ev.KEY_MISMATCH),
    (_msg(), b"u2", ev.CLICKS, ev.KEY_MISMATCH),
])
def test_bad_input_gets_its_reason(value: bytes | None, key: bytes | None, kind: str, reason: str) -> None:
    got = _decode(value, key, kind)
    assert isinstance(got, Rejected), got
    assert got.reason == reason, got.detail
    assert got.detail


def test_every_reason_is_covered_by_a_case() -> None:
    # keeps REASONS and the parametrised cases above in step; unreadable_record is not decode_event's
    # (the record never reached it: tests/unit/stream/kafka/test_record_guard.py)
    names = {ev.NOT_JSON, ev.NOT_OBJECT, ev.MISSING_FIELD, ev.BAD_TYPE, ev.EMPTY_ID, ev.ID_TOO_LONG,
             ev.UNKNOWN_EVENT_TYPE, ev.WRONG_TOPIC, ev.BAD_TIMESTAMP, ev.ABSURD_TIMESTAMP, ev.OVERSIZE,
             ev.KEY_MISMATCH}
    assert names | {ev.UNREADABLE_RECORD} == set(ev.REASONS)


def test_null_optional_fields_count_as_absent() -> None:
    assert isinstance(_decode(_msg(price=None, session_id=None)), Event)
