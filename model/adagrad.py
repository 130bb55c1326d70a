"""The sparse Adagrad (with optional momentum) that training applies to every parameter."""

from __future__ import annotations

import torch

ADAGRAD_EPS = 1e-6


class SparseAdagradM:
    """The reference's IndexedAdagradM: acc += g^2; step = -lr * g / sqrt(acc + eps), with optional
    momentum; per-item tables are updated only on the rows used (duplicates summed first)."""

    def __init__(self, lr: float, momentum: float) -> None:
        self.lr = lr
        self.momentum = momentum
        self.acc: dict[int, torch.Tensor] = {}
        self.mom: dict[int, torch.Tensor] = {}

    def _state(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        key = id(p)
        if key not in self.acc:
            self.acc[key] = torch.zeros_like(p)
            if self.momentum > 0:
                self.mom[key] = torch.zeros_like(p)
        return self.acc[key], self.mom.get(key)

    @torch.no_grad()
    def dense(self, p: torch.Tensor, g: torch.Tensor) -> None:
        acc, mom = self._state(p)
        acc.addcmul_(g, g)
        denom = (acc + ADAGRAD_EPS).sqrt_()
        if mom is not None:
            mom.mul_(self.momentum).addcdiv_(g, denom, value=-self.lr)
            p.add_(mom)
        else:
            p.addcdiv_(g, denom, value=-self.lr)

    @torch.no_grad()
    def sparse(self, p: torch.Tensor, idx: torch.Tensor, g: torch.Tensor) -> None:
        uniq, inverse = torch.unique(idx, return_inverse=True)
        self.sparse_coalesced(p, uniq, torch.zeros(len(uniq), g.shape[1], dtype=g.dtype).index_add_(0, inverse, g))

    @torch.no_grad()
    def sparse_coalesced(self, p: torch.Tensor, uniq: torch.Tensor, gs: torch.Tensor) -> None:
        """Update rows ``uniq`` (distinct) with their summed gradients ``gs`` (overwritten)."""
        acc, mom = self._state(p)
        a = acc.index_select(0, uniq).addcmul_(gs, gs)
        acc.index_copy_(0, uniq, a)
        step = gs.div_(a.add_(ADAGRAD_EPS).sqrt_()).mul_(-self.lr)
        if mom is not None:
            m = mom.index_select(0, uniq).mul_(self.momentum).add_(step)
            mom.index_copy_(0, uniq, m)
            step = m
        p.index_add_(0, uniq, step)
