"""ItemIndex: approximate candidates, exact re-scoring, retired/excluded rows, versions, incremental update."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.network import GRU4RecNet
from model.params import GRU4RecParams
from model.recommender import Recommender
from model.retrieval import ItemIndex, RetrievalConfig, use_approximate
from model.vocab import Vocabulary

N, H, K = 3000, 24, 20


def clustered_tables(n: int, h: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Item vectors around a few centroids and skewed biases, as trained output weights look."""
    rng = np.random.default_rng(seed)
    centroids = rng.normal(size=(30, h)) * 0.5
    W = centroids[rng.integers(0, 30, size=n)] + rng.normal(size=(n, h)) * 0.2
    b = -np.log1p(np.arange(n)) * 0.3 + rng.normal(size=n) * 0.1
    return W.astype(np.float32), rng.permutation(b).astype(np.float32)


def make_model(W: np.ndarray, b: np.ndarray, version: int, retired=()) -> Recommender:
    net = GRU4RecNet(W.shape[0], GRU4RecParams(layers=(W.shape[1],)))
    with torch.no_grad():
        net.Wy.weight.copy_(torch.from_numpy(W))
        net.By.weight.copy_(torch.from_numpy(b).reshape(-1, 1))
    vocab = Vocabulary(f"i{i}" for i in range(W.shape[0]))
    return Recommender(net, vocab, version=version, metadata={"retired_rows": list(retired)})


def states(m: int, h: int, seed: int) -> np.ndarray:
    return np.tanh(np.random.default_rng(seed).normal(size=(m, h))).astype(np.float32)


def assert_exact_top_k(W, b, hidden, k, rows, scores, masked=None) -> None:
    """The answer is a top-k of the float64 scores (masked rows at -inf) up to float32 rounding, with the
    true scores, descending. ``masked[b]`` are row b's retired and excluded rows."""
    exact = hidden.astype(np.float64) @ W.T.astype(np.float64) + b.astype(np.float64)
    tol = 64 * np.finfo(np.float32).eps * (np.abs(hidden) @ np.abs(W.T) + np.abs(b)).max(axis=1)
    assert rows.shape == scores.shape == (len(hidden), k)
    for i in range(len(hidden)):
        bad = np.asarray(masked[i] if masked is not None else [], dtype=np.int64)
        exact[i, bad] = -np.inf
        assert len(set(rows[i].tolist())) == k and rows[i].min() >= 0, f"row {i}: missing or repeated items"
        assert not set(rows[i].tolist()) & set(bad.tolist()), f"row {i}: a masked item returned"
        true = exact[i, rows[i]]
        np.testing.assert_allclose(scores[i], true, rtol=0, atol=tol[i], err_msg=f"row {i}: scores")
        assert np.all(np.diff(true) <= tol[i]), f"row {i}: not descending"
        assert true.min() >= np.partition(exact[i], -k)[-k] - tol[i], f"row {i}: a better item left out"


@pytest.fixture(scope="module")
def tables():
    return clustered_tables(N, H, seed=1)


@pytest.mark.parametrize("config", [
    RetrievalConfig(kind="ivf_flat", nlist=32, nprobe=32, n_candidates=K),
    RetrievalConfig(kind="ivf_flat", nlist=32, nprobe=32, n_candidates=K, n_popular=0),
    RetrievalConfig(kind="ivf_sq8", nlist=32, nprobe=32, n_candidates=N),
])
def test_exhaustive_search_is_the_exact_top_k(tables, config):
    W, b = tables
    hidden = states(64, H, seed=2)
    index = ItemIndex.build(W, b, None, version=1, config=config)
    rows, scores = index.search(hidden, K)
    assert_exact_top_k(W, b, hidden, K, rows, scores)


def test_approximate_search_reports_true_scores_in_order(tables):
    W, b = tables
    hidden = states(64, H, seed=3)
    index = ItemIndex.build(W, b, None, version=1, config=RetrievalConfig(nlist=16, nprobe=1, n_candidates=40))
    rows, scores = index.search(hidden, K)
    exact = hidden.astype(np.float64) @ W.T.astype(np.float64) + b
    assert (rows >= 0).all()
    np.testing.assert_allclose(scores, np.take_along_axis(exact, rows, axis=1), rtol=0, atol=1e-4)
    assert np.all(np.diff(scores, axis=1) <= 0)
    # one probed list of 16 cannot hold every true top-K: the test really exercises the approximate path
    assert any(not np.isin(np.argsort(-exact[i])[:K], rows[i]).all() for i in range(len(hidden)))


@pytest.mark.parametrize("kind", ["ivf_flat", "ivf_sq8", "hnsw"])
def test_retired_rows_are_never_returned(tables, kind):
    W, b = tables
    hidden = states(32, H, seed=4)
    exact = hidden @ W.T + b
    retired = np.unique(np.argsort(-exact, axis=1)[:, :5])  # the best items of every query
    model = make_model(W, b, version=3, retired=retired)
    config = RetrievalConfig(kind=kind, nlist=16, nprobe=16, n_candidates=200, ef_search=400)
    index = ItemIndex.for_model(model, config)
    assert index.n_live == N - len(retired)
    rows, scores = index.search(hidden, K)
    assert not np.isin(rows, retired).any()
    if kind != "hnsw":  # exhaustive IVF: still the exact top-K of the live items
        assert_exact_top_k(W, b, hidden, K, rows, scores, masked=[retired] * len(hidden))


