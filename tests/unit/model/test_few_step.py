"""The numpy step of a request's few sessions equals the network's torch step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.few_step import step_few, supports
from model.network import GRU4RecNet
from model.params import GRU4RecParams
from model.recommender import Recommender
from model.vocab import Vocabulary


def _recommender(layers=(8, 6), **kw) -> Recommender:
    net = GRU4RecNet(30, GRU4RecParams(layers=layers, seed=3, **kw))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # biases and the event-type rows start at zero: make them matter
        for name, p in net.named_parameters():
            if name.startswith("T.") or "bias" in name:
                p.normal_(0, 0.3, generator=gen)
    return Recommender(net, Vocabulary([f"i{i}" for i in range(30)]))


@pytest.mark.parametrize("kw", [dict(layers=(8, 6)), dict(layers=(7,)),
                                dict(layers=(6,), constrained_embedding=False, embedding=5),
                                dict(layers=(6,), event_types=False)])
def test_numpy_steps_equal_torch_steps(kw) -> None:
    rec = _recommender(**kw)
    assert supports(rec.net)
    rng = np.random.default_rng(0)
    H = rng.standard_normal((4, rec.state_size)).astype(np.float32)
    for _ in range(3):  # a session of three events
        rows, types = rng.integers(0, 30, 4), rng.integers(0, 3, 4)
        want = rec.step(H, rows, types)
        got = step_few(rec.net, H, rows, types)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        assert not np.array_equal(got, H)
        H = want


def test_networks_it_does_not_cover_are_stepped_by_torch() -> None:
    one_hot = _recommender(layers=(6,), constrained_embedding=False, embedding=0)
    featured = _recommender(layers=(6,), category_feature=True)
    for rec in (one_hot, featured):
        assert not supports(rec.net)
        H = np.zeros((1, rec.state_size), dtype=np.float32)
        rows, types = np.array([4]), np.array([1])
        np.testing.assert_array_equal(rec.step_few(H, rows, types), rec.step(H, rows, types))


def test_recommender_uses_the_numpy_step_where_it_can() -> None:
    rec = _recommender()
    H = np.zeros((2, rec.state_size), dtype=np.float32)
    rows, types = np.array([3, 9]), np.array([0, 2])
    np.testing.assert_array_equal(rec.step_few(H, rows, types), step_few(rec.net, H, rows, types))
