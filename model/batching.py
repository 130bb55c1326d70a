"""Session-parallel mini-batches, as in the reference GRU4Rec.

B slots each run one session; every step feeds each slot's current event and asks for its next one.
When a slot's session has no next event left, the slot takes the next session (in start-time order)
and its hidden state is zeroed; when no sessions are left, the slot is dropped and the batch shrinks.
The schedule is produced in *chunks*: all slots advance ``n_steps`` events together (the shortest
remaining session decides), then the finished slots are refilled. Training and evaluation share it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class SessionIndex:
    """Events of one table in flat arrays, sessions contiguous; ``order`` = sessions by start time."""

    items: np.ndarray  # int64 row per event
    event_types: np.ndarray  # int64 per event
    offsets: np.ndarray  # int64 [n_sessions + 1]
    order: np.ndarray  # int64 session indices sorted by first event time (stable)
    features: np.ndarray | None = None  # int64 [n_events, N_FEATURES] (model.features), or None

    @property
    def n_events(self) -> int:
        return int(len(self.items))

    @property
    def n_sessions(self) -> int:
        return int(len(self.offsets) - 1)

    @property
    def n_predictions(self) -> int:
        """Events that have a previous event in their session (what next-item prediction scores)."""
        return self.n_events - self.n_sessions


def index_sessions(df: pd.DataFrame, rows: np.ndarray, features: np.ndarray | None = None) -> SessionIndex:
    """Build a :class:`SessionIndex` from an event table and per-event item ``rows``.

    Each session's events must be in time order; sessions that are not contiguous are sorted by
    (SessionId, Time). Events whose row is negative (unknown item) are dropped first, as the reference
    does. ``features`` (per event of ``df``, computed before the drop, as the stream does) travel along."""
    keep = rows >= 0
    feats = None if features is None else np.asarray(features, dtype=np.int64)[keep]
    sid = df["SessionId"].to_numpy()[keep]
    times = df["Time"].to_numpy(dtype=np.float64)[keep]
    items = rows[keep].astype(np.int64)
    if "EventType" in df.columns:
        types = df["EventType"].to_numpy().astype(np.int64)[keep]
    else:
        types = np.ones(len(items), dtype=np.int64)
    if len(sid) and np.any(sid[1:] < sid[:-1]):
        change = np.count_nonzero(sid[1:] != sid[:-1]) + 1
        if change != len(np.unique(sid)):  # sessions not contiguous: sort like the reference does
            order = np.lexsort((np.arange(len(sid)), times, sid))
            sid, times, items, types = sid[order], times[order], items[order], types[order]
            feats = None if feats is None else feats[order]
    starts = np.flatnonzero(np.r_[True, sid[1:] != sid[:-1]]) if len(sid) else np.zeros(0, dtype=np.int64)
    offsets = np.r_[starts, len(sid)].astype(np.int64)
    order = np.argsort(times[starts], kind="stable").astype(np.int64) if len(starts) else starts.astype(np.int64)
    return SessionIndex(items, types, offsets, order, feats)


@dataclass(frozen=True)
class Chunk:
    """``n_steps`` steps for the current slots; event positions of the inputs are
    ``start + i`` for step i (targets are the next position). After the chunk, slots with
    ``finished`` set start a new session (zero their state), and only ``keep`` slots survive."""

    start: np.ndarray  # int64 [b] position of each slot's current event
    n_steps: int
    finished: np.ndarray  # bool [b]
    keep: np.ndarray  # bool [b]

    def input_positions(self) -> np.ndarray:
        """[n_steps, b] event positions fed at each step (targets: +1)."""
        return self.start[None, :] + np.arange(self.n_steps, dtype=np.int64)[:, None]


def session_parallel(index: SessionIndex, batch_size: int, min_active: int = 1) -> Iterator[Chunk]:
    """Yield the chunks of one pass over all sessions with ``batch_size`` slots.

    Iteration stops when fewer than ``min_active`` slots remain (the reference stops at 2 when there are
    no sampled negatives, because in-batch negatives need a second session)."""
    n_sessions = index.n_sessions
    if n_sessions == 0:
        return
    offsets, order = index.offsets, index.order
    b = min(batch_size, n_sessions)
    slot_session = np.arange(b, dtype=np.int64)  # position in ``order``
    start = offsets[order[slot_session]].copy()
    end = offsets[order[slot_session] + 1].copy()
    next_session = b
    while True:
        n_steps = int((end - start).min()) - 1
        start_chunk = start.copy()
        start = start + max(n_steps, 0)
        finished = (end - start) <= 1
        n_new = int(finished.sum())
        new_ids = next_session + np.arange(n_new, dtype=np.int64)
        next_session += n_new
        slot_session = slot_session.copy()
        slot_session[finished] = new_ids
        keep = slot_session < n_sessions
        yield Chunk(start_chunk, max(n_steps, 0), finished, keep)
        if int(keep.sum()) < max(min_active, 1):
            return
        refill = finished & keep
        sess = order[slot_session[refill]]
        start[refill] = offsets[sess]
        end[refill] = offsets[sess + 1]
        slot_session, start, end = slot_session[keep], start[keep], end[keep]
