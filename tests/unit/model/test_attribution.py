from __future__ import annotations

import numpy as np
import torch

from model.attribution import NO_ITEM, Attribution, session_rows
from model.network import GRU4RecNet
from model.params import GRU4RecParams


def _net_with(vectors: np.ndarray) -> GRU4RecNet:
    net = GRU4RecNet(vectors.shape[0], GRU4RecParams(layers=(vectors.shape[1],), seed=1))
    with torch.no_grad():
        net.Wy.weight.copy_(torch.from_numpy(vectors))
    return net


def test_the_most_similar_session_items_are_named_best_first() -> None:
    W = np.array([[1, 0, 0], [0.9, 0.1, 0], [0, 1, 0], [0, 0.8, 0.2], [-1, 0, 0]], dtype=np.float32)
    att = Attribution(_net_with(W))
    recent = np.array([[2, 1, 4]])  # session: items 2, 1, 4
    got = att.because(np.array([[0, 3, -1]]), recent, n=2)
    assert got[0, 0].tolist() == [1, NO_ITEM]  # item 0 is like item 1, orthogonal to 2, opposite to 4
    assert got[0, 1].tolist() == [2, 1]  # item 3 is most like item 2, a little like item 1
    assert got[0, 2].tolist() == [NO_ITEM, NO_ITEM]  # no recommendation, no reason
    # a session item pointing away (4 against 0) is never named: similarity must be positive
    assert 4 not in got[0, 0].tolist()


def test_padding_is_never_named() -> None:
    W = np.eye(4, dtype=np.float32)
    att = Attribution(_net_with(W))
    got = att.because(np.array([[1]]), np.array([[1, NO_ITEM]]), n=2)
    assert got[0, 0].tolist() == [1, NO_ITEM]


def test_session_rows_keep_distinct_items_newest_last_and_bounded() -> None:
    h: list[int] = []
    for r in (5, 6, 5, 7, 8):
        h = session_rows(h, r, 3)
    assert h == [5, 7, 8]
