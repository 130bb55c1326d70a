"""Event types shared by the data loaders, the network's event-type embedding and the stream."""

from __future__ import annotations

from enum import IntEnum


class EventType(IntEnum):
    VIEW = 0
    CLICK = 1
    CART = 2
    PURCHASE = 3

    @classmethod
    def parse(cls, name: str) -> "EventType":
        return cls[name.upper()]


N_EVENT_TYPES = len(EventType)
# the names events carry on the wire and metrics use as labels ("view", "click", "cart", "purchase")
EVENT_TYPE_NAMES: dict[int, str] = {int(t): t.name.lower() for t in EventType}
EVENT_TYPES_BY_NAME: dict[str, EventType] = {name: EventType(v) for v, name in EVENT_TYPE_NAMES.items()}
