"""The list published after each user's last event, kept to answer ``GET /users/{id}/recommendations``
without scoring the state again (docs/serving-cost.md). Pure: no Kafka, no web server.

A request for a known user, with the default shape (k at most the stream's K, no filter of its own), is
answered from the user's stored state with the current model and rules: that is exactly the list the
stream published after the user's last event, as long as nothing it depends on has changed since. A
``Stamp`` names what it depends on: the model (its identity and version), the catalogue rules (the
snapshot version) and the consumer generation (a rebalance may have moved the user's partition away
and back, with events applied elsewhere). What changes with time alone (exposure damping, purchase
windows) is bounded by ``max_age_s``: an older list is scored again.

Invariants: an entry is replaced just before the user's new state becomes readable (the in-flight
overlay, or RocksDB under exactly_once), and dropped just before the state is deleted (forgotten or evicted)
or discarded (a reset overlay), in the same event-loop step, so an entry is never older than the state a
request would read. The stream's loop writes and the requests' thread reads (and drops stale entries):
every method holds one lock, for a dictionary operation or one batch's entries and deletions.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np


@dataclass(frozen=True)
class Stamp:
    """What a list depends on besides the user's state; a list answers only under an equal stamp."""

    model_id: int
    model_version: int
    catalogue_version: int
    generation: int | None  # the consumer group generation (None before the first assignment)


@dataclass(frozen=True)
class FinalLists:
    """Each user's list after the user's last event of one batch, as one set of arrays: ``rows`` [U, K]
    (-1 ends a list), ``scores`` [U, K], ``because`` [U, K, n] attributed rows (negative: none) or None,
    ``has_hidden`` [U] (False: a cold-start list of popular items)."""

    keys: list[bytes]
    rows: np.ndarray
    scores: np.ndarray
    because: np.ndarray | None
    has_hidden: np.ndarray
    stamp: Stamp | None = None  # set by the worker; unstamped lists are not kept


@dataclass(frozen=True)
class CachedList:
    rows: np.ndarray  # [K] int32, -1 ends the list
    scores: np.ndarray  # [K] float32
    because: np.ndarray | None  # [K, n]
    cold_start: bool
    stamp: Stamp
    at_s: float


