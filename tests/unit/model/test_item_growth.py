"""Vocabulary growth of a network: grown copies keep the old rows (and scores), new rows start at the
co-occurrence mean of their known neighbours."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.item_growth import cooccurrence_init, grow_net
from model.network import GRU4RecNet
from model.params import GRU4RecParams


def _net(n: int, seed: int = 1) -> GRU4RecNet:
    return GRU4RecNet(n, GRU4RecParams(layers=(8,), seed=seed))


@pytest.mark.parametrize("extra", [{}, {"constrained_embedding": False, "embedding": 6},
                                   {"constrained_embedding": False, "embedding": 0}])
def test_grow_net_keeps_old_rows_and_scores(extra: dict) -> None:
    params = GRU4RecParams(layers=(8,), seed=1, **extra)
    net = GRU4RecNet(5, params)
    n_new = 3
    init = {name: torch.full((n_new,) + tuple(p.shape[1:]), 0.5)
            for name, p in net.state_dict().items() if p.dim() >= 1 and p.shape[0] == 5}
    grown = grow_net(net, 8, init)
    assert grown.n_items == 8
    for name, p in net.state_dict().items():
        q = grown.state_dict()[name]
        if p.shape[0] == 5 and name in init:
            assert torch.equal(q[:5], p) and torch.all(q[5:] == 0.5)
        else:
            assert torch.equal(q, p)
    net.eval()
    grown.eval()
    H1, H2 = net.init_hidden(2), grown.init_hidden(2)
    X = torch.tensor([0, 3])
    with torch.no_grad():
        s1 = net(X, H1, None)
        s2 = grown(X, H2, None)
    assert torch.allclose(s1, s2[:, :5])
    with pytest.raises(ValueError):
        grow_net(net, 4, {})


def test_cooccurrence_init_is_the_mean_of_neighbours() -> None:
    net = _net(4)
    w = net.Wy.weight.detach()
    # new row 4 shares session 0 with rows 0 and 1, session 1 with row 2; new row 5 has no known neighbour
    sessions = np.array([0, 0, 0, 1, 1, 2, 2])
    rows = np.array([0, 1, 4, 2, 4, 5, -1])
    init = cooccurrence_init(net, rows, sessions, n_old=4, n_new=2, noise=0.01)
    expected = (w[0] + w[1] + w[2]) / 3
    assert torch.allclose(init["Wy.weight"][0], expected, atol=1e-6)
    lonely = init["Wy.weight"][1]
    assert float(lonely.abs().max()) < float(w.abs().max())  # small noise, not a copy
    assert not torch.equal(lonely, torch.zeros_like(lonely))
    assert init["By.weight"].shape == (2, 1)
