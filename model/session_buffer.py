"""The fine-tuner's input: a bounded buffer of recent sessions plus a reservoir of older ones.

Pure library code (no Kafka): the trainer process feeds ``SessionBuffer`` from the stream and takes a
snapshot (``to_frame``) and the drained item statistics (``drain_stats``) for each fine-tune round
(:mod:`model.finetune`).
"""

from __future__ import annotations

import math
import random
import sys
from array import array
from collections import Counter, OrderedDict
from typing import Iterable

import numpy as np
import pandas as pd

# rough per-session bookkeeping cost in the buffer (objects, containers, ordered-dict entry)
_SESSION_OVERHEAD_BYTES = 400
# list slot + float64 time + int8 type + category list slot (interned strings) + float64 price
_EVENT_FIXED_BYTES = 8 + 8 + 1 + 8 + 8


class _Session:
    __slots__ = ("sid", "key", "items", "times", "types", "cats", "prices", "last")

    def __init__(self, sid: int, key: str) -> None:
        self.sid = sid
        self.key = key
        self.items: list[str] = []
        self.times = array("d")
        self.types = bytearray()
        self.cats: list[str | None] = []  # side features (model.features): None / NaN when absent
        self.prices = array("d")
        self.last = -math.inf

    def __len__(self) -> int:
        return len(self.items)


