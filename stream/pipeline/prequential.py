"""Prequential (test-then-train) scoring of a batch: before an event updates its user's state, its item is
looked up in the recommendations last published to that user, and in the top-K of a popularity baseline
counted on this worker's stream (as of the start of the batch), the comparison. Pure."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from state.codec import UserState
from stream.pipeline.events import Event
from stream.pipeline.exposure import PAD


_MAX_PENDING_UPDATES = 64


@dataclass
class Prequential:
    events: int = 0
    hits: int = 0
    reciprocal_rank: float = 0.0


class PopularityBaseline:
    """Running per-row counts of the items seen by this worker; the comparison for prequential metrics.

    ``top`` ranks by count, then row (a total order). Counts only grow, so the top-k after an update lies
    among the previous top-k and the rows updated since: a row in neither was ranked after the previous
    k-th row and still is. ``top`` therefore ranks those candidates instead of the whole catalogue."""

    def __init__(self) -> None:
        self.counts = np.zeros(0, dtype=np.int64)
        self._top = np.zeros(0, dtype=np.int64)  # the exact top-k of the last ``top`` call (zeros included)
        self._touched: list[np.ndarray] = []  # rows updated since

    def top(self, k: int) -> np.ndarray:
        c = self.counts
        if c.shape[0] == 0 or k <= 0:
            return np.zeros(0, dtype=np.int64)
        if len(self._top) == k:
            part = np.unique(np.concatenate([self._top, *self._touched]))
        else:
            kk = min(k, c.shape[0])
            kth = np.partition(c, c.shape[0] - kk)[c.shape[0] - kk]  # the kk-th largest count
            above = np.flatnonzero(c > kth)
            part = np.concatenate([above, np.flatnonzero(c == kth)[:kk - len(above)]])  # ties: lowest rows
        top = part[np.lexsort((part, -c[part]))][:k]  # by count desc, then row asc: deterministic
        self._top, self._touched = top, []
        return top[c[top] > 0]

    def update(self, rows: np.ndarray) -> None:
        rows = rows[rows >= 0]
        if rows.shape[0] == 0:
            return
        need = int(rows.max()) + 1
        if need > self.counts.shape[0]:
            grown = np.zeros(max(need, 2 * self.counts.shape[0]), dtype=np.int64)
            grown[: self.counts.shape[0]] = self.counts
            self.counts = grown
        np.add.at(self.counts, rows, 1)
        self._touched.append(rows)
        if len(self._touched) > _MAX_PENDING_UPDATES:  # nobody asks for the top: rank everything next time
            self._top, self._touched = self._top[:0], []


def prequential_counts(events: list[Event], states: dict[bytes, UserState], rows: np.ndarray,
                       rec_rows: np.ndarray, prev_event: np.ndarray, fresh: np.ndarray, version: int, k: int,
                       popularity: PopularityBaseline | None) -> dict[tuple[str, str], Prequential]:
    """Each fresh event scored against the recommendations its user had before it (``prev_event[i]``, the
    user's previous event in this batch, else the stored ones): (model, version) -> counts, model "gru" or
    "popularity" (version ""). ``rows``: the events' item rows; ``rec_rows``: this batch's lists."""
    n = len(events)
    kk = rec_rows.shape[1]
    prev = np.full((n, max(k, kk)), PAD, dtype=np.int64)
    prev_version = np.full(n, -1, dtype=np.int64)
    in_batch = prev_event >= 0
    prev[in_batch, :kk] = rec_rows[prev_event[in_batch]]
    prev_version[in_batch] = version
    for i in np.flatnonzero(~in_batch).tolist():
        st = states.get(events[i].key)
        if st is not None and st.recs.shape[0]:
            m = min(st.recs.shape[0], prev.shape[1])
            prev[i, :m] = st.recs[:m]
            prev_version[i] = st.model_version
    prev = prev[:, :k]
    scored = (prev_version >= 0) & fresh
    out: dict[tuple[str, str], Prequential] = {}
    if not scored.any():
        return out
    match = (prev == rows[:, None]) & (rows >= 0)[:, None]
    hit = match.any(axis=1)
    rr = np.where(hit, 1.0 / (match.argmax(axis=1) + 1), 0.0)
    for v in np.unique(prev_version[scored]).tolist():
        sel = scored & (prev_version == v)
        out[("gru", str(v))] = Prequential(int(sel.sum()), int(hit[sel].sum()), float(rr[sel].sum()))
    if popularity is not None:
        out[("popularity", "")] = _popularity_counts(popularity.top(k), rows[scored])
    return out


def _popularity_counts(top: np.ndarray, rows: np.ndarray) -> Prequential:
    """``rows`` (the scored events' items) looked up in the baseline's ``top`` rows."""
    if not top.shape[0]:
        return Prequential(rows.shape[0], 0, 0.0)
    pm = (top[None, :] == rows[:, None]) & (rows >= 0)[:, None]
    phit = pm.any(axis=1)
    prr = np.where(phit, 1.0 / (pm.argmax(axis=1) + 1), 0.0)
    return Prequential(rows.shape[0], int(phit.sum()), float(prr.sum()))