class AnswerCache:
    """At most ``capacity`` users' lists, the least recently published or asked for leaving first.

    The lists live in a few arrays with one row per kept user (grown by doubling up to ``capacity``), not in
    an object per user: a batch lands as a handful of array copies, and the users add no objects for Python's
    garbage collector to walk. ``capacity`` 0 keeps nothing."""

    def __init__(self, capacity: int, max_age_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = max(0, int(capacity))
        self.max_age_s = float(max_age_s)
        self._clock = clock
        self._lock = threading.Lock()
        self._reset(0)

    def _reset(self, width: int) -> None:
        """Nothing kept; lists of ``width`` items from now on."""
        self._slot_of: OrderedDict[bytes, int] = OrderedDict()  # least recently used first
        self._free: list[int] = []
        self._stamps: list[Stamp | None] = []
        self._rows = np.empty((0, width), np.int32)
        self._scores = np.empty((0, width), np.float32)
        self._because: np.ndarray | None = None  # [slots, K, n] (negative: none); None until a batch has it
        self._has_because = np.empty(0, bool)
        self._cold = np.empty(0, bool)
        self._at_s = np.empty(0, np.float64)

    @property
    def enabled(self) -> bool:
        return self.capacity > 0 and self.max_age_s > 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._slot_of)

    def remember(self, lists: FinalLists | None, deleted: Iterable[bytes] = ()) -> None:
        """A batch's lists, then the users whose state the same batch deleted (forgotten, evicted), as one
        change: a reader never sees the lists without the deletions."""
        with self._lock:
            if lists is not None:
                self._keep(lists)
            for key in deleted:
                self._drop(key)

    def forget(self, keys: Iterable[bytes]) -> None:
        with self._lock:
            for key in keys:
                self._drop(key)

    def clear(self) -> None:
        with self._lock:
            self._reset(self._rows.shape[1])

    def get(self, key: bytes, stamp: Stamp, k: int) -> CachedList | None:
        """The user's list when it still answers a request for ``k`` items under ``stamp``; else None (and a
        stale entry is dropped)."""
        with self._lock:
            slot = self._slot_of.get(key)
            if slot is None:
                return None
            if self._stamps[slot] != stamp or self._clock() - self._at_s[slot] > self.max_age_s:
                self._drop(key)
                return None
            if k > self._rows.shape[1]:
                return None
            self._slot_of.move_to_end(key)
            because = self._because[slot].copy() if self._because is not None and self._has_because[slot] else None
            return CachedList(self._rows[slot].copy(), self._scores[slot].copy(), because,
                              bool(self._cold[slot]), stamp, float(self._at_s[slot]))

    # --- under the lock ------------------------------------------------------------------------------
    def _keep(self, lists: FinalLists) -> None:
        stamp = lists.stamp
        if not self.enabled or not lists.keys or stamp is None:
            return
        keys, rows, scores, because, has_hidden = (lists.keys, lists.rows, lists.scores, lists.because,
                                                   lists.has_hidden)
        if len(keys) > self.capacity:  # the batch's first users would leave within the batch anyway
            cut = len(keys) - self.capacity
            keys, rows, scores, has_hidden = keys[cut:], rows[cut:], scores[cut:], has_hidden[cut:]
            because = because[cut:] if because is not None else None
        if rows.shape[1] != self._rows.shape[1] or (
                because is not None and self._because is not None and because.shape[2:] != self._because.shape[2:]):
            self._reset(rows.shape[1])  # another list length (another K): the kept lists answer nothing now
        slots = np.fromiter((self._slot(key, stamp) for key in keys), np.intp, len(keys))  # unique keys
        self._rows[slots] = np.where(rows < 0, -1, rows)
        self._scores[slots] = scores
        self._cold[slots] = ~np.asarray(has_hidden, bool)
        self._at_s[slots] = self._clock()
        self._has_because[slots] = because is not None
        if because is not None:
            if self._because is None:
                self._because = np.full((len(self._stamps), *because.shape[1:]), -1, np.int32)
            self._because[slots] = because

    def _slot(self, key: bytes, stamp: Stamp) -> int:
        """The key's row, now the most recently used: its own, a free one, or the least recently used one."""
        slot = self._slot_of.get(key)
        if slot is not None:
            self._slot_of.move_to_end(key)
        else:
            if not self._free and len(self._slot_of) >= self.capacity:
                self._free.append(self._slot_of.popitem(last=False)[1])
            if not self._free:
                self._grow()
            slot = self._slot_of[key] = self._free.pop()
        self._stamps[slot] = stamp
        return slot

    def _drop(self, key: bytes) -> None:
        slot = self._slot_of.pop(key, None)
        if slot is not None:
            self._stamps[slot] = None
            self._free.append(slot)

    def _grow(self) -> None:
        """Doubles the rows (at most to ``capacity``): the new ones go to the free list."""
        old = len(self._stamps)
        new = min(self.capacity, max(64, 2 * old))

        def grown(a: np.ndarray, fill: Any) -> np.ndarray:
            out = np.full((new, *a.shape[1:]), fill, a.dtype)
            out[:old] = a
            return out
        self._rows, self._scores = grown(self._rows, -1), grown(self._scores, 0)
        self._has_because, self._cold, self._at_s = grown(self._has_because, False), grown(self._cold, False), \
            grown(self._at_s, 0.0)
        if self._because is not None:
            self._because = grown(self._because, -1)
        self._stamps.extend([None] * (new - old))
        self._free.extend(range(new - 1, old - 1, -1))
