"""Item side features: category, price (log-bucketed) and the time gap since the previous event (bucketed).

Each event gets one row per feature, in the columns of :data:`FEATURE_COLUMNS`; row 0 always means
"absent" (no category or price given, the first event of a session) and its embedding stays zero, so
data without a feature trains and scores exactly as without the feature's embedding.

- category: a :class:`model.vocab.Vocabulary` of category ids (strings) that grows online like the item
  vocabulary; category row = vocabulary row + 1. A category the model has not seen maps to 0.
- price: half-octave buckets of log2(1 + price), a fixed table (no vocabulary to grow).
- time gap: half-octave buckets of log2(1 + seconds since the previous event of the same session), also
  fixed. The stream computes the same value from the user's stored ``last_ts_ms``, so nothing is added
  to the per-user state record.

The event table carries the inputs as optional columns ``Category`` (str; empty or missing = absent)
and ``Price`` (float; NaN = absent); the gap is derived from ``SessionId`` and ``Time``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from model.vocab import Vocabulary

CATEGORY, PRICE, GAP = 0, 1, 2
FEATURE_COLUMNS = ("category", "price", "gap")
N_FEATURES = len(FEATURE_COLUMNS)
# half-octave buckets: price up to 2^12 (4096), gaps up to 2^12 s (68 min, beyond the session gap)
N_PRICE_BUCKETS = 1 + 24
N_GAP_BUCKETS = 1 + 24


def log_buckets(values: np.ndarray, present: np.ndarray, n_buckets: int) -> np.ndarray:
    """1 + floor(2 * log2(1 + v)) clipped to 1..n_buckets-1 where ``present`` (v < 0 counts as 0), else 0."""
    v = np.maximum(np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0, posinf=0.0), 0.0)
    b = 1 + np.minimum(np.floor(2.0 * np.log2(1.0 + v)), n_buckets - 2).astype(np.int64)
    return np.where(present, b, 0).astype(np.int64)


def price_buckets(prices: np.ndarray) -> np.ndarray:
    """Bucket per price; NaN, infinite or negative prices are absent (0)."""
    p = np.asarray(prices, dtype=np.float64)
    return log_buckets(p, np.isfinite(p) & (p >= 0.0), N_PRICE_BUCKETS)


def gap_buckets(gaps_s: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Bucket per gap in seconds; 0 at the first event of a session (``first`` True)."""
    return log_buckets(gaps_s, ~np.asarray(first, dtype=bool), N_GAP_BUCKETS)


def category_rows(values, categories: Vocabulary, grow: bool = False) -> np.ndarray:
    """Category row per value (vocabulary row + 1); 0 for absent (None, NaN, "") or, unless ``grow``,
    unknown categories. With ``grow`` unknown categories are appended to ``categories`` first."""
    ids = pd.Series(values, dtype=object)
    absent = ids.isna().to_numpy() | (ids.astype(str).to_numpy() == "")
    text = ids.where(~absent, "").astype(str).to_numpy()
    uniq, inverse = np.unique(text, return_inverse=True)
    if grow:
        for c in uniq:
            if c:
                categories.add(c)
    rows = categories.rows(list(uniq)) + 1
    rows[uniq == ""] = 0
    out = rows[inverse]
    out[absent] = 0
    return out.astype(np.int64)


def session_gaps(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(seconds since the previous event of the same session, first-of-session flag) per row of ``df``,
    computed in (SessionId, Time) order whatever the row order."""
    n = len(df)
    sid = df["SessionId"].to_numpy()
    t = df["Time"].to_numpy(dtype=np.float64)
    order = np.lexsort((np.arange(n), t, sid))
    s_sorted, t_sorted = sid[order], t[order]
    first_sorted = np.ones(n, dtype=bool)
    first_sorted[1:] = s_sorted[1:] != s_sorted[:-1]
    gap_sorted = np.zeros(n, dtype=np.float64)
    gap_sorted[1:] = t_sorted[1:] - t_sorted[:-1]
    gap_sorted[first_sorted] = 0.0
    gaps, first = np.empty(n), np.empty(n, dtype=bool)
    gaps[order], first[order] = gap_sorted, first_sorted
    return gaps, first


def feature_matrix(df: pd.DataFrame, categories: Vocabulary | None, grow: bool = False) -> np.ndarray:
    """[n_events, N_FEATURES] int64 rows (see module docstring) for an event table; a feature the table
    lacks (no ``Category`` / ``Price`` column, or ``categories`` None) is 0 throughout."""
    n = len(df)
    out = np.zeros((n, N_FEATURES), dtype=np.int64)
    if n == 0:
        return out
    if categories is not None and "Category" in df.columns:
        out[:, CATEGORY] = category_rows(df["Category"].to_numpy(dtype=object), categories, grow)
    if "Price" in df.columns:
        out[:, PRICE] = price_buckets(df["Price"].to_numpy(dtype=np.float64))
    gaps, first = session_gaps(df)
    out[:, GAP] = gap_buckets(gaps, first)
    return out


def has_feature_columns(df: pd.DataFrame) -> dict[str, bool]:
    """Which optional feature inputs a table carries (the gap is always derivable)."""
    return {"category": "Category" in df.columns and bool(df["Category"].notna().any()),
            "price": "Price" in df.columns and bool(np.isfinite(df["Price"].to_numpy(dtype=np.float64)).any()),
            "gap": True}
