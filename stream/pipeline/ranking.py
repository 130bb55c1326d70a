"""The one ranking step: top-K candidates, business rules masked, exposure cap, K kept.

``score_states`` is what the stream's batch processor calls for every list it publishes, and what a
request path calls for its own (same rules, same counts); with rules active it ranks through ``rank``.
Pure: numpy and the model's top-K.

How K items survive the masks without scoring every item twice: the top-K fetches ``k + candidates``
items per row (``GRUFLOW_RULE_CANDIDATES``); masked ones are dropped, and a row left with fewer than K
is ranked again with a wider top-K that is sure to hold K unmasked items (K + every masked row). The
cap (stream/pipeline/exposure.py) then damps over-exposed items among the survivors.

A masked item is counted (``counts[rule]``) when it would have been in the list without the rule:
ranked above the K-th item that was kept. A masked item is counted under its first rule in ``RULES``
order among the user's rules, then the catalogue's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from stream.pipeline.exposure import PAD, ExposureWindow, damp
from stream.pipeline.rules import CATALOGUE_RULES, EXPOSURE, RuleConfig

TopK = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]
UserRules = list[tuple[str, np.ndarray]]  # (rule, rows) of one list
_TOPK_CHUNK = 512  # rows scored at once without a scorer: bounds the [chunk, n_items] score matrix


@dataclass
class RuleContext:
    """What ranking one batch with rules needs: the settings, the catalogue's masked rows (rule -> sorted
    rows, ``rules.CatalogueMasks``), the exposure window (None: no cap) and the wall time."""

    cfg: RuleConfig
    catalogue: dict[str, np.ndarray] = field(default_factory=dict)
    exposure: ExposureWindow | None = None
    now_s: float = 0.0
    record: bool = True  # add the published lists to the exposure window

    @property
    def active(self) -> bool:
        return self.cfg.per_user or self.exposure is not None or any(m.shape[0] for m in self.catalogue.values())


def _mask(cand: np.ndarray, users: list[UserRules], catalogue: dict[str, np.ndarray],
          n_items: int) -> tuple[np.ndarray, list[str]]:
    """[rows, w] int8: index into the returned rule names of the rule masking each candidate, -1 = kept."""
    names: list[str] = []
    rule_of = np.full(cand.shape, -1, dtype=np.int8)
    span = np.int64(max(n_items, int(cand.max(initial=0)) + 1))
    keys = np.arange(cand.shape[0], dtype=np.int64)[:, None] * span + cand
    by_rule: dict[str, list[np.ndarray]] = {}
    for i, rules in enumerate(users):
        for rule, rows in rules:
            if rows.shape[0]:
                by_rule.setdefault(rule, []).append(i * span + rows)
    for rule, parts in by_rule.items():
        hit = np.isin(keys, np.concatenate(parts)) & (rule_of < 0)
        rule_of[hit] = len(names)
        names.append(rule)
    for rule in CATALOGUE_RULES:
        rows = catalogue.get(rule)
        if rows is not None and rows.shape[0]:
            hit = np.isin(cand, rows, assume_unique=False) & (rule_of < 0)
            rule_of[hit] = len(names)
            names.append(rule)
    rule_of[cand < 0] = 127  # empty slots (fewer items than asked): never kept, never counted
    return rule_of, names


def _count(rule_of: np.ndarray, names: list[str], k: int, counts: dict[str, int]) -> None:
    """Masked items ranked above each row's K-th kept item (all of them when fewer than K were kept)."""
    kept = rule_of < 0
    reached = np.cumsum(kept, axis=1) >= k
    kth = np.where(reached.any(axis=1), reached.argmax(axis=1), rule_of.shape[1])
    before = np.arange(rule_of.shape[1])[None, :] < kth[:, None]
    hits = rule_of[before & ~kept & (rule_of != 127)]
    for idx, n in enumerate(np.bincount(hits, minlength=len(names)).tolist()):
        if n:
            counts[names[idx]] = counts.get(names[idx], 0) + n


