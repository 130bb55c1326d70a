"""Exact top-K over a large catalogue by scoring only the rows that can reach it.

An item's score for the hidden state ``x`` is ``x . w + b <= |x| |w| + b`` (Cauchy-Schwarz). A trained
catalogue's output rows are far from alike: the rows of items seen in training grow, the rows of items
rarely or never seen stay near their initial values, which shrink with the catalogue (uniform in
+-sqrt(6 / (N + H)): norms of about 0.015 at 1M items, against 1-3.5 for the trained rows of the bench's
model). Such a row cannot reach a top-K whose K-th score is above its bound, and most of a large
catalogue is such rows.

``NormTiers`` orders the live rows by their bound and keeps the first ``head`` of them for a ``TopKScorer``
(any of its paths); the others form tiers of growing size, each known by the largest norm and the largest
bias of its rows. ``TieredTopK`` scores the head for every state, then scores a tier only for the states
whose K-th score so far is below that tier's bound (float32, in slices). The answer is exact whatever the
split; the split only decides the speed. The head is the smallest (of 8,192 rows, then doubling, up to a
quarter of the catalogue) whose bound already holds for 99% of sample states; where none does, the
catalogue is scored whole (``NormTiers.build`` returns None).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from model.topk import TopKScorer

MIN_ITEMS = 131_072  # smaller catalogues are scored whole: their top-K is fast already
_FIRST_HEAD = 8_192
_HEAD_COVERAGE = 0.99  # share of sample states whose K-th head score must beat the rest's bound
_SLICE = 65_536  # tail rows scored at a time (a [states, slice] float32 block)
_ULPS = 64 * float(np.finfo(np.float32).eps)  # float32 rounding of a score, relative to its magnitude


@dataclass(frozen=True)
class Tier:
    rows: np.ndarray  # int64 catalogue rows
    max_norm: float
    max_bias: float


@dataclass(frozen=True)
class NormTiers:
    head: np.ndarray  # int64 catalogue rows scored for every state (sorted)
    tiers: tuple[Tier, ...]

    @staticmethod
    def build(W: torch.Tensor, b: torch.Tensor, retired: np.ndarray | None, states: np.ndarray,
              k: int) -> NormTiers | None:
        """The split for weights ``W`` [N, H] and biases ``b`` [N], sized on sample ``states`` (the top layer's
        hidden states, [m, H]); None where the catalogue is small or no head up to N/4 covers the states."""
        n, h = W.shape
        live = np.arange(n, dtype=np.int64)
        if retired is not None and len(retired):
            live = np.setdiff1d(live, np.asarray(retired, dtype=np.int64))
        if len(live) < MIN_ITEMS or len(states) == 0:
            return None
        norms = torch.cat([W[i:i + _SLICE].norm(dim=1) for i in range(0, n, _SLICE)]).numpy().astype(np.float64)
        bias = b.numpy().astype(np.float64)
        # order by the bound at the largest |x| a GRU output can have (each coordinate in [-1, 1])
        order = live[np.argsort(-(math.sqrt(h) * norms[live] + bias[live]), kind="stable")]
        rest_norm = np.maximum.accumulate(norms[order][::-1])[::-1]  # largest norm from position i on
        rest_bias = np.maximum.accumulate(bias[order][::-1])[::-1]
        x = torch.from_numpy(np.ascontiguousarray(states[:, -h:], dtype=np.float32))
        x_norm = x.double().norm(dim=1).numpy()
        limit = len(order) // 4
        best = torch.full((len(x), k), -torch.inf)
        best_rows = torch.full((len(x), k), -1, dtype=torch.int64)
        done, head = 0, _FIRST_HEAD
        while head <= limit:  # the K best scores among the first ``head`` rows
            best, best_rows = merge_top_k(x, order[done:head], W, b, best, best_rows)
            done = head
            bound = x_norm * rest_norm[head] + rest_bias[head]
            if np.mean(best[:, -1].double().numpy() > bound) >= _HEAD_COVERAGE:
                return NormTiers.split(order, norms, bias, head)
            head *= 2
        return None

    @staticmethod
    def split(order: np.ndarray, norms: np.ndarray, bias: np.ndarray, head: int) -> NormTiers:
        """The first ``head`` rows of ``order``, then tiers of twice the size of the rows before them."""
        tiers = []
        start = head
        while start < len(order):
            end = min(len(order), 2 * start)
            rows = order[start:end]
            tiers.append(Tier(np.sort(rows), float(norms[rows].max()), float(bias[rows].max())))
            start = end
        return NormTiers(np.sort(order[:head]), tuple(tiers))


class TieredTopK:
    """A ``TopKScorer`` over the head rows plus the tiers' bound checks: the interface of ``TopKScorer``
    (``top_k``, ``path``, ``threads``, the row counters) and its full tables (``W``, ``b``, ``n``, ``retired``),
    which the calibration's exactness check reads."""

    def __init__(self, head: TopKScorer, tiers: NormTiers, W: torch.Tensor, b: torch.Tensor,
                 retired: torch.Tensor | None) -> None:
        self.head = head
        self.tiers = tiers
        self.W, self.b, self.retired = W, b, retired
        self.n = W.shape[0]
        self.top_width = head.top_width
        self.tail_rows = 0  # states x tier rows scored beyond the head

    @property
    def path(self) -> str:
        return self.head.path

    @property
    def threads(self) -> int:
        return self.head.threads

    @threads.setter
    def threads(self, value: int) -> None:
        self.head.threads = value

    @property
    def rows_scored(self) -> int:
        return self.head.rows_scored

    @rows_scored.setter
    def rows_scored(self, value: int) -> None:
        self.head.rows_scored = value

    @property
    def rows_int8(self) -> int:
        return self.head.rows_int8

    @rows_int8.setter
    def rows_int8(self, value: int) -> None:
        self.head.rows_int8 = value

    @property
    def native(self):  # noqa: ANN201 - the compiled kernel of the head's scorer, or None
        return self.head.native

    def top_k(self, hidden: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        rows, values = self.head.top_k(hidden, k)
        x = torch.from_numpy(np.ascontiguousarray(hidden[:, -self.top_width:], dtype=np.float32))
        x_norm = x.double().norm(dim=1).numpy()
        for tier in self.tiers.tiers:
            # the bound in float64; the K-th score is a float32 product, so it may sit a rounding error low
            reach = x_norm * tier.max_norm + tier.max_bias
            kth = values[:, -1].astype(np.float64)
            need = np.flatnonzero(reach >= kth - _ULPS * (np.abs(kth) + reach))
            if len(need):
                self._score_tier(x, need, tier, rows, values)
        return rows, values

    @torch.inference_mode()
    def _score_tier(self, x: torch.Tensor, states: np.ndarray, tier: Tier, rows: np.ndarray,
                    values: np.ndarray) -> None:
        """Merge the tier's rows into the top-k of ``states`` (in place)."""
        xs = x[torch.from_numpy(states)]
        best_v = torch.from_numpy(values[states])
        best_r = torch.from_numpy(rows[states])
        best_v, best_r = merge_top_k(xs, tier.rows, self.W, self.b, best_v, best_r)
        values[states] = best_v.numpy()
        rows[states] = best_r.numpy()
        self.tail_rows += len(states) * len(tier.rows)


def merge_top_k(x: torch.Tensor, ids: np.ndarray, W: torch.Tensor, b: torch.Tensor, values: torch.Tensor,
                rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k (values, rows), best first, of ``x``'s states over their current top-k ``values``/``rows``
    ([m, k]) and the catalogue rows ``ids``, scored in float32 ``_SLICE`` rows at a time."""
    k = values.shape[1]
    for s in range(0, len(ids), _SLICE):
        part = torch.from_numpy(ids[s:s + _SLICE])
        scores = torch.addmm(b.index_select(0, part), x, W.index_select(0, part).T)
        values, pick = torch.topk(torch.cat([values, scores], dim=1), k, dim=1, sorted=True)
        rows = torch.gather(torch.cat([rows, part.expand(len(x), -1)], dim=1), 1, pick)
    return values, rows
