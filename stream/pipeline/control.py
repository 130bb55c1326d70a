"""Records of the control topic and the event source field: pure codecs (no Kafka).

The control topic is keyed by user id and partitioned like the input topics, so a request about a
user reaches the worker that holds the user's state; the trainer reads it too (docs/security.md).
"""

from __future__ import annotations

import time

import orjson

SOURCE_FIELD = "event_source"
FORGET = "forget"


def forget_request(user_id: str) -> tuple[bytes, bytes]:
    """(key, value) of a control-topic record asking every store to drop ``user_id``."""
    return user_id.encode("utf-8"), orjson.dumps({"action": FORGET, "requested_at": int(time.time() * 1000)})


def control_action(key: bytes | None, value: bytes | None) -> str | None:
    """The user id a control record asks to forget, or None for anything else (ignored, not fatal)."""
    if not key or value is None:
        return None
    try:
        obj = orjson.loads(value)
        user = key.decode("utf-8")
    except (orjson.JSONDecodeError, UnicodeDecodeError):
        return None
    return user if isinstance(obj, dict) and obj.get("action") == FORGET else None


def event_source(value: bytes | None) -> str:
    """An event's source for the allow-list: its JSON field ``event_source``, else "".

    Not a header: the trainer reads the input topics with confluent-kafka, whose ``Message.headers()``
    can raise on, and then crash the process over, a header name that is not UTF-8 (a record the broker
    accepts; docs/unreadable-records.md). The value is read anyway to decode the event."""
    try:
        obj = orjson.loads(value) if value else None
    except orjson.JSONDecodeError:
        return ""
    src = obj.get(SOURCE_FIELD) if isinstance(obj, dict) else None
    return src if isinstance(src, str) else ""
