"""Serving API for the stream: batched one-step state updates and batched top-K over all items.

Hidden states cross this boundary as float32 numpy arrays of shape [B, state_size] (all layers
concatenated), so the stream and the state codec never touch torch. A Recommender is immutable once
built: a new model version is a new Recommender, swapped in between micro-batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from model.few_step import step_few
from model.few_step import supports as few_step_supports
from model.network import GRU4RecNet
from model.vocab import Vocabulary


@dataclass
class Recommender:
    net: GRU4RecNet
    vocab: Vocabulary
    version: int = 0
    popularity: np.ndarray | None = None  # per-row counts, for cold users and unknown items
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.net.eval()
        self._splits = list(self.net.layers)
        self._few_step = few_step_supports(self.net)
        pop = self.popularity if self.popularity is not None else np.zeros(len(self.vocab), dtype=np.float64)
        self._popular_rows = np.argsort(-pop, kind="stable").astype(np.int64)
        self._popular_scores = pop[self._popular_rows].astype(np.float32)
        # retired items (online learning: unseen for long) keep their rows but are never recommended
        retired = np.asarray(self.metadata.get("retired_rows", ()) or (), dtype=np.int64)
        retired = retired[(retired >= 0) & (retired < len(pop))]
        self._retired = torch.from_numpy(retired) if len(retired) else None
        if len(retired):
            keep = ~np.isin(self._popular_rows, retired)
            self._popular_rows, self._popular_scores = self._popular_rows[keep], self._popular_scores[keep]

    @property
    def state_size(self) -> int:
        return self.net.state_size

    @property
    def n_items(self) -> int:
        return self.net.n_items

    def zero_state(self, batch: int) -> np.ndarray:
        return np.zeros((batch, self.state_size), dtype=np.float32)

    def _unflatten(self, hidden: np.ndarray) -> list[torch.Tensor]:
        t = torch.from_numpy(np.ascontiguousarray(hidden, dtype=np.float32))
        return list(torch.split(t, self._splits, dim=1)) if len(self._splits) > 1 else [t]

    @property
    def uses_features(self) -> bool:
        return self.net.uses_features

    @torch.inference_mode()
    def step(self, hidden: np.ndarray, item_rows: np.ndarray, event_types: np.ndarray,
             features: np.ndarray | None = None) -> np.ndarray:
        """Advance B sessions by one event each. ``item_rows`` must be valid rows (>= 0); ``features``
        [B, N_FEATURES] rows (model.features) where the model uses features."""
        H = [h.clone() for h in self._unflatten(hidden)]
        X = torch.from_numpy(np.asarray(item_rows, dtype=np.int64))
        T = torch.from_numpy(np.asarray(event_types, dtype=np.int64))
        F = torch.from_numpy(np.asarray(features, dtype=np.int64)) if features is not None else None
        self.net.step(X, H, T, training=False, features=F)
        return torch.cat(H, dim=1).numpy()

    def step_few(self, hidden: np.ndarray, item_rows: np.ndarray, event_types: np.ndarray) -> np.ndarray:
        """``step`` (without features) for the few sessions of a request: in numpy where the network allows
        it (model.few_step: torch's per-call cost and GIL hand-offs dominate at this size), else torch."""
        if self._few_step:
            return step_few(self.net, np.asarray(hidden, dtype=np.float32), np.asarray(item_rows, dtype=np.int64),
                            np.asarray(event_types, dtype=np.int64))
        return self.step(hidden, item_rows, event_types)

    @torch.inference_mode()
    def top_k(self, hidden: np.ndarray, k: int,
              exclude: Sequence[np.ndarray | Sequence[int]] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows and scores over all items for each of B states; ``exclude[b]`` rows are skipped."""
        k = min(k, self.n_items)
        top = self._unflatten(hidden)[-1]
        scores = self.net.score_items(top)
        if self._retired is not None:
            scores[:, self._retired] = -torch.inf
        if exclude is not None:
            for b, rows in enumerate(exclude):
                if rows is not None and len(rows):
                    scores[b, torch.as_tensor(np.asarray(rows, dtype=np.int64))] = -torch.inf
        values, rows = torch.topk(scores, k, dim=1, sorted=True)
        return rows.numpy().astype(np.int64), values.numpy().astype(np.float32)

    def popular(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Most popular rows (training counts): what a user with no state is shown."""
        return self._popular_rows[:k], self._popular_scores[:k]
