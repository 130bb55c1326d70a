"""The list published after each user's last event, kept to answer ``GET /users/{id}/recommendations``
without scoring the state again (docs/serving-cost.md). Pure: no Kafka, no web server.

A request for a known user, with the default shape (k at most the stream's K, no filter of its own), is
answered from the user's stored state with the current model and rules: that is exactly the list the
stream published after the user's last event, as long as nothing it depends on has changed since. A
``Stamp`` names what it depends on: the model (its identity and version), the catalogue rules (the
snapshot version) and the consumer generation (a rebalance may have moved the user's partition away
and back, with events applied elsewhere). What changes with time alone (exposure damping, purchase
windows) is bounded by ``max_age_s``: an older list is scored again.

Invariants: an entry is replaced in the event-loop step in which the user's new state becomes readable
(the in-flight overlay, or RocksDB under exactly_once), and dropped in the step in which the state is
deleted (forgotten or evicted), so an entry is never older than the state a request would read. The
stream's loop writes and the requests' thread reads (and drops stale entries): every method holds one lock,
for a dictionary operation or one batch's entries.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterable

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
    """At most ``capacity`` users' lists, the least recently published or asked for leaving first
    (about 0.6 KB each at K=20, measured). ``capacity`` 0 keeps nothing."""

    def __init__(self, capacity: int, max_age_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = max(0, int(capacity))
        self.max_age_s = float(max_age_s)
        self._clock = clock
        self._lists: OrderedDict[bytes, CachedList] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.capacity > 0 and self.max_age_s > 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._lists)

    def remember(self, lists: FinalLists | None, deleted: Iterable[bytes] = ()) -> None:
        """A batch's lists, then the users whose state the same batch deleted (forgotten, evicted)."""
        if lists is not None:
            self._keep(lists)
        self.forget(deleted)

    def _keep(self, lists: FinalLists) -> None:
        stamp = lists.stamp
        if not self.enabled or not lists.keys or stamp is None:
            return
        now = self._clock()
        rows = np.where(lists.rows < 0, -1, lists.rows).astype(np.int32)
        scores = lists.scores.astype(np.float32, copy=False)
        because = lists.because
        entries = [(key, CachedList(rows[j].copy(), scores[j].copy(),  # each user's own copies: a view would
                                    because[j].copy() if because is not None else None,  # keep the batch alive
                                    not bool(lists.has_hidden[j]), stamp, now))
                   for j, key in enumerate(lists.keys)]
        with self._lock:
            cached = self._lists
            for key, entry in entries:
                cached[key] = entry
                cached.move_to_end(key)
            while len(cached) > self.capacity:
                cached.popitem(last=False)

    def forget(self, keys: Iterable[bytes]) -> None:
        with self._lock:
            for key in keys:
                self._lists.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._lists.clear()

    def get(self, key: bytes, stamp: Stamp, k: int) -> CachedList | None:
        """The user's list when it still answers a request for ``k`` items under ``stamp``; else None (and a
        stale entry is dropped)."""
        with self._lock:
            entry = self._lists.get(key)
            if entry is None:
                return None
            if entry.stamp != stamp or self._clock() - entry.at_s > self.max_age_s:
                del self._lists[key]
                return None
            if k > len(entry.rows):
                return None
            self._lists.move_to_end(key)
            return entry
