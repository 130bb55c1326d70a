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
