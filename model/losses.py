"""GRU4Rec losses over a mini-batch score matrix, returning the loss AND its gradient.

``R`` is [B, B + n_sample]: row i scores every target of the mini-batch (column i is row i's own
target, the other B-1 are its in-batch negatives) followed by the shared popularity samples.
Training never runs autograd through the item matrices; it needs only dL/dR, which these functions
return directly (cross-entropy in closed form, BPR-max through a small local autograd graph on R).
Both match the reference: summed over rows, the 1e-24 inside the log included.
"""

from __future__ import annotations

import torch

EPS = 1e-24


def cross_entropy(R: torch.Tensor, logq: torch.Tensor | None = None, scale: float = 1.0) -> tuple[float, torch.Tensor]:
    """Softmax cross-entropy of each row's diagonal target. ``logq`` (length B + n_sample), when given,
    is subtracted from every row first (logQ correction). Returns (loss * scale, dL/dR * scale).

    ``R`` is overwritten (it becomes the gradient), so callers pass a scratch matrix."""
    B = R.shape[0]
    if logq is not None:
        R.sub_(logq)
    R.sub_(R.max(dim=1, keepdim=True).values)
    R.exp_()
    R.div_(R.sum(dim=1, keepdim=True))
    diag = torch.arange(B)
    p = R[diag, diag].clone()
    loss = float(-torch.log(p + EPS).sum()) * scale
    # d/dR of -log(p_ii + eps) = -(p_ii / (p_ii + eps)) * (onehot_i - p_i)
    f = (p / (p + EPS)) * scale
    R.mul_(f[:, None])
    R[diag, diag] -= f
    return loss, R


def bpr_max(R: torch.Tensor, bpreg: float = 0.0, elu_param: float = 0.0, scale: float = 1.0) -> tuple[float, torch.Tensor]:
    """BPR-max: -log sum_j softmax_neg(o)_j * sigmoid(o_target - o_j) + bpreg * sum_j softmax_neg(o)_j * o_j^2,
    with the softmax over each row's negatives only; ``elu_param`` > 0 first applies ELU(alpha) to R."""
    with torch.enable_grad():
        O = R.detach().requires_grad_()
        X = torch.nn.functional.elu(O, elu_param) if elu_param > 0 else O
        hm = 1.0 - torch.eye(*X.shape, dtype=X.dtype)
        Xm = X * hm
        e = torch.exp(Xm - Xm.max(dim=1, keepdim=True).values) * hm
        s = e / e.sum(dim=1, keepdim=True)
        target = torch.diagonal(X)[:, None]
        L = torch.sum(-torch.log(torch.sum(torch.sigmoid(target - X) * s, dim=1) + EPS)
                      + bpreg * torch.sum(X * X * s, dim=1)) * scale
        L.backward()
    return float(L.detach()), O.grad
