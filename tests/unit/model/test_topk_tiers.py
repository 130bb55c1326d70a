"""Tiered exact top-K (model/topk_tiers.py): the head is scored, the rest proven out by its norm bound, and the
answer is the exact top-K whatever the split."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.network import GRU4RecNet
from model.params import GRU4RecParams
from model.recommender import Recommender
from model.topk import TopKScorer
from model.topk_calibration import calibrate, candidate_scorers, is_exact_top_k
from model.topk_tiers import MIN_ITEMS, NormTiers, TieredTopK
from model.vocab import Vocabulary

N = MIN_ITEMS + 8_000
TRAINED = 6_000  # rows with trained-like norms; the others keep small initial-like rows


def _long_tail_model(retired: list[int] | None = None, seed: int = 5, bias: float = 0.0) -> Recommender:
    """A catalogue like a trained model's at scale: a few thousand spread rows (biases around ``bias``),
    the rest tiny."""
    net = GRU4RecNet(N, GRU4RecParams(layers=(16,), seed=seed))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        net.Wy.weight.copy_(torch.randn(net.Wy.weight.shape, generator=g) * 0.004)
        net.By.weight.zero_()
        trained = torch.randperm(N, generator=g)[:TRAINED]
        net.Wy.weight[trained] = torch.randn(TRAINED, 16, generator=g)
        net.By.weight[trained] = torch.randn(TRAINED, 1, generator=g) * 0.3 + bias
    metadata = {"retired_rows": retired} if retired else {}
    popularity = np.zeros(N)
    popularity[trained.numpy()] = 1.0  # the trained rows are the items seen
    return Recommender(net, Vocabulary(f"i{r}" for r in range(N)), version=1, popularity=popularity,
                       metadata=metadata)


def _states(n: int, seed: int = 0) -> np.ndarray:
    return np.tanh(np.random.default_rng(seed).standard_normal((n, 16)) * 1.5).astype(np.float32)


def _tiered(model: Recommender, k: int = 20) -> TieredTopK:
    scorers = candidate_scorers(model, k)
    assert all(isinstance(s, TieredTopK) for s in scorers.values()), "a long-tail catalogue is scored in tiers"
    return scorers["float32"]  # type: ignore[return-value]


def test_a_long_tail_catalogue_is_split_and_every_path_answers_exactly():
    model = _long_tail_model()
    states = _states(200)
    for name, scorer in candidate_scorers(model, 20).items():
        assert isinstance(scorer, TieredTopK) and len(scorer.tiers.head) < N // 4
        assert is_exact_top_k(scorer, states, 20, *scorer.top_k(states, 20)), name


def test_states_the_head_cannot_settle_are_scored_on_the_tiers_and_stay_exact():
    """Trained rows with negative biases (as BPR-max gives) lose to the tiny rows for states near zero: the
    K-th head score does not beat the tiers' bounds, so tiers are scored, and the answer is still exact."""
    model = _long_tail_model(bias=-1.0)
    scorer = _tiered(model)
    states = _states(20) * 1e-3
    rows, values = scorer.top_k(states, 20)
    assert scorer.tail_rows > 0
    assert is_exact_top_k(scorer, states, 20, rows, values)
    reference, _ = model.top_k(states, 20)
    assert all(set(a) == set(b) for a, b in zip(rows.tolist(), reference.tolist()))


def test_retired_rows_are_never_returned_from_head_or_tiers():
    model = _long_tail_model()
    top, _ = model.top_k(np.zeros((1, 16), dtype=np.float32), 40)
    retired = [int(r) for r in top[0][:25]]
    model = _long_tail_model(retired=retired)
    scorer = _tiered(model)
    states = np.vstack([np.zeros((2, 16), dtype=np.float32), _states(50)])
    rows, values = scorer.top_k(states, 20)
    assert not set(rows.ravel().tolist()) & set(retired)
    assert is_exact_top_k(scorer, states, 20, rows, values)
    assert not set(scorer.tiers.head.tolist()) & set(retired)


def test_calibration_keeps_a_tiered_path_and_it_serves_on_threads():
    model = _long_tail_model()
    scorer, calibration = calibrate(model, 20, threads=2)
    assert isinstance(scorer, TieredTopK) and scorer.threads == 2 and calibration.path == scorer.path
    states = _states(300, seed=4)
    assert is_exact_top_k(scorer, states, 20, *scorer.top_k(states, 20))
    assert scorer.rows_scored == 300


def test_no_split_for_a_small_or_uniform_catalogue():
    W = torch.randn(MIN_ITEMS, 16) * 0.3  # every row alike: no head of a quarter covers the states
    assert NormTiers.build(W, torch.zeros(MIN_ITEMS), None, _states(64), 20) is None
    small = torch.randn(MIN_ITEMS - 1, 16)
    assert NormTiers.build(small, torch.zeros(MIN_ITEMS - 1), None, _states(64), 20) is None


def test_a_head_scorer_answers_with_catalogue_rows():
    model = _long_tail_model()
    rows = np.sort(np.random.default_rng(1).choice(N, size=9_000, replace=False))
    head = TopKScorer(model, int8=False, rows=rows)
    got, _ = head.top_k(_states(10), 20)
    assert set(got.ravel().tolist()) <= set(rows.tolist())
    W, b = model.net.Wy.weight.detach()[rows], model.net.By.weight.detach().reshape(-1)[rows]
    expect = torch.topk(torch.from_numpy(_states(10)) @ W.T + b, 20).indices.numpy()
    assert all(set(a) == set(rows[e]) for a, e in zip(got.tolist(), expect.tolist()))


@pytest.mark.parametrize("k", [1, 20])
def test_the_head_is_the_rows_of_largest_bound(k: int):
    model = _long_tail_model()
    W = model.net.Wy.weight.detach()
    tiers = NormTiers.build(W, model.net.By.weight.detach().reshape(-1), None, _states(64), k)
    assert tiers is not None
    norms = W.norm(dim=1).numpy()
    assert norms[tiers.head].min() > max(t.max_norm for t in tiers.tiers)
    assert sum(len(t.rows) for t in tiers.tiers) + len(tiers.head) == N
