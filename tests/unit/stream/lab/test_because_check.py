from __future__ import annotations

import numpy as np
import torch

from model.network import GRU4RecNet
from model.params import GRU4RecParams
from model.recommender import Recommender
from model.vocab import Vocabulary
from stream.lab.because import _final_hidden, _scores, run_because_check, window_of

torch.set_num_threads(1)


def _model() -> Recommender:
    net = GRU4RecNet(60, GRU4RecParams(layers=(16,), seed=4))
    return Recommender(net, Vocabulary(f"i{r}" for r in range(60)), 1, np.ones(60))


def test_window_is_the_workers_recent_item_list() -> None:
    assert window_of([1, 2, 1, 3, 4, 5, 6], 4) == [3, 4, 5, 6]
    assert window_of([1, 2, 1], 5) == [2, 1]


def test_leave_one_out_scores_are_the_models_scores() -> None:
    model = _model()
    h = _final_hidden(model, [3, 9])
    rows, scores = model.top_k(h[None, :], 5)
    np.testing.assert_allclose(_scores(model, h, rows[0]), scores[0], rtol=1e-5, atol=1e-6)


def test_the_check_counts_each_recommendation_of_each_usable_session() -> None:
    model = _model()
    rng = np.random.default_rng(0)
    sessions = [rng.integers(0, 60, int(rng.integers(1, 8))).tolist() for _ in range(40)] + [[-1, -1, 4]]
    out = run_because_check(model, sessions, k=5, history=5, seed=1)
    usable = sum(1 for s in sessions if len({r for r in s if r >= 0}) >= 2)
    assert 0 < out["sessions"] <= usable
    assert 0 < out["recommendations"] <= 5 * out["sessions"]
    for name in ("because_lowers", "random_lowers", "because_beats_random"):
        assert 0.0 <= out[name] <= 1.0