class SessionBuffer:
    """Recent sessions, bounded by event count and by event-time age, plus an optional reservoir.

    A user's events form one session until a gap longer than ``session_gap_s`` (event time). When a
    session leaves the buffer (oldest activity first) it is offered to a uniform reservoir of older
    sessions (Algorithm R), which a round trains on too so the model does not forget the past. Not
    thread-safe: the trainer guards it with its own lock.
    """

    def __init__(self, max_events: int, max_age_s: float, session_gap_s: float = 1800.0,
                 reservoir_sessions: int = 0, seed: int = 0) -> None:
        if max_events < 1:
            raise ValueError("buffer max_events must be >= 1")
        self.max_events = max_events
        self.max_age_s = max_age_s
        self.session_gap_s = session_gap_s
        self.reservoir_sessions = max(0, reservoir_sessions)
        self._sessions: OrderedDict[int, _Session] = OrderedDict()  # by last activity, oldest first
        self._open: dict[str, _Session] = {}
        self._reservoir: list[_Session] = []
        self._offered = 0
        self._rng = random.Random(seed)
        self._next_sid = 0
        self._events = 0
        self._bytes = 0
        self._reservoir_events = 0
        self._reservoir_bytes = 0
        self.newest_time = -math.inf
        self.first_time = math.inf
        self.total_added = 0
        self._counts: Counter[str] = Counter()
        self._last_seen: dict[str, float] = {}

    # --- sizes
    @property
    def n_events(self) -> int:
        return self._events

    @property
    def n_sessions(self) -> int:
        return len(self._sessions)

    @property
    def reservoir_size(self) -> int:
        return len(self._reservoir)

    @property
    def nbytes(self) -> int:
        """Approximate memory held (recent sessions + reservoir), in bytes."""
        return self._bytes + self._reservoir_bytes

    @staticmethod
    def _event_bytes(item_id: str) -> int:
        return _EVENT_FIXED_BYTES + sys.getsizeof(item_id)

    @classmethod
    def _session_bytes(cls, s: _Session) -> int:
        return _SESSION_OVERHEAD_BYTES + sys.getsizeof(s.key) + sum(map(cls._event_bytes, s.items))

    # --- input
    def add(self, key: str, item_id: str, ts: float, event_type: int = 1, category: str | None = None,
            price: float | None = None) -> None:
        item_id = str(item_id)
        s = self._open.get(key)
        if s is None or ts - s.last > self.session_gap_s:
            s = _Session(self._next_sid, key)
            self._next_sid += 1
            self._open[key] = s
            self._sessions[s.sid] = s
            self._bytes += _SESSION_OVERHEAD_BYTES + sys.getsizeof(key)
        else:
            self._sessions.move_to_end(s.sid)
        s.items.append(item_id)
        s.times.append(ts)
        s.types.append(int(event_type) & 0x7F)
        s.cats.append(None if category is None else sys.intern(str(category)))
        s.prices.append(math.nan if price is None else float(price))
        s.last = max(s.last, ts)
        self._events += 1
        self._bytes += self._event_bytes(item_id)
        self.total_added += 1
        self.newest_time = max(self.newest_time, ts)
        self.first_time = min(self.first_time, ts)
        self._counts[item_id] += 1
        if ts > self._last_seen.get(item_id, -math.inf):
            self._last_seen[item_id] = ts
        self._evict()

    def add_many(self, keys: Iterable[str], items: Iterable[str], times: Iterable[float],
                 types: Iterable[int]) -> None:
        for k, i, t, e in zip(keys, items, times, types):
            self.add(k, i, t, e)

    def _evict(self) -> None:
        horizon = self.newest_time - self.max_age_s
        while self._sessions:
            oldest = next(iter(self._sessions.values()))
            if self._events <= self.max_events and oldest.last >= horizon:
                break
            del self._sessions[oldest.sid]
            if self._open.get(oldest.key) is oldest:
                del self._open[oldest.key]
            self._events -= len(oldest)
            size = self._session_bytes(oldest)
            self._bytes -= size
            self._offer(oldest, size)

    def _offer(self, s: _Session, size: int) -> None:
        if self.reservoir_sessions == 0 or len(s) < 2:
            return
        self._offered += 1
        if len(self._reservoir) < self.reservoir_sessions:
            slot = len(self._reservoir)
            self._reservoir.append(s)
        else:
            slot = self._rng.randrange(self._offered)
            if slot >= self.reservoir_sessions:
                return
            old = self._reservoir[slot]
            self._reservoir_events -= len(old)
            self._reservoir_bytes -= self._session_bytes(old)
            self._reservoir[slot] = s
        self._reservoir_events += len(s)
        self._reservoir_bytes += size

    def remove_user(self, key: str) -> int:
        """Drop every session of ``key`` (recent and reservoir) and its items from the not yet drained
        counts: a user flagged as a bot, or one who asked to be forgotten. Returns the events removed.
        O(sessions). A session evicted without entering the reservoir is already gone; its items stay
        in the counts until the next drain (counts never go below 0)."""
        removed = 0
        for sid in [sid for sid, s in self._sessions.items() if s.key == key]:
            s = self._sessions.pop(sid)
            self._events -= len(s)
            self._bytes -= self._session_bytes(s)
            removed += self._uncount(s)
        self._open.pop(key, None)
        kept = []
        for s in self._reservoir:
            if s.key == key:
                self._reservoir_events -= len(s)
                self._reservoir_bytes -= self._session_bytes(s)
                removed += self._uncount(s)
            else:
                kept.append(s)
        self._reservoir = kept
        return removed

    def _uncount(self, s: _Session) -> int:
        for item in s.items:
            left = self._counts.get(item, 0) - 1
            if left > 0:
                self._counts[item] = left
            else:
                self._counts.pop(item, None)
        return len(s)

    def users(self) -> set[str]:
        """Keys with at least one session held (recent or reservoir)."""
        return {s.key for s in self._sessions.values()} | {s.key for s in self._reservoir}

    # --- output
    def drain_stats(self) -> tuple[Counter[str], dict[str, float]]:
        """Item counts and last-seen times accumulated since the previous call (bounded by the
        number of distinct items between two rounds)."""
        counts, last = self._counts, self._last_seen
        self._counts, self._last_seen = Counter(), {}
        return counts, last

    def to_frame(self, include_reservoir: bool = True) -> pd.DataFrame:
        """The buffer as an event table (SessionId, ItemId, Time, EventType, Category, Price), sorted by
        session then time; a column ``Recent`` marks sessions of the recent buffer (False = reservoir)."""
        sessions = list(self._sessions.values())
        recent = [True] * len(sessions)
        if include_reservoir:
            sessions += self._reservoir
            recent += [False] * len(self._reservoir)
        lengths = np.fromiter((len(s) for s in sessions), dtype=np.int64, count=len(sessions))
        n = int(lengths.sum())
        sid = np.repeat(np.fromiter((s.sid for s in sessions), dtype=np.int64, count=len(sessions)), lengths)
        items = [i for s in sessions for i in s.items]
        times = np.concatenate([np.frombuffer(s.times, dtype=np.float64) for s in sessions]) if n else np.zeros(0)
        types = np.frombuffer(b"".join(bytes(s.types) for s in sessions), dtype=np.int8) if n else np.zeros(0, np.int8)
        cats = pd.Series([c for s in sessions for c in s.cats], dtype=object)
        prices = np.concatenate([np.frombuffer(s.prices, dtype=np.float64) for s in sessions]) if n else np.zeros(0)
        df = pd.DataFrame({"SessionId": sid, "ItemId": pd.Series(items, dtype=object), "Time": times,
                           "EventType": types.astype(np.int8), "Category": cats, "Price": prices,
                           "Recent": np.repeat(np.array(recent, bool), lengths)})
        return df.sort_values(["SessionId", "Time"], kind="stable").reset_index(drop=True)
