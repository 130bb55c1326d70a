"""What "the same top-K" means when two float32 code paths score the items.

Two float32 products of the same numbers may differ in the last bits (the BLAS kernel, and so the order
of the sums, depends on the shapes and on the threads), so two items whose scores differ by less than
that may swap places. An answer is right when it is a top-K of the exact (float64) scores up to that
rounding: no better item left out, the scores it reports true, and the order descending.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from model.recommender import Recommender

TopKCheck = Callable[[Recommender, np.ndarray, int, np.ndarray, np.ndarray], None]


def check_top_k(rec: Recommender, hidden: np.ndarray, k: int, rows: np.ndarray, scores: np.ndarray) -> None:
    top = torch.from_numpy(np.ascontiguousarray(hidden[:, -rec.net.layers[-1]:], dtype=np.float32)).double()
    W, bias = rec.net.Wy.weight.detach().double(), rec.net.By.weight.detach().double()
    exact = (top @ W.T + bias.T).numpy()
    retired = np.asarray(rec.metadata.get("retired_rows") or [], dtype=np.int64)
    exact[:, retired] = -np.inf
    # float32 rounding of a dot product: a few ulps of the sum of the magnitudes of its terms
    magnitude = (top.abs() @ W.abs().T).numpy().max(axis=1) + np.abs(exact[exact > -np.inf]).max()
    tol = 64 * np.finfo(np.float32).eps * magnitude
    assert rows.shape == scores.shape == (len(hidden), k)
    for b in range(len(hidden)):
        assert len(set(rows[b].tolist())) == k, f"row {b}: an item recommended twice"
        assert not set(rows[b].tolist()) & set(retired.tolist()), f"row {b}: a retired item"
        true = exact[b, rows[b]]
        np.testing.assert_allclose(scores[b], true, rtol=0, atol=tol[b], err_msg=f"row {b}: reported scores")
        assert np.all(np.diff(true) <= tol[b]), f"row {b}: not in descending order"
        kth_best = np.partition(exact[b], -k)[-k]
        assert true.min() >= kth_best - tol[b], f"row {b}: a better item was left out"


@pytest.fixture
def same_top_k() -> TopKCheck:
    return check_top_k
