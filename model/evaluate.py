"""Offline evaluation with the reference protocol: next-item prediction over test sessions.

The hidden state is zero at the start of each test session; every event that has a next event in its
session is a prediction, whose target is ranked against all training items; test events whose item
the model never saw are dropped first (sessions close up around them). Ties: ``standard`` ranks the
target at #(score > target) + 1, ``conservative`` at #(score >= target) (all ties count against it).
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from model.batching import SessionIndex, index_sessions, session_parallel
from model.network import GRU4RecNet
from model.vocab import Vocabulary

TIES = ("standard", "conservative")
DEFAULT_CUTOFFS = (1, 5, 10, 20)


class Accumulator:
    """Recall@K / MRR@K over ranks, for any scorer."""

    def __init__(self, cutoffs: Sequence[int], tie: str) -> None:
        if tie not in TIES:
            raise ValueError(f"unknown tie mode {tie!r}; use one of {TIES}")
        self.cutoffs = tuple(int(c) for c in cutoffs)
        self.tie = tie
        self.hits = {c: 0.0 for c in self.cutoffs}
        self.rr = {c: 0.0 for c in self.cutoffs}
        self.n = 0

    def ranks(self, scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Rank (1 = best) of each row's target column under the tie mode."""
        t = scores.gather(1, targets.view(-1, 1))
        if self.tie == "standard":
            return (scores > t).sum(1) + 1
        return (scores >= t).sum(1)

    def add(self, ranks: torch.Tensor) -> None:
        r = ranks.to(torch.float64)
        for c in self.cutoffs:
            ok = r <= c
            self.hits[c] += float(ok.sum())
            self.rr[c] += float((ok / r).sum())
        self.n += int(r.numel())

    def result(self) -> dict:
        n = max(self.n, 1)
        return {"recall": {str(c): self.hits[c] / n for c in self.cutoffs},
                "mrr": {str(c): self.rr[c] / n for c in self.cutoffs},
                "n_events": self.n, "tie": self.tie}


def test_index(vocab: Vocabulary, test_df: pd.DataFrame, net: GRU4RecNet | None = None) -> SessionIndex:
    """The test sessions; with the feature rows ``net`` uses (its category vocabulary is not grown)."""
    from model.train import features_for, item_rows_for

    feats = features_for(net, test_df) if net is not None else None
    return index_sessions(test_df, item_rows_for(test_df, vocab), feats)


Scorer = Callable[[torch.Tensor, torch.Tensor, list[torch.Tensor], "torch.Tensor | None"], torch.Tensor]


def run_sessions(index: SessionIndex, batch_size: int, score: Scorer,
                 n_items: int, state_sizes: Iterable[int], acc: Accumulator) -> None:
    """Drive ``score(inputs, event_types, H, features) -> [b, n_items]`` over the session-parallel
    schedule (``features`` is None when the index has none)."""
    items = torch.from_numpy(index.items)
    types = torch.from_numpy(index.event_types)
    feats = torch.from_numpy(index.features) if index.features is not None else None
    H = [torch.zeros(min(batch_size, max(index.n_sessions, 1)), h) for h in state_sizes]
    for chunk in session_parallel(index, batch_size, min_active=1):
        if chunk.n_steps:
            pos = torch.from_numpy(chunk.input_positions())
            X_all, T_all, Y_all = items[pos], types[pos], items[pos + 1]
            F_all = feats[pos] if feats is not None else None
            for i in range(chunk.n_steps):
                scores = score(X_all[i], T_all[i], H, F_all[i] if F_all is not None else None)[:, :n_items]
                acc.add(acc.ranks(scores, Y_all[i]))
        fin = torch.from_numpy(chunk.finished)
        for h in H:
            h[fin] = 0.0
        if not chunk.keep.all():
            keep = torch.from_numpy(chunk.keep)
            H = [h[keep] for h in H]


@torch.inference_mode()
def evaluate(net_or_recommender, vocab: Vocabulary | None, test_df: pd.DataFrame,
             cutoffs: Sequence[int] = DEFAULT_CUTOFFS, tie: str = "standard", batch_size: int = 512) -> dict:
    """Recall@K and MRR@K of a network (or a ``Recommender``) on ``test_df``.

    Returns ``{"recall": {"1": r, ...}, "mrr": {...}, "n_events": n, "tie": tie}``."""
    net: GRU4RecNet = getattr(net_or_recommender, "net", net_or_recommender)
    vocab = vocab if vocab is not None else net_or_recommender.vocab
    was_training = net.training
    net.eval()
    acc = Accumulator(cutoffs, tie)
    use_types = net.T is not None

    def score(X: torch.Tensor, T: torch.Tensor, H: list[torch.Tensor], F: torch.Tensor | None) -> torch.Tensor:
        out = net.step(X, H, T if use_types else None, training=False, features=F)
        return net.score_items(out)

    try:
        run_sessions(test_index(vocab, test_df, net), batch_size, score, len(vocab), net.layers, acc)
    finally:
        net.train(was_training)
    return acc.result()
