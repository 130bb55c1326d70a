"""The event table: the one shape in which every loader hands data to training, evaluation and replay.

A pandas DataFrame with columns ``SessionId`` (int64), ``ItemId`` (str), ``Time`` (float64 epoch
seconds) and ``EventType`` (int8, :class:`model.events.EventType` values), sorted by ``SessionId`` then
``Time`` (stable, so equal times keep file order). It has a module of its own so that the loaders
(:mod:`model.data`) and the generator (:mod:`model.synthetic`) both build it without importing each other.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

COLUMNS = ("SessionId", "ItemId", "Time", "EventType")
DEFAULT_SESSION_GAP_S = 1800.0


def event_table(session_ids, item_ids, times, event_types) -> pd.DataFrame:
    """Build a well-typed, sorted event table from four equally long columns."""
    df = pd.DataFrame({
        "SessionId": np.asarray(session_ids, dtype=np.int64),
        "ItemId": pd.Series(item_ids).astype(str).to_numpy(dtype=object),
        "Time": np.asarray(times, dtype=np.float64),
        "EventType": np.asarray(event_types, dtype=np.int8),
    })
    return sort_events(df)


def sort_events(df: pd.DataFrame) -> pd.DataFrame:
    """Sort by SessionId, Time keeping file order for ties; returns a fresh 0..n-1 index."""
    order = np.lexsort((np.arange(len(df)), df["Time"].to_numpy(), df["SessionId"].to_numpy()))
    return df.iloc[order].reset_index(drop=True)


def sessionize(keys: np.ndarray, times: np.ndarray, gap_s: float = DEFAULT_SESSION_GAP_S) -> np.ndarray:
    """Split per-user (or per-visitor) event streams into sessions at gaps longer than ``gap_s``.

    Returns an int64 session id per event (0..n_sessions-1, numbered in (key, time) order)."""
    n = len(keys)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort((np.arange(n), times, keys))
    k, t = keys[order], times[order]
    new = np.ones(n, dtype=bool)
    new[1:] = (k[1:] != k[:-1]) | ((t[1:] - t[:-1]) > gap_s)
    sid_sorted = np.cumsum(new) - 1
    sid = np.empty(n, dtype=np.int64)
    sid[order] = sid_sorted
    return sid
