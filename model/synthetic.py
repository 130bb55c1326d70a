"""Seeded synthetic shop sessions with real sequential structure, for demos and tests.

Items live in categories and have Zipf-like popularity. A session walks a Markov chain: from the
current item it usually follows one of that item's few "successor" items (mostly in the same
category), otherwise it stays in the category (stickiness) or jumps to a globally popular item. Views
are sometimes followed by a cart of the same item, and carted items are sometimes purchased at the end
of the session. So the next item depends on the current one, and a sequence model beats popularity.
Each event carries its item's ``Category`` and a ``Price`` (a per-category price level, a per-item
spread and occasional discounts), so the side features of :mod:`model.features` carry real signal:
sessions stay in a category, and the price bucket tells categories apart.
Everything is vectorised across sessions, so 100k sessions take about a second.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from model.table import event_table
from model.events import EventType


@dataclass(frozen=True)
class _Catalogue:
    """Items with a category each and Zipf-like popularity; the CDFs the walk draws items from."""

    category: np.ndarray  # per item
    global_cdf: np.ndarray  # popularity CDF over all items
    by_cat: np.ndarray  # items sorted by category
    cat_start: np.ndarray  # category c occupies by_cat[cat_start[c]:cat_start[c + 1]]
    cat_cdf: np.ndarray  # per-category popularity CDF, laid out like by_cat

    @property
    def n_items(self) -> int:
        return len(self.category)

    def draw_global(self, rng: np.random.Generator, k: int) -> np.ndarray:
        return np.minimum(np.searchsorted(self.global_cdf, rng.random(k), side="right"), self.n_items - 1)

    def draw_in_category(self, rng: np.random.Generator, cats: np.ndarray) -> np.ndarray:
        return _draw_in_category_vec(rng, cats, self.cat_start, self.cat_cdf, self.by_cat, self.global_cdf)


def _catalogue(rng: np.random.Generator, n_items: int, n_cat: int, zipf_a: float) -> _Catalogue:
    category = rng.integers(0, n_cat, size=n_items)
    # Zipf-like global popularity over a random permutation of the items
    rank = rng.permutation(n_items) + 1
    pop = 1.0 / rank.astype(np.float64) ** zipf_a
    pop /= pop.sum()
    global_cdf = np.cumsum(pop)
    global_cdf[-1] = 1.0
    by_cat = np.argsort(category, kind="stable")
    cat_start = np.searchsorted(category[by_cat], np.arange(n_cat + 1))
    cat_pop = pop[by_cat]
    cat_cdf = np.empty(n_items)
    for c in range(n_cat):
        lo, hi = cat_start[c], cat_start[c + 1]
        if hi > lo:
            cs = np.cumsum(cat_pop[lo:hi])
            cat_cdf[lo:hi] = cs / cs[-1]
    return _Catalogue(category, global_cdf, by_cat, cat_start, cat_cdf)


def _successors(rng: np.random.Generator, cat: _Catalogue, n_successors: int) -> tuple[np.ndarray, np.ndarray]:
    """Each item's successor items (mostly same-category popular items, sometimes any popular item)
    and the CDF of picking the first, second, ... of them."""
    n_items = cat.n_items
    succ = np.empty((n_items, n_successors), dtype=np.int64)
    same = rng.random((n_items, n_successors)) < 0.8
    cats = np.repeat(cat.category, n_successors).reshape(n_items, n_successors)
    succ[same] = cat.draw_in_category(rng, cats[same])
    succ[~same] = cat.draw_global(rng, int((~same).sum()))
    succ_p = np.array([0.5, 0.25, 0.15, 0.1][:n_successors] + [0.0] * max(0, n_successors - 4))
    succ_p = succ_p / succ_p.sum()
    succ_cdf = np.cumsum(succ_p)
    succ_cdf[-1] = 1.0
    return succ, succ_cdf


def _walk(rng: np.random.Generator, cat: _Catalogue, succ: np.ndarray, succ_cdf: np.ndarray, lengths: np.ndarray,
          p_follow: float, p_stay_category: float) -> np.ndarray:
    """Item rows [session, position] of the viewed items (-1 past a session's length): every step of
    all sessions at once follows a successor, stays in the category, or jumps to a popular item."""
    n_sessions, L = len(lengths), int(lengths.max())
    items = np.full((n_sessions, L), -1, dtype=np.int64)
    items[:, 0] = cat.draw_global(rng, n_sessions)
    for t in range(1, L):
        active = np.flatnonzero(lengths > t)
        if active.size == 0:
            break
        cur = items[active, t - 1]
        u = rng.random(active.size)
        nxt = np.empty(active.size, dtype=np.int64)
        follow = u < p_follow
        stay = (u >= p_follow) & (u < p_follow + p_stay_category)
        jump = ~(follow | stay)
        k = np.minimum(np.searchsorted(succ_cdf, rng.random(int(follow.sum())), side="right"), succ.shape[1] - 1)
        nxt[follow] = succ[cur[follow], k]
        nxt[stay] = cat.draw_in_category(rng, cat.category[cur[stay]])
        nxt[jump] = cat.draw_global(rng, int(jump.sum()))
        items[active, t] = nxt
    return items


def _events(rng: np.random.Generator, items: np.ndarray, lengths: np.ndarray, start_time: float, span_days: float,
            mean_gap_s: float, p_cart: float, p_purchase: float) -> tuple[np.ndarray, ...]:
    """(session, item row, time, event type) of every event: the views with times, carts right after
    some views, purchases of some carted items at the session end."""
    n_sessions, L = items.shape
    starts = np.sort(start_time + rng.random(n_sessions) * span_days * 86400.0)
    gaps = rng.exponential(mean_gap_s, size=(n_sessions, L)) + 1.0
    gaps[:, 0] = 0.0
    times = starts[:, None] + np.cumsum(gaps, axis=1)
    s_idx, pos = np.nonzero(items >= 0)
    v_items = items[s_idx, pos]
    v_times = times[s_idx, pos]
    v_types = np.full(v_items.size, int(EventType.VIEW), dtype=np.int8)

    carted = rng.random(v_items.size) < p_cart
    c_sess, c_items, c_times = s_idx[carted], v_items[carted], v_times[carted] + 2.0
    bought = rng.random(c_items.size) < p_purchase
    end_time = times[np.arange(n_sessions), lengths - 1]
    p_sess, p_items = c_sess[bought], c_items[bought]
    p_times = end_time[p_sess] + 30.0 + np.arange(p_sess.size) * 1e-3

    return (np.concatenate([s_idx, c_sess, p_sess]), np.concatenate([v_items, c_items, p_items]),
            np.concatenate([v_times, c_times, p_times]),
            np.concatenate([v_types, np.full(c_items.size, int(EventType.CART), np.int8),
                            np.full(p_items.size, int(EventType.PURCHASE), np.int8)]))


def generate(n_sessions: int = 20_000, n_items: int = 2_000, seed: int = 0, *, n_categories: int | None = None,
             mean_length: float = 6.0, max_length: int = 40, n_successors: int = 4, p_follow: float = 0.6,
             p_stay_category: float = 0.25, p_cart: float = 0.08, p_purchase: float = 0.5,
             zipf_a: float = 1.1, start_time: float = 1_700_000_000.0, span_days: float = 14.0,
             mean_gap_s: float = 45.0) -> pd.DataFrame:
    """Return an event table (see :mod:`model.data`) of ``n_sessions`` sessions over ``n_items`` items.

    Deterministic for a given ``seed`` and arguments. Item ids are ``"i<row>"``; session ids 0..n-1 in
    start-time order."""
    if n_sessions <= 0 or n_items < 2:
        raise ValueError("generate() needs n_sessions >= 1 and n_items >= 2")
    # one generator, drawn from in a fixed order: catalogue, successors, lengths, walk, times, carts
    rng = np.random.default_rng(seed)
    n_cat = n_categories or max(1, n_items // 40)
    cat = _catalogue(rng, n_items, n_cat, zipf_a)
    succ, succ_cdf = _successors(rng, cat, n_successors)
    lengths = np.minimum(2 + rng.geometric(1.0 / max(mean_length - 1.0, 1.0), size=n_sessions) - 1, max_length)
    items = _walk(rng, cat, succ, succ_cdf, lengths, p_follow, p_stay_category)
    sess, its, tms, tps = _events(rng, items, lengths, start_time, span_days, mean_gap_s, p_cart, p_purchase)
    ids = np.char.add("i", its.astype(str))
    df = event_table(sess, ids, tms, tps)
    rows = df["ItemId"].str[1:].astype(np.int64).to_numpy()
    df["Category"] = np.char.add("c", cat.category.astype(str))[rows].astype(object)
    df["Price"] = _prices(np.random.default_rng([seed, 1]), cat.category, n_cat)[rows] * _discounts(
        np.random.default_rng([seed, 2]), len(df))
    return df


def _prices(rng: np.random.Generator, category: np.ndarray, n_cat: int) -> np.ndarray:
    """Per-item list price: a log-uniform level per category (5..500) with a small per-item spread.
    Drawn from a generator of its own, so the sessions are the same as without prices."""
    level = np.exp(rng.uniform(np.log(5.0), np.log(500.0), size=n_cat))
    return np.round(level[category] * np.exp(rng.normal(0.0, 0.15, size=len(category))), 2)


def _discounts(rng: np.random.Generator, n_events: int) -> np.ndarray:
    """Per-event price factor: 10% of events are at 20-40% off."""
    off = rng.random(n_events) < 0.1
    return np.where(off, 1.0 - rng.uniform(0.2, 0.4, size=n_events), 1.0)


def _draw_in_category_vec(rng: np.random.Generator, cats: np.ndarray, cat_start: np.ndarray, cat_cdf: np.ndarray,
                          by_cat: np.ndarray, global_cdf: np.ndarray) -> np.ndarray:
    """Popularity-weighted item draw inside each given category, vectorised with one searchsorted.

    Each category's CDF occupies [cat_start[c], cat_start[c+1]) of ``cat_cdf`` and runs 0..1; adding the
    category index turns all of them into one increasing array."""
    n_cat = len(cat_start) - 1
    cat_of_pos = np.repeat(np.arange(n_cat), np.diff(cat_start))
    shifted = cat_cdf + cat_of_pos
    u = rng.random(len(cats))
    pos = np.searchsorted(shifted, cats + u, side="right")
    hi = cat_start[cats + 1] - 1
    pos = np.minimum(np.maximum(pos, cat_start[cats]), hi)
    out = by_cat[np.clip(pos, 0, len(by_cat) - 1)]
    empty = cat_start[cats + 1] <= cat_start[cats]
    if empty.any():
        out[empty] = np.minimum(np.searchsorted(global_cdf, rng.random(int(empty.sum())), side="right"),
                                len(global_cdf) - 1)
    return out
