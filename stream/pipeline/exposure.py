"""Per-item exposure cap: no item takes more than a share of the lists published in a sliding window.

Soft limiting (the output layer's defence against one item, promoted or attacked, flooding every list):
past its cap an item is not dropped, its score is damped, as if the model's probability of it were
divided by ``damping`` (a logit loses ln(damping); a popularity count is divided by it). It then stays
only in lists where it still beats the other candidates by that much.

Pure (numpy only), thread-safe. The API:

- ``ExposureWindow(window_s)``: counts of lists published and of lists holding each item (vocabulary
  row), over the last ``window_s`` seconds, in ``BUCKETS`` time buckets; ``record(rows, now_s)`` adds
  published lists, ``totals(now_s)`` reads the window.
- ``damp(window, rows, scores, k, cap, damping, log_scores, now_s)`` picks the K of each row's ranked
  candidates with the cap applied, in row order (a batch's lists count against the cap one after the
  other), and returns them with how many capped items left a list. It does not record: call
  ``window.record`` with what is really published.

Invariant: with enough candidates per row and scores within ln(damping) of each other, an item is in at
most ``floor(cap * max(lists in the window, MIN_LISTS))`` lists of the window after the batch.
"""

from __future__ import annotations

import math
import threading
from collections import deque

import numpy as np

BUCKETS = 10
# the cap counts against at least this many lists: while the window is young (start-up), one list is
# not yet "a share" of anything, and every item of the first lists would be over any cap below 1
MIN_LISTS = 100
# an empty slot of a row (fewer candidates than K, fewer popular items than K); never equal to a row or to
# -1 (an unknown item), so a padded slot never matches an event's item
PAD = -2


class ExposureWindow:
    """Sliding-window counts of published lists, per item row. Bucketed: an old list leaves the window
    in one piece with its bucket (``window_s / BUCKETS`` of time resolution)."""

    def __init__(self, window_s: float, buckets: int = BUCKETS) -> None:
        self.window_s = float(window_s)
        self.bucket_s = self.window_s / buckets
        self._buckets: deque = deque()  # [bucket start s, lists, per-row counts]
        self._lists = 0
        self._counts = np.zeros(0, dtype=np.int64)
        self._lock = threading.Lock()

    def _expire(self, now_s: float) -> None:
        while self._buckets and self._buckets[0][0] <= now_s - self.window_s:
            _, lists, counts = self._buckets.popleft()
            self._lists -= lists
            self._counts[:counts.shape[0]] -= counts

    def record(self, rows: np.ndarray, now_s: float) -> None:
        """Add published lists: ``rows`` [lists, K] of item rows, ``PAD`` or negative for empty slots."""
        rows = np.asarray(rows)
        valid = rows[rows >= 0]
        counts = np.bincount(valid, minlength=0).astype(np.int64) if valid.shape[0] else np.zeros(0, np.int64)
        with self._lock:
            self._expire(now_s)
            if counts.shape[0] > self._counts.shape[0]:
                grown = np.zeros(max(counts.shape[0], 2 * self._counts.shape[0]), dtype=np.int64)
                grown[:self._counts.shape[0]] = self._counts
                self._counts = grown
            start = now_s - now_s % self.bucket_s
            if not self._buckets or self._buckets[-1][0] != start:
                self._buckets.append([start, 0, np.zeros(0, dtype=np.int64)])
            bucket = self._buckets[-1]
            if counts.shape[0] > bucket[2].shape[0]:
                grown = np.zeros(counts.shape[0], dtype=np.int64)
                grown[:bucket[2].shape[0]] = bucket[2]
                bucket[2] = grown
            bucket[1] += rows.shape[0]
            bucket[2][:counts.shape[0]] += counts
            self._lists += rows.shape[0]
            self._counts[:counts.shape[0]] += counts

    def totals(self, now_s: float) -> tuple[int, np.ndarray]:
        """(lists in the window, a copy of the per-row counts of lists holding each item)."""
        with self._lock:
            self._expire(now_s)
            return self._lists, self._counts.copy()

    def share(self, row: int, now_s: float) -> float:
        lists, counts = self.totals(now_s)
        return float(counts[row]) / lists if lists and row < counts.shape[0] else 0.0


def over_cap(window: ExposureWindow, first: np.ndarray, cap: float, now_s: float) -> np.ndarray:
    """[rows, K] bool: which entries of ``first`` (the lists as ranked without the cap, in publishing order)
    would take their item past ``cap``: an item may be in ``floor(cap * max(lists in window + rows,
    MIN_LISTS))`` lists,
    less those of the window; its first occurrences keep the remaining room."""
    lists, counts = window.totals(now_s)
    flat = first.ravel()
    valid = flat >= 0
    flags = np.zeros(flat.shape[0], dtype=bool)
    if not valid.any():
        return flags.reshape(first.shape)
    items = flat[valid]
    limit = math.floor(cap * max(lists + first.shape[0], MIN_LISTS))
    seen = np.zeros(int(items.max()) + 1, dtype=np.int64)
    m = min(seen.shape[0], counts.shape[0])
    seen[:m] = counts[:m]
    room = np.maximum(limit - seen, 0)
    order = np.argsort(items, kind="stable")  # by item, then publishing order
    sorted_items = items[order]
    starts = np.flatnonzero(np.r_[True, sorted_items[1:] != sorted_items[:-1]])
    run_start = np.repeat(starts, np.diff(np.r_[starts, sorted_items.shape[0]]))
    nth = np.empty(items.shape[0], dtype=np.int64)
    nth[order] = np.arange(items.shape[0]) - run_start  # 0 for an item's first list in this batch
    flags[np.flatnonzero(valid)] = nth >= room[items]
    return flags.reshape(first.shape)


def damp(window: ExposureWindow, rows: np.ndarray, scores: np.ndarray, k: int, cap: float, damping: float,
         log_scores: np.ndarray | bool, now_s: float) -> tuple[np.ndarray, np.ndarray, int]:
    """The top ``k`` of each row's ranked candidates (``rows``/``scores`` [n, w], best first, ``PAD`` last)
    after capped items' scores are damped; returns (rows [n, k], scores [n, k], items that left a list).
    ``log_scores`` (per row or for all): the row's scores are logits (damped by subtracting ln(damping));
    otherwise non-negative counts (divided by damping)."""
    n, w = rows.shape
    k = min(k, w)
    flags = np.zeros((n, w), dtype=bool)
    flags[:, :k] = over_cap(window, rows[:, :k], cap, now_s)
    if not flags.any():
        return rows[:, :k], scores[:, :k], 0
    logs = np.broadcast_to(np.asarray(log_scores, dtype=bool).reshape(-1, 1) if np.ndim(log_scores) else
                           np.asarray(log_scores, dtype=bool), (n, 1))
    damped = scores.astype(np.float64)
    damped = np.where(flags & logs, damped - math.log(damping), damped)
    damped = np.where(flags & ~logs, damped / damping, damped)
    damped[rows == PAD] = -np.inf  # empty slots stay last
    order = np.argsort(-damped, axis=1, kind="stable")[:, :k]
    out_rows = np.take_along_axis(rows, order, axis=1)
    out_scores = np.take_along_axis(damped, order, axis=1).astype(np.float32)
    out_scores[out_rows == PAD] = 0.0
    left = int(flags[:, :k].sum() - np.take_along_axis(flags, order, axis=1).sum())
    return out_rows, out_scores, left
