"""Decoding and validation of input events: every message becomes an ``Event`` or a DLQ reason.

Nothing is dropped silently: a message that is not a valid event gets exactly one reason from
``REASONS`` and goes to the dead-letter topic with its original bytes (see ``stream/worker/sinks.py``, ``dead_letter``).

Accepted JSON object (unknown fields ignored)::

    user_id     string, 1..max_id_bytes UTF-8 bytes; must equal the message key
    item_id     string or integer, 1..max_id_bytes bytes
    event_type  "view" | "click" | "cart" on the clicks topic; "purchase" on the purchases topic
    ts          epoch milliseconds (integer or float) or an ISO-8601 string (naive = UTC)
    session_id  optional string or integer;  price optional number;  category optional string or
    integer;    quantity optional integer     (null counts as absent for the optional fields)

On the one ``events`` topic (GRUFLOW_TOPIC_EVENTS) every event type is accepted and routed by its
``event_type``. An ``InputShape`` (GRUFLOW_FIELD_MAP, GRUFLOW_EVENT_TYPE_MAP) reads events whose fields or
event-type values have the shop's own names; with a field map, an integer user id reads as its decimal text.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import orjson

from model.events import EventType

# DLQ reasons, one per kind of bad input (label values of gruflow_dlq_total{reason})
NOT_JSON = "not_json"
NOT_OBJECT = "not_object"
MISSING_FIELD = "missing_field"
BAD_TYPE = "bad_type"
EMPTY_ID = "empty_id"
ID_TOO_LONG = "id_too_long"
UNKNOWN_EVENT_TYPE = "unknown_event_type"
WRONG_TOPIC = "wrong_topic"  # purchase on clicks, or view/click/cart on purchases
BAD_TIMESTAMP = "bad_timestamp"
ABSURD_TIMESTAMP = "absurd_timestamp"
OVERSIZE = "oversize"
KEY_MISMATCH = "key_mismatch"  # key absent or not the user id: state would land on the wrong partition
# stored by the broker but not parseable by the client (a header name that is not UTF-8, a batch whose codec
# is missing): stream/kafka/record_guard.py marks it, the worker dead-letters what could be read of it
UNREADABLE_RECORD = "unreadable_record"
REASONS = (NOT_JSON, NOT_OBJECT, MISSING_FIELD, BAD_TYPE, EMPTY_ID, ID_TOO_LONG, UNKNOWN_EVENT_TYPE, WRONG_TOPIC,
           BAD_TIMESTAMP, ABSURD_TIMESTAMP, OVERSIZE, KEY_MISMATCH, UNREADABLE_RECORD)

# Timestamps before 1990 (MovieLens starts in 1995) or more than a day ahead of the wall clock are
# taken as unit mistakes (seconds sent as milliseconds) or garbage.
MIN_TS_MS = 631_152_000_000
MAX_FUTURE_MS = 86_400_000

CLICKS, PURCHASES, EVENTS = "clicks", "purchases", "events"
# index of a topic's applied offset in the user's state: the one events topic uses the clicks slot
SOURCES = {CLICKS: 0, PURCHASES: 1, EVENTS: 0}
FIELDS = ("user_id", "item_id", "event_type", "ts", "session_id", "price", "category", "quantity")
_TYPES = {"view": EventType.VIEW, "click": EventType.CLICK, "cart": EventType.CART,
          "purchase": EventType.PURCHASE}
_OPTIONAL = {"session_id": (str, int), "price": (int, float), "category": (str, int), "quantity": (int,)}


@dataclass(slots=True)
class Event:
    user_id: str
    item_id: str
    event_type: int  # model.events.EventType value
    ts_ms: int
    key: bytes  # user id as UTF-8: the state table key and output key
    topic: str
    partition: int
    offset: int
    append_ts_ms: int  # broker/producer timestamp of the message, for end-to-end latency
    source: int = 0  # 0 = clicks topic, 1 = purchases topic (index of the applied offset in the state)
    price: float | None = None  # side features (model.features); None when absent
    category: str | None = None


@dataclass(frozen=True, slots=True)
class Rejected:
    reason: str
    detail: str


@dataclass(frozen=True)
class InputShape:
    """Names of the shop's fields and event types: ``fields`` maps gruflow's field name to the shop's,
    ``types`` the shop's event_type value to gruflow's. Empty = gruflow's own names."""

    fields: tuple[tuple[str, str], ...] = ()
    types: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, field_map: str, event_type_map: str) -> "InputShape":
        """From "ours=theirs,..." and "theirs=ours,..."; ValueError names what is wrong."""
        fields = _pairs(field_map, "GRUFLOW_FIELD_MAP")
        for ours, _ in fields:
            if ours not in FIELDS:
                raise ValueError(f"GRUFLOW_FIELD_MAP: {ours!r} is not one of gruflow's fields {list(FIELDS)}")
        types = _pairs(event_type_map, "GRUFLOW_EVENT_TYPE_MAP")
        for _, ours in types:
            if ours not in _TYPES:
                raise ValueError(f"GRUFLOW_EVENT_TYPE_MAP: {ours!r} is not one of {sorted(_TYPES)}")
        return cls(tuple(fields), tuple(types))

    @property
    def active(self) -> bool:
        return bool(self.fields or self.types)

    def apply(self, obj: dict) -> dict:
        """``obj`` with gruflow's names (a new dict; the shop's other fields are kept)."""
        out = dict(obj)
        for ours, theirs in self.fields:
            if theirs in obj:
                out[ours] = obj[theirs]
            elif ours in out and ours != theirs:
                del out[ours]  # our name on the shop's event means something else there
        uid = out.get("user_id")
        if self.fields and isinstance(uid, int) and not isinstance(uid, bool):
            out["user_id"] = str(uid)
        etype = out.get("event_type")
        if self.types and isinstance(etype, str):
            out["event_type"] = dict(self.types).get(etype, etype)
        return out