def test_excluded_rows_are_never_returned(tables):
    W, b = tables
    hidden = states(16, H, seed=5)
    exact = hidden @ W.T + b
    exclude = [np.argsort(-exact[i])[: 3 + i] for i in range(len(hidden))]  # each query's own best items
    exclude[4] = None
    index = ItemIndex.build(W, b, None, version=1, config=RetrievalConfig(kind="ivf_flat", nlist=16, nprobe=16,
                                                                          n_candidates=K))
    rows, scores = index.search(hidden, K, exclude=exclude)
    for i, ex in enumerate(exclude):
        if ex is not None:
            assert not np.isin(rows[i], ex).any()
    assert_exact_top_k(W, b, hidden, K, rows, scores, masked=[e if e is not None else [] for e in exclude])


def test_a_model_never_matches_another_versions_index(tables):
    W, b = tables
    v1 = make_model(W, b, version=1)
    index = ItemIndex.for_model(v1, RetrievalConfig(nlist=16))
    assert index.matches(v1)
    assert index.matches(make_model(W, b, version=1))  # the same version, loaded again
    assert not index.matches(make_model(W, b, version=2))  # same weights, another version
    W2 = W.copy()
    W2[0] += 0.5
    assert not index.matches(make_model(W2, b, version=1))  # another model reusing the version number
    grown = np.vstack([W, W[:10]]), np.concatenate([b, b[:10]])
    assert not index.matches(make_model(*grown, version=1))


@pytest.mark.parametrize("kind", ["ivf_flat", "ivf_sq8", "hnsw"])
def test_incremental_update_equals_a_rebuild(tables, kind):
    W, b = tables
    rng = np.random.default_rng(6)
    config = RetrievalConfig(kind=kind, nlist=16, nprobe=16, n_candidates=N + 50, ef_search=N + 50)
    old = ItemIndex.build(W, b, [7, 8], version=1, config=config)
    # a fine-tune round: some rows change, 50 items are added, one retired row comes back, two retire
    changed = rng.choice(N, size=200, replace=False)
    W2 = np.vstack([W, clustered_tables(50, H, seed=7)[0]])
    b2 = np.concatenate([b, np.full(50, 0.5, dtype=np.float32)])
    W2[changed] += rng.normal(size=(200, H)).astype(np.float32) * 0.5
    b2[changed] += 1.0
    retired2 = [8, 11, 12]
    new = old.updated(changed, W2, b2, retired2, version=2)
    rebuilt = ItemIndex.build(W2, b2, retired2, version=2, config=config)
    assert new.version == 2 and new.n_live == rebuilt.n_live == N + 50 - 3
    np.testing.assert_array_equal(new.popular, rebuilt.popular)
    assert new.matches(make_model(W2, b2, version=2)) and not old.matches(make_model(W2, b2, version=2))
    hidden = states(48, H, seed=8)
    got, want = new.search(hidden, K), rebuilt.search(hidden, K)
    if kind != "hnsw":
        assert_exact_top_k(W2, b2, hidden, K, *got, masked=[retired2] * len(hidden))
        assert_exact_top_k(W2, b2, hidden, K, *want, masked=[retired2] * len(hidden))
    np.testing.assert_allclose(got[1], want[1], rtol=0, atol=1e-5)
    # the old index still answers for the old version
    assert old.n_live == N - 2 and old.version == 1
    if kind != "hnsw":
        assert_exact_top_k(W, b, hidden, K, *old.search(hidden, K), masked=[[7, 8]] * len(hidden))


def test_fewer_live_items_than_k_are_padded(tables):
    W, b = tables
    retired = np.arange(5, N)
    index = ItemIndex.build(W, b, retired, version=1, config=RetrievalConfig(kind="ivf_flat", nlist=2, nprobe=2))
    rows, scores = index.search(states(3, H, seed=9), 8)
    assert (np.sort(rows[:, :5], axis=1) == np.arange(5)).all()
    assert (rows[:, 5:] == -1).all() and np.isneginf(scores[:, 5:]).all()


def test_bad_input_is_refused(tables):
    W, b = tables
    with pytest.raises(ValueError, match="same items"):
        ItemIndex.build(W, b[:-1], None, version=1)
    bad = W.copy()
    bad[3, 3] = np.nan
    with pytest.raises(ValueError, match="not finite"):
        ItemIndex.build(bad, b, None, version=1)
    with pytest.raises(ValueError, match="kind"):
        RetrievalConfig(kind="lsh")
    with pytest.raises(ValueError, match="nprobe"):
        RetrievalConfig(nprobe=0)
    index = ItemIndex.build(W, b, None, version=1, config=RetrievalConfig(nlist=4))
    with pytest.raises(ValueError, match="cannot follow"):
        index.updated([0], W[:-1], b[:-1], None, version=2)


def test_mode_setting():
    assert use_approximate("approximate", exact_events_per_s=1e9, target_events_per_s=1.0)
    assert not use_approximate("exact", exact_events_per_s=1.0, target_events_per_s=1e9)
    assert not use_approximate("auto", exact_events_per_s=20_000, target_events_per_s=10_000)
    assert use_approximate("auto", exact_events_per_s=2_000, target_events_per_s=10_000)
    with pytest.raises(ValueError, match="mode"):
        use_approximate("fast", 1.0, 1.0)  # type: ignore[arg-type]