def _compact(cand: np.ndarray, scores: np.ndarray, rule_of: np.ndarray, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's kept candidates, best first, in ``w`` columns (``PAD`` where fewer)."""
    kept = rule_of < 0
    order = np.argsort(~kept, axis=1, kind="stable")[:, :w]
    rows = np.take_along_axis(cand, order, axis=1)
    vals = np.take_along_axis(scores, order, axis=1).astype(np.float32)
    gone = ~np.take_along_axis(kept, order, axis=1)
    rows[gone], vals[gone] = PAD, 0.0
    if rows.shape[1] < w:
        rows = np.pad(rows, ((0, 0), (0, w - rows.shape[1])), constant_values=PAD)
        vals = np.pad(vals, ((0, 0), (0, w - vals.shape[1])))
    return rows, vals


def candidates(model, hidden: np.ndarray, has_hidden: np.ndarray, width: np.ndarray | int,
               top_k: TopK | None) -> tuple[np.ndarray, np.ndarray]:
    """Top ``width`` rows and scores per list: from the hidden state, or the popular items (no state).
    ``width`` is one number, or one per row (then the widest is fetched)."""
    n = hidden.shape[0]
    w = int(np.max(width)) if n else 0
    rows = np.full((n, w), PAD, dtype=np.int64)
    scores = np.zeros((n, w), dtype=np.float32)
    hid = np.flatnonzero(has_hidden)
    if hid.shape[0]:
        scorer = top_k if top_k is not None and w <= 255 else model.top_k
        r, s = scorer(hidden[hid], w)
        rows[hid, :r.shape[1]], scores[hid, :s.shape[1]] = r, s
    cold = np.flatnonzero(~np.asarray(has_hidden, dtype=bool))
    if cold.shape[0]:
        pr, ps = model.popular(w)
        rows[cold, :pr.shape[0]], scores[cold, :ps.shape[0]] = pr, ps
    return rows, scores


def rank(model, hidden: np.ndarray, has_hidden: np.ndarray, k: int, ctx: RuleContext, users: list[UserRules],
         top_k: TopK | None = None) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """K rows and scores per list (``PAD`` where the catalogue has fewer allowed items) with every rule
    applied, and the items each rule masked. Row i is the list for ``hidden[i]`` (its popular items when
    not ``has_hidden[i]``) and ``users[i]`` are its user's rules (``rules.user_exclusions``)."""
    n_items = model.n_items
    k = min(k, n_items)
    w = min(n_items, k + ctx.cfg.candidates)
    counts: dict[str, int] = {}
    cand, scores = candidates(model, hidden, has_hidden, w, top_k)
    rule_of, names = _mask(cand, users, ctx.catalogue, n_items)
    short = np.flatnonzero((rule_of < 0).sum(axis=1) < k) if w < n_items else np.zeros(0, np.int64)
    if short.shape[0]:  # wide enough to hold K kept items whatever is masked
        masked = sum(m.shape[0] for m in ctx.catalogue.values())
        wide = np.array([min(n_items, k + masked + sum(r.shape[0] for _, r in users[i])) for i in short.tolist()])
        c2, s2 = candidates(model, hidden[short], np.asarray(has_hidden)[short], wide, None)
        r2, n2 = _mask(c2, [users[i] for i in short.tolist()], ctx.catalogue, n_items)
        _count(r2, n2, k, counts)
        keep = np.ones(cand.shape[0], dtype=bool)
        keep[short] = False
        _count(rule_of[keep], names, k, counts)
        rows_c, vals_c = _compact(cand, scores, rule_of, w)
        rows_c[short], vals_c[short] = _compact(c2, s2, r2, w)
    else:
        _count(rule_of, names, k, counts)
        rows_c, vals_c = _compact(cand, scores, rule_of, w)
    if ctx.exposure is None:
        return rows_c[:, :k], vals_c[:, :k], counts
    cfg = ctx.cfg
    out_rows, out_scores, left = damp(ctx.exposure, rows_c, vals_c, k, cfg.exposure_cap, cfg.exposure_damping,
                                      np.asarray(has_hidden, dtype=bool), ctx.now_s)
    if left:
        counts[EXPOSURE] = counts.get(EXPOSURE, 0) + left
    if ctx.record:
        ctx.exposure.record(out_rows, ctx.now_s)
    return out_rows, out_scores, counts


def score_states(model, hidden: np.ndarray, has_hidden: np.ndarray, kk: int, top_k: TopK | None = None,
                 rules: RuleContext | None = None, users: list[UserRules] | None = None
                 ) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """The top-``kk`` rows and scores of each hidden state (popular items where ``has_hidden`` is False), and
    the items each business rule masked: the one ranking step of the stream's batches and of requests
    (``stream/pipeline/serving.py``), so the rules apply to both. ``users[i]``: row i's user rules. Rows
    past the popular list are ``PAD``."""
    n = hidden.shape[0]
    if rules is not None and rules.active:
        return rank(model, hidden, has_hidden, kk, rules, users if users is not None else [[]] * n, top_k)
    rec_rows = np.empty((n, kk), dtype=np.int64)
    rec_scores = np.empty((n, kk), dtype=np.float32)
    hid = np.flatnonzero(has_hidden)
    if top_k is not None and hid.shape[0]:
        rec_rows[hid], rec_scores[hid] = top_k(hidden[hid], kk)
    else:
        for s in range(0, hid.shape[0], _TOPK_CHUNK):
            part = hid[s:s + _TOPK_CHUNK]
            r, sc = model.top_k(hidden[part], kk)
            rec_rows[part], rec_scores[part] = r, sc
    cold = np.flatnonzero(~has_hidden)
    if cold.shape[0]:
        pr, ps = model.popular(kk)
        m = pr.shape[0]
        rec_rows[cold] = PAD
        rec_scores[cold] = 0.0
        rec_rows[cold, :m], rec_scores[cold, :m] = pr, ps
    return rec_rows, rec_scores, {}
