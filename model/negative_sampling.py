"""Negative samples for training: items drawn from popularity^alpha, shared by a mini-batch.

Like the reference's sample cache, samples are drawn in bulk from an explicit generator (never torch's
global one), so a training run is a function of its seed.
"""

from __future__ import annotations

import numpy as np
import torch


class NegativeSampler:
    """``n_sample`` items per mini-batch from popularity^alpha, drawn in bulk (the reference's sample cache)."""

    def __init__(self, counts: np.ndarray, n_sample: int, alpha: float, cache_size: int, generator: torch.Generator,
                 expected_steps: int | None = None) -> None:
        self.n_sample = n_sample
        self.gen = generator
        weights = np.power(counts, alpha, where=counts > 0, out=np.zeros_like(counts, dtype=np.float64))
        total = weights.sum()
        if n_sample > 0 and total <= 0:
            raise ValueError("no item has positive popularity to sample negatives from")
        cdf = np.cumsum(weights) / max(total, 1e-300)
        cdf[-1] = 1.0
        self.cdf = torch.from_numpy(cdf.astype(np.float32))
        self.n_items = len(counts)
        # the reference precomputes sample_cache_max_size samples at once; drawing them in blocks of at
        # most ~1M keeps the same statistics (i.i.d. draws) at a fraction of the memory
        self.batches = max(1, min(cache_size, 1 << 20) // n_sample) if n_sample > 0 else 0
        if expected_steps is not None and self.batches:
            self.batches = max(1, min(self.batches, expected_steps))
        self._cache = torch.empty(0, 0, dtype=torch.int64)
        self._merged: tuple[torch.Tensor, torch.Tensor] | None = None
        self._next = 0

    def _refill(self) -> None:
        u = torch.rand(self.batches * self.n_sample, generator=self.gen)
        idx = torch.searchsorted(self.cdf, u, right=True).clamp_(max=self.n_items - 1)
        self._cache = idx.view(self.batches, self.n_sample)
        self._merged = None
        self._next = 0

    def next(self) -> torch.Tensor:
        """The next mini-batch's ``n_sample`` items (with repeats)."""
        if self._next >= self._cache.shape[0]:
            self._refill()
        s = self._cache[self._next]
        self._next += 1
        return s

    def next_merged(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The same draw as :meth:`next`, as distinct items and log(multiplicity).

        A softmax over columns with repeats equals one over distinct columns with log(count) added to
        their scores, so cross-entropy can score ~25% fewer columns. Rows are padded to one length with
        a repeat of their first item at log(0) = -inf (zero probability, zero gradient)."""
        if self._next >= self._cache.shape[0]:
            self._refill()
        if self._merged is None:
            self._merged = _merge_rows(self._cache)
        uniq, logc = self._merged
        i = self._next
        self._next += 1
        return uniq[i], logc[i]


def _merge_rows(samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: distinct items and log of their counts, padded (see ``NegativeSampler.next_merged``)."""
    srt, _ = torch.sort(samples, dim=1)
    first = torch.ones_like(srt, dtype=torch.bool)
    first[:, 1:] = srt[:, 1:] != srt[:, :-1]
    pos = torch.cumsum(first, dim=1) - 1
    width = int(pos[:, -1].max()) + 1
    uniq = srt[:, :1].expand(-1, width).contiguous()
    uniq.scatter_(1, pos, srt)
    counts = torch.zeros(samples.shape[0], width).scatter_add_(1, pos, torch.ones_like(srt, dtype=torch.float32))
    return uniq, counts.log_()
