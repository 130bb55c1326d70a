"""Is a network fit to serve or to train from? A cheap check of its weights, run once per model load.

A checkpoint can be well-formed and correctly checksummed and still be poison: NaN or infinite values
make every score NaN (answers with ``"score": null``) and spread into every hidden state they touch;
enormous finite values do the same one step later (overflow) or saturate every gate. Both the worker
(before it serves a version) and the trainer (before it adopts or publishes one) call
:func:`weight_problem` and refuse the model when it returns a problem.

"Absurd" is concrete: some parameter with ``|w| > MAX_ABS_WEIGHT``. GRU4Rec's weights stay small:
they start uniform within sqrt(6 / (fan_in + fan_out)) (< 1) and Adagrad steps are bounded by the
learning rate; a weight of 1,000 already pins a sigmoid or tanh gate at its limit for any input. The
bound sits two orders of magnitude above what offline training and online fine-tuning produce
(docs/model-safety.md has the measurements), so it only catches models no training run makes.

Cost: one ``torch.aminmax`` pass per tensor, without a copy (NaN propagates into both results, an
infinity shows up as the min or the max); the per-element count runs only for a refused tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

MAX_ABS_WEIGHT = 1000.0

NON_FINITE = "non_finite"
ABSURD = "absurd_weights"


@dataclass(frozen=True)
class WeightProblem:
    """Why a model must not be used: ``reason`` is NON_FINITE or ABSURD; ``detail`` names the tensor."""

    reason: str
    tensor: str
    detail: str

    def __str__(self) -> str:
        return f"{self.tensor}: {self.detail}"


def _non_finite_count(t: torch.Tensor) -> int:
    """Only on the refusal path: allocates a mask."""
    return int((~torch.isfinite(t)).sum())


def tensor_problem(name: str, t: torch.Tensor, max_abs: float = MAX_ABS_WEIGHT) -> WeightProblem | None:
    """The problem of one tensor, or None. Integer and empty tensors are always fine."""
    if t.numel() == 0 or not t.is_floating_point():
        return None
    lo, hi = (float(v) for v in torch.aminmax(t.detach()))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        n = _non_finite_count(t.detach())
        return WeightProblem(NON_FINITE, name, f"{n} of {t.numel()} values are NaN or infinite")
    largest = max(-lo, hi)
    if largest > max_abs:
        return WeightProblem(ABSURD, name, f"max |w| = {largest:.6g} exceeds the bound {max_abs:g}")
    return None


def weight_problem(net: nn.Module, popularity: np.ndarray | None = None,
                   max_abs: float = MAX_ABS_WEIGHT) -> WeightProblem | None:
    """The first problem found in ``net``'s parameters and buffers (then in ``popularity``, whose
    counts have no upper bound but must be finite), or None when the model is fit to use."""
    for name, t in net.state_dict().items():
        problem = tensor_problem(name, t, max_abs)
        if problem is not None:
            return problem
    if popularity is not None:
        pop = torch.from_numpy(np.ascontiguousarray(popularity, dtype=np.float64))
        problem = tensor_problem("popularity", pop, math.inf)
        if problem is not None:
            return problem
    return None