def _pairs(raw: str, name: str) -> list[tuple[str, str]]:
    out = []
    for part in raw.replace(";", ",").split(","):
        if not part.strip():
            continue
        left, sep, right = part.partition("=")
        if not sep or not left.strip() or not right.strip():
            raise ValueError(f"{name}: {part.strip()!r} is not name=name")
        out.append((left.strip(), right.strip()))
    return out


@dataclass(frozen=True)
class Limits:
    max_message_bytes: int = 65536
    max_id_bytes: int = 256


def decode_event(value: bytes | None, key: bytes | None, topic_kind: str, limits: Limits, *, topic: str = "",
                 partition: int = -1, offset: int = -1, append_ts_ms: int = 0,
                 now_ms: int | None = None, shape: InputShape | None = None) -> Event | Rejected:
    """Validate one message. ``topic_kind`` is ``"clicks"``, ``"purchases"`` or ``"events"`` (any type)."""
    if value is None:
        return Rejected(NOT_JSON, "empty message (null value)")
    if len(value) > limits.max_message_bytes:
        return Rejected(OVERSIZE, f"message of {len(value)} bytes exceeds {limits.max_message_bytes}")
    try:
        obj = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        return Rejected(NOT_JSON, f"not JSON: {exc}")
    if not isinstance(obj, dict):
        return Rejected(NOT_OBJECT, f"JSON {type(obj).__name__}, expected an object")
    if shape is not None:
        obj = shape.apply(obj)

    for name in ("user_id", "item_id", "event_type", "ts"):
        if obj.get(name) is None:
            return Rejected(MISSING_FIELD, f"field {name!r} is missing")

    user_id = obj["user_id"]
    if not isinstance(user_id, str):
        return Rejected(BAD_TYPE, f"user_id is {type(user_id).__name__}, expected string")
    item_id = obj["item_id"]
    if isinstance(item_id, int) and not isinstance(item_id, bool):
        item_id = str(item_id)
    elif not isinstance(item_id, str):
        return Rejected(BAD_TYPE, f"item_id is {type(item_id).__name__}, expected string or integer")
    for name, ident in (("user_id", user_id), ("item_id", item_id)):
        if not ident:
            return Rejected(EMPTY_ID, f"{name} is empty")
        n = len(ident.encode("utf-8")) if len(ident) * 4 > limits.max_id_bytes else len(ident)
        if n > limits.max_id_bytes:
            return Rejected(ID_TOO_LONG, f"{name} has {n} bytes, limit {limits.max_id_bytes}")

    etype = obj["event_type"]
    if not isinstance(etype, str):
        return Rejected(BAD_TYPE, f"event_type is {type(etype).__name__}, expected string")
    event_type = _TYPES.get(etype)
    if event_type is None:
        return Rejected(UNKNOWN_EVENT_TYPE, f"event_type {etype[:40]!r} is not one of {sorted(_TYPES)}")
    if topic_kind != EVENTS and (event_type == EventType.PURCHASE) != (topic_kind == PURCHASES):
        return Rejected(WRONG_TOPIC, f"event_type {etype!r} on the {topic_kind} topic")

    ts = parse_ts(obj["ts"])
    if isinstance(ts, Rejected):
        return ts
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    if ts < MIN_TS_MS or ts > now_ms + MAX_FUTURE_MS:
        return Rejected(ABSURD_TIMESTAMP, f"ts {ts} ms is before 1990 or more than a day in the future")

    for name, types in _OPTIONAL.items():
        v = obj.get(name)
        if v is not None and (not isinstance(v, types) or isinstance(v, bool)):
            return Rejected(BAD_TYPE, f"{name} is {type(v).__name__}")

    key_bytes = user_id.encode("utf-8")
    if key != key_bytes:
        return Rejected(KEY_MISMATCH, "message key is missing" if key is None else
                        "message key differs from user_id")
    price, category = obj.get("price"), obj.get("category")
    return Event(user_id, item_id, int(event_type), ts, key_bytes, topic, partition, offset, append_ts_ms,
                 SOURCES[topic_kind], None if price is None else float(price),
                 None if category is None else str(category))


def parse_ts(raw: object) -> int | Rejected:
    """Epoch milliseconds from a number or an ISO-8601 string."""
    if isinstance(raw, bool):
        return Rejected(BAD_TIMESTAMP, "ts is a boolean")
    if isinstance(raw, int):
        return raw
    if isinstance(raw, float):
        if not math.isfinite(raw):
            return Rejected(BAD_TIMESTAMP, "ts is not finite")
        return int(raw)
    if isinstance(raw, str):
        try:
            dt = datetime.fromisoformat(raw)
        except ValueError:
            return Rejected(BAD_TIMESTAMP, f"ts {raw[:40]!r} is not ISO-8601")
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=timezone.utc)
        return int(dt.timestamp() * 1000)
    return Rejected(BAD_TIMESTAMP, f"ts is {type(raw).__name__}, expected number or ISO-8601 string")
