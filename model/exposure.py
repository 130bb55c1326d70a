"""Exposure of items in a model's top-K lists, and the concentration check of the promotion guardrail.

Poisoned training data shows up in what a model *recommends* before it shows up in recall: a
candidate trained on fake sessions ending on one item puts that item in many more lists. The
guardrail therefore compares, on the same held-out sessions, the lists of the current model and of
the candidate: catalogue coverage, the Gini coefficient of exposure over the catalogue, and the
largest rise of one item's exposure. All functions are pure (numpy/torch, no I/O).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from model.evaluate import Accumulator, run_sessions, test_index
from model.network import GRU4RecNet
from model.vocab import Vocabulary

COVERAGE = "coverage"
GINI = "gini"
ITEM_EXPOSURE = "item_exposure"
CONCENTRATION_REASONS = (COVERAGE, GINI, ITEM_EXPOSURE)


@dataclass(frozen=True)
class Exposure:
    counts: np.ndarray  # per vocabulary row: lists containing the item
    lists: int  # top-K lists computed

    def summary(self) -> dict:
        return {"coverage": coverage(self.counts), "gini": gini(self.counts), "lists": self.lists}


@dataclass(frozen=True)
class ConcentrationLimits:
    """0 switches a check off. ``smoothing_share``: lists added to both counts before the item ratio,
    as a share of the lists, so an item rising from 0 to a handful of lists is not a jump.
    ``hold_back_items``: before the item-exposure check refuses a candidate, up to this many of the items
    that rise most get their output rows back from the current model (``model.guardrail.judge``), so one
    pushed item costs the round its own rise, not everything else the round learned."""

    max_gini_increase: float = 0.0
    min_coverage_ratio: float = 0.0
    max_item_exposure_factor: float = 0.0
    smoothing_share: float = 0.01
    hold_back_items: int = 0

    @property
    def active(self) -> bool:
        return self.max_gini_increase > 0 or self.min_coverage_ratio > 0 or self.max_item_exposure_factor > 0


@torch.inference_mode()
def topk_exposure(net: GRU4RecNet, vocab: Vocabulary, df: pd.DataFrame, k: int, batch_size: int = 512) -> Exposure:
    """Count, per item, the top-``k`` lists containing it, over every prediction position of ``df``
    (the positions ``model.evaluate.evaluate`` scores)."""
    n = len(vocab)
    counts = torch.zeros(n, dtype=torch.int64)
    lists = [0]
    was_training = net.training
    net.eval()
    use_types = net.T is not None
    kk = min(k, n)

    def score(X: torch.Tensor, T: torch.Tensor, H: list[torch.Tensor], F: torch.Tensor | None) -> torch.Tensor:
        scores = net.score_items(net.step(X, H, T if use_types else None, training=False, features=F))
        top = torch.topk(scores[:, :n], kk, dim=1).indices
        counts.index_add_(0, top.reshape(-1), torch.ones(top.numel(), dtype=torch.int64))
        lists[0] += int(top.shape[0])
        return scores

    try:
        run_sessions(test_index(vocab, df), batch_size, score, n, net.layers, Accumulator((kk,), "standard"))
    finally:
        net.train(was_training)
    return Exposure(counts.numpy(), lists[0])


def coverage(counts: np.ndarray) -> float:
    """Share of the catalogue that appears in at least one list."""
    return float((counts > 0).mean()) if counts.shape[0] else 0.0


def gini(counts: np.ndarray) -> float:
    """Gini coefficient of exposure over the catalogue: 0 = every item equally shown, ->1 = one item."""
    x = np.sort(np.asarray(counts, dtype=np.float64))
    n = x.shape[0]
    total = x.sum()
    if n == 0 or total <= 0:
        return 0.0
    ranks = np.arange(1, n + 1, dtype=np.float64)
    return float((2.0 * (ranks * x).sum()) / (n * total) - (n + 1.0) / n)


def item_jump(current: Exposure, candidate: Exposure, smoothing_share: float) -> tuple[int, float]:
    """(row, factor) of the item whose share of lists rises most from current to candidate. Rows
    align because the candidate's vocabulary extends the current one."""
    n = candidate.counts.shape[0]
    cur = np.zeros(n, dtype=np.float64)
    cur[: current.counts.shape[0]] = current.counts
    cur_share = cur / max(current.lists, 1)
    cand_share = candidate.counts.astype(np.float64) / max(candidate.lists, 1)
    factor = (cand_share + smoothing_share) / (cur_share + smoothing_share)
    row = int(np.argmax(factor)) if n else -1
    return row, float(factor[row]) if n else 1.0


def concentration_problem(current: Exposure, candidate: Exposure, limits: ConcentrationLimits) -> tuple[str, str]:
    """("", "") when the candidate passes; else (reason from CONCENTRATION_REASONS, detail without ids).
    Both are measured over the candidate's catalogue (rows the current model lacks count 0 for it), so a
    grown vocabulary by itself changes neither coverage nor Gini of the current model."""
    padded = np.zeros(candidate.counts.shape[0], dtype=np.int64)
    padded[: current.counts.shape[0]] = current.counts
    cur_cov, cand_cov = coverage(padded), coverage(candidate.counts)
    if limits.min_coverage_ratio > 0 and cand_cov < limits.min_coverage_ratio * cur_cov:
        return COVERAGE, f"coverage {cand_cov:.4f} < {limits.min_coverage_ratio} x current {cur_cov:.4f}"
    cur_g, cand_g = gini(padded), gini(candidate.counts)
    if limits.max_gini_increase > 0 and cand_g - cur_g > limits.max_gini_increase:
        return GINI, f"exposure Gini {cand_g:.4f} exceeds current {cur_g:.4f} by more than {limits.max_gini_increase}"
    if limits.max_item_exposure_factor > 0:
        _, factor = item_jump(current, candidate, limits.smoothing_share)
        if factor > limits.max_item_exposure_factor:
            return ITEM_EXPOSURE, (f"one item's share of top-K lists rises {factor:.1f}x "
                                   f"(limit {limits.max_item_exposure_factor}x)")
    return "", ""
