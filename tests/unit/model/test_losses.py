"""Losses against small hand-computed cases, and their closed-form gradients against autograd."""

from __future__ import annotations

import math

import torch

from model.losses import bpr_max, cross_entropy


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_cross_entropy_two_by_two_by_hand() -> None:
    R = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    loss, grad = cross_entropy(R.clone())
    p = math.e / (math.e + 1.0)
    assert math.isclose(loss, -2 * math.log(p), rel_tol=1e-6)
    expected = torch.tensor([[p - 1.0, 1.0 - p], [1.0 - p, p - 1.0]])
    assert torch.allclose(grad, expected, atol=1e-6)


def test_cross_entropy_logq_shifts_scores_and_scale_divides() -> None:
    R = torch.tensor([[2.0, 1.0, 0.5]])
    logq = torch.tensor([0.0, math.log(2.0), 0.0])
    loss, _ = cross_entropy(R.clone(), logq, scale=0.5)
    z = math.exp(2.0) + math.exp(1.0) / 2.0 + math.exp(0.5)
    assert math.isclose(loss, -math.log(math.exp(2.0) / z) * 0.5, rel_tol=1e-6)


def test_cross_entropy_gradient_matches_autograd() -> None:
    g = torch.Generator().manual_seed(0)
    R = torch.randn(5, 12, generator=g)
    logq = torch.randn(12, generator=g)
    Ra = R.clone().requires_grad_()
    P = torch.softmax(Ra - logq, dim=1)
    ref = -torch.log(torch.diagonal(P) + 1e-24).sum() / 7.0
    ref.backward()
    loss, grad = cross_entropy(R.clone(), logq, scale=1 / 7.0)
    assert math.isclose(loss, float(ref.detach()), rel_tol=1e-5)
    assert torch.allclose(grad, Ra.grad, atol=1e-6)


def test_bpr_max_two_by_two_by_hand() -> None:
    # each row has exactly one negative, so softmax over negatives is 1 on it
    o = [[1.0, 0.2], [0.3, -0.5]]
    bpreg = 0.5
    loss, grad = bpr_max(torch.tensor(o), bpreg=bpreg)
    row0 = -math.log(_sigmoid(1.0 - 0.2)) + bpreg * 0.2 ** 2
    row1 = -math.log(_sigmoid(-0.5 - 0.3)) + bpreg * 0.3 ** 2
    assert math.isclose(loss, row0 + row1, rel_tol=1e-5)
    # d/d target of -log sigmoid(t - n) = -(1 - sigmoid(t - n))
    assert math.isclose(float(grad[0, 0]), -(1 - _sigmoid(0.8)), rel_tol=1e-5)
    assert math.isclose(float(grad[0, 1]), (1 - _sigmoid(0.8)) + 2 * bpreg * 0.2, rel_tol=1e-5)


def test_bpr_max_three_columns_softmax_weights_negatives() -> None:
    o = torch.tensor([[2.0, 1.0, 0.0]])
    loss, _ = bpr_max(o, bpreg=0.0)
    # row 0: target 2.0; negatives 1.0 and 0.0 weighted by softmax over negatives
    w1, w2 = math.exp(1.0) / (math.exp(1.0) + 1.0), 1.0 / (math.exp(1.0) + 1.0)
    expected = -math.log(w1 * _sigmoid(1.0) + w2 * _sigmoid(2.0))
    assert math.isclose(loss, expected, rel_tol=1e-5)


def test_bpr_max_elu_changes_negative_scores_only() -> None:
    o = torch.tensor([[1.0, -2.0], [-1.0, 0.5]])
    l_plain, _ = bpr_max(o.clone(), elu_param=0.0)
    l_elu, _ = bpr_max(o.clone(), elu_param=1.0)
    e = lambda x: x if x > 0 else math.exp(x) - 1.0  # noqa: E731
    expected = -math.log(_sigmoid(e(1.0) - e(-2.0))) - math.log(_sigmoid(e(0.5) - e(-1.0)))
    assert math.isclose(l_elu, expected, rel_tol=1e-5)
    assert not math.isclose(l_plain, l_elu)
