"""Baselines under the same protocol as :func:`model.evaluate.evaluate`: popularity and last-item
co-occurrence ("people who viewed X next viewed Y").

Co-occurrence scores are mostly zero, and under ``standard`` ties a zero-score target would rank near
the top; so every list is filled by popularity (scores are count + popularity / (max popularity + 1),
keeping co-occurring items first). Report ``conservative`` ties too to see that nothing is flattered.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import torch

from model.batching import index_sessions
from model.evaluate import DEFAULT_CUTOFFS, Accumulator, run_sessions, test_index
from model.train import build_vocabulary, item_counts, item_rows_for
from model.vocab import Vocabulary

BASELINES = ("popularity", "cooccurrence")


class PopularityModel:
    def __init__(self, train_df: pd.DataFrame, vocab: Vocabulary | None = None) -> None:
        self.vocab = vocab or build_vocabulary(train_df)
        self.counts = item_counts(item_rows_for(train_df, self.vocab), len(self.vocab))
        self._scores = torch.from_numpy(self.counts.astype(np.float64))

    def scores(self, last_items: torch.Tensor) -> torch.Tensor:
        return self._scores.expand(len(last_items), -1)


class CooccurrenceModel(PopularityModel):
    """Counts of (item -> next item in the same session) in training, popularity as the tie-breaker."""

    def __init__(self, train_df: pd.DataFrame, vocab: Vocabulary | None = None) -> None:
        super().__init__(train_df, vocab)
        index = index_sessions(train_df, item_rows_for(train_df, self.vocab))
        n = len(self.vocab)
        src = index.items[:-1]
        dst = index.items[1:]
        same = np.ones(len(src), dtype=bool)
        same[index.offsets[1:-1] - 1] = False  # no pair across a session boundary
        keys, counts = np.unique(src[same] * n + dst[same], return_counts=True)
        a, b = keys // n, keys % n
        self.indptr = np.searchsorted(a, np.arange(n + 1))
        self.next_rows = torch.from_numpy(b.astype(np.int64))
        self.next_counts = torch.from_numpy(counts.astype(np.float64))
        self._fill = self._scores / (float(self._scores.max()) + 1.0) if n else self._scores

    def scores(self, last_items: torch.Tensor) -> torch.Tensor:
        out = self._fill.repeat(len(last_items), 1)
        for i, item in enumerate(last_items.tolist()):
            lo, hi = self.indptr[item], self.indptr[item + 1]
            if hi > lo:
                out[i].index_add_(0, self.next_rows[lo:hi], self.next_counts[lo:hi])
        return out


def evaluate_baseline(name: str, train_df: pd.DataFrame, test_df: pd.DataFrame,
                      cutoffs: Sequence[int] = DEFAULT_CUTOFFS, tie: str = "standard", batch_size: int = 512) -> dict:
    """Train baseline ``name`` on ``train_df`` and score ``test_df`` like a GRU (same output shape)."""
    if name == "popularity":
        model: PopularityModel = PopularityModel(train_df)
    elif name == "cooccurrence":
        model = CooccurrenceModel(train_df)
    else:
        raise ValueError(f"unknown baseline {name!r}; choose one of {BASELINES}")
    acc = Accumulator(cutoffs, tie)
    run_sessions(test_index(model.vocab, test_df), batch_size, lambda X, T, H, F: model.scores(X),
                 len(model.vocab), [], acc)
    return acc.result()
