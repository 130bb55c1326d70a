"""The model a worker serves, swapped atomically between micro-batches."""

from __future__ import annotations

import threading
from typing import Callable

from model.recommender import Recommender


class ModelHolder:
    """Holds the current Recommender. A batch reads ``current`` once at its start and uses that object
    throughout, so a swap never splits a batch across two versions."""

    def __init__(self, initial: Recommender) -> None:
        self._current = initial
        self._lock = threading.Lock()
        self._listeners: list[Callable[[Recommender], None]] = []
        self._preparers: list[Callable[[Recommender], None]] = []

    @property
    def current(self) -> Recommender:
        return self._current

    def swap(self, new: Recommender) -> Recommender:
        for prepare in self._preparers:
            prepare(new)
        with self._lock:
            old, self._current = self._current, new
        for listener in self._listeners:
            listener(new)
        return old

    def on_swap(self, listener: Callable[[Recommender], None]) -> None:
        self._listeners.append(listener)

    def on_prepare(self, preparer: Callable[[Recommender], None]) -> None:
        """``preparer(new)`` runs in the swapping thread BEFORE ``new`` becomes current: per-model work
        (building and calibrating the worker's top-K scorer) is done there, not by the first batch."""
        self._preparers.append(preparer)
