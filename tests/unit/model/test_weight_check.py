"""model.weight_check: non-finite and absurd weights are found, trained models pass."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from model.network import GRU4RecNet
from model.params import GRU4RecParams
from model.synthetic import generate
from model.train import train_model
from model.weight_check import ABSURD, MAX_ABS_WEIGHT, NON_FINITE, tensor_problem, weight_problem


@pytest.fixture(scope="module")
def trained() -> tuple[GRU4RecNet, np.ndarray]:
    torch.set_num_threads(1)
    df = generate(n_sessions=400, n_items=60, seed=5, span_days=1.0)
    net, _vocab, pop = train_model(df, GRU4RecParams(layers=(16,), n_sample=16, batch_size=16, n_epochs=2),
                                   progress=False)
    return net, pop


def _poisoned(net: GRU4RecNet, name: str, index: tuple, value: float) -> GRU4RecNet:
    import copy

    bad = copy.deepcopy(net)
    with torch.no_grad():
        bad.state_dict()[name][index] = value
    return bad


def test_a_trained_model_passes_far_below_the_bound(trained) -> None:
    net, pop = trained
    assert weight_problem(net, pop) is None
    largest = max(float(t.abs().max()) for t in net.state_dict().values() if t.is_floating_point() and t.numel())
    assert largest < MAX_ABS_WEIGHT / 100  # the margin the bound is chosen for


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("name", ["Wy.weight", "By.weight", "G.0.weight_hh", "T.weight"])
def test_non_finite_values_anywhere_are_found(trained, name: str, value: float) -> None:
    net, pop = trained
    t = net.state_dict()[name]
    index = tuple(s - 1 for s in t.shape)  # the very last element: no early exit hides it
    problem = weight_problem(_poisoned(net, name, index, value), pop)
    assert problem is not None and problem.reason == NON_FINITE and problem.tensor == name
    assert "1 of" in problem.detail


def test_nan_in_many_output_rows_is_counted(trained) -> None:
    net, pop = trained
    bad = _poisoned(net, "Wy.weight", (slice(0, 25),), math.nan)
    problem = weight_problem(bad, pop)
    assert problem is not None and problem.reason == NON_FINITE
    assert problem.detail.startswith(f"{25 * net.layers[-1]} of")


def test_absurd_finite_weight_is_found_and_the_bound_itself_is_fine(trained) -> None:
    net, pop = trained
    problem = weight_problem(_poisoned(net, "G.0.weight_ih", (0, 0), -1e6), pop)
    assert problem is not None and problem.reason == ABSURD and problem.tensor == "G.0.weight_ih"
    assert weight_problem(_poisoned(net, "G.0.weight_ih", (0, 0), MAX_ABS_WEIGHT), pop) is None
    assert weight_problem(_poisoned(net, "G.0.weight_ih", (0, 0), 5.0), pop, max_abs=4.0).reason == ABSURD


def test_popularity_must_be_finite_but_may_be_large(trained) -> None:
    net, pop = trained
    big = pop * 1e9
    assert weight_problem(net, big) is None
    bad = pop.copy()
    bad[3] = math.nan
    problem = weight_problem(net, bad)
    assert problem is not None and problem.reason == NON_FINITE and problem.tensor == "popularity"


def test_integer_and_empty_tensors_are_ignored() -> None:
    assert tensor_problem("idx", torch.tensor([1, 2, 3])) is None
    assert tensor_problem("empty", torch.empty(0, 4)) is None
