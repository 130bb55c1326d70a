"""The worker's approximate top-K path: exact when it searches everything, and one index per model version."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.network import GRU4RecNet
from model.params import GRU4RecParams
from model.recommender import Recommender
from model.retrieval import ItemIndex
from model.retrieval_scorer import NO_ROW, IndexedScorer, IndexKeeper, RetrievalPolicy, lists_for
from model.vocab import Vocabulary
from model.topk_calibration import ScorerCache
from stream.worker.model_holder import ModelHolder

N, H, K = 4000, 24, 20


def _clustered_model(version: int, seed: int = 1, retired: list[int] | None = None) -> Recommender:
    """Output rows around a few centroids and skewed biases, as a trained model's look."""
    rng = np.random.default_rng(seed)
    centroids = rng.normal(size=(30, H)) * 0.5
    W = centroids[rng.integers(0, 30, size=N)] + rng.normal(size=(N, H)) * 0.2
    b = rng.permutation(-np.log1p(np.arange(N)) * 0.3 + rng.normal(size=N) * 0.1)
    net = GRU4RecNet(N, GRU4RecParams(layers=(H,), seed=seed))
    with torch.no_grad():
        net.Wy.weight.copy_(torch.from_numpy(W.astype(np.float32)))
        net.By.weight.copy_(torch.from_numpy(b.astype(np.float32)).reshape(-1, 1))
    metadata = {"retired_rows": retired} if retired else {}
    return Recommender(net, Vocabulary(f"i{r}" for r in range(N)), version=version, metadata=metadata)


def _fine_tuned(model: Recommender, version: int, rows: np.ndarray, seed: int) -> Recommender:
    """A copy of ``model`` whose output rows ``rows`` moved, as a fine-tune round moves a few."""
    net = GRU4RecNet(N, GRU4RecParams(layers=(H,), seed=seed))
    net.load_state_dict(model.net.state_dict())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        idx = torch.from_numpy(rows)
        net.Wy.weight[idx] += torch.randn(len(rows), H, generator=g) * 0.5
        net.By.weight[idx] += 1.0
    return Recommender(net, model.vocab, version=version, metadata=dict(model.metadata))


def _states(model: Recommender, n: int, seed: int) -> np.ndarray:
    return np.tanh(np.random.default_rng(seed).normal(size=(n, model.state_size)) * 1.5).astype(np.float32)


# every list probed and every indexed row a candidate: the index can leave nothing out
EVERYTHING = RetrievalPolicy(mode="approximate", nlist=16, nprobe=16, n_candidates=N, n_popular=50)


def test_the_approximate_path_searching_everything_gives_the_exact_top_k(same_top_k) -> None:
    retired = list(range(0, N, 7))
    model = _clustered_model(1, retired=retired)
    cache = ScorerCache(threads=2, k=K, retrieval=EVERYTHING)
    scorer = cache.get(model)
    assert isinstance(scorer, IndexedScorer) and cache.calibration.path == "approximate"
    hidden = _states(model, 300, seed=2)  # 300 rows: split over both scoring threads
    rows, values = scorer.top_k(hidden, K)
    same_top_k(model, hidden, K, rows, values)  # includes: no retired row
    assert scorer.rows_scored == 300 and scorer.rows_int8 == 0


def test_a_swap_never_pairs_a_model_with_another_versions_index(same_top_k) -> None:
    v1 = _clustered_model(1)
    holder, cache = ModelHolder(v1), ScorerCache(k=K, retrieval=EVERYTHING)
    holder.on_prepare(cache.prepare)
    first = cache.get(v1)
    assert first.index.version == 1
    v2 = _fine_tuned(v1, 2, np.arange(0, N, 50), seed=5)
    holder.swap(v2)  # its index is made before the swap: from v1's, re-indexing the changed rows
    served = cache.get(v2)
    assert served is not first and served.index.version == 2 and served.index.matches(v2)
    assert not first.index.matches(v2) and not served.index.matches(v1)
    hidden = _states(v2, 64, seed=6)
    same_top_k(v2, hidden, K, *served.top_k(hidden, K))
    with pytest.raises(ValueError, match="never served together"):
        IndexedScorer(v2, first.index)
    # a model nobody prepared gets its own index, not the one prepared for another
    v3, v4 = _fine_tuned(v2, 3, np.arange(1, N, 40), seed=7), _fine_tuned(v2, 4, np.arange(2, N, 40), seed=8)
    cache.prepare(v3)
    assert cache.get(v4).index.version == 4
    # a model whose weights changed after its index was prepared (same object, same version): rebuilt
    v5 = _fine_tuned(v4, 5, np.arange(3, N, 30), seed=9)
    cache.prepare(v5)
    prepared = cache._prepared[1]
    with torch.no_grad():
        v5.net.Wy.weight[::3] += 0.25
    served = cache.get(v5)
    assert served is not prepared and served.index.matches(v5) and not prepared.index.matches(v5)
    same_top_k(v5, hidden, K, *served.top_k(hidden, K))


def test_auto_serves_exactly_where_the_exact_path_is_fast_enough() -> None:
    model = _clustered_model(1)
    slow_target = RetrievalPolicy(mode="auto", target_events_per_s=1e12, auto_min_items=0)
    assert ScorerCache(k=K, retrieval=slow_target).get(model).path == "approximate"
    easy_target = RetrievalPolicy(mode="auto", target_events_per_s=1.0, auto_min_items=0)
    assert ScorerCache(k=K, retrieval=easy_target).get(model).path != "approximate"
    small_catalogue = RetrievalPolicy(mode="auto", target_events_per_s=1e12)  # below auto_min_items
    assert ScorerCache(k=K, retrieval=small_catalogue).get(model).path != "approximate"
    assert ScorerCache(k=K, retrieval=RetrievalPolicy(mode="exact")).get(model).path != "approximate"


def test_the_keeper_updates_incrementally_and_rebuilds_in_full_every_few_versions() -> None:
    keeper = IndexKeeper(RetrievalPolicy(nlist=16, rebuild_every=2))
    v1 = _clustered_model(1)
    first = keeper.index_for(v1)
    v2 = _fine_tuned(v1, 2, np.arange(0, N, 100), seed=3)
    second = keeper.index_for(v2)  # an update: v1's trained lists, changed rows re-indexed
    assert second.matches(v2) and second.n_live == N
    assert faiss_centroids(second) == faiss_centroids(first)
    v3 = _fine_tuned(v2, 3, np.arange(0, N, 100), seed=4)
    third = keeper.index_for(v3)  # the second version since the last full build: built again
    assert third.matches(v3) and faiss_centroids(third) != faiss_centroids(first)


def faiss_centroids(index: ItemIndex) -> bytes:
    import faiss
    return faiss.vector_to_array(faiss.downcast_index(index._index.quantizer).codes).tobytes()


def test_rows_the_index_cannot_fill_are_padding_never_a_retired_item() -> None:
    model = _clustered_model(1, retired=list(range(10, N)))  # 10 live items, k = 20
    rows, values = ScorerCache(k=K, retrieval=EVERYTHING).get(model).top_k(_states(model, 4, seed=1), K)
    assert (rows[:, :10] >= 0).all() and (rows[:, :10] < 10).all() and (rows[:, 10:] == NO_ROW).all()
    assert np.isfinite(values).all()


def test_lists_grow_with_the_catalogue() -> None:
    assert [lists_for(n) for n in (20_000, 200_000, 1_000_000, 5_000_000)] == [256, 1024, 2048, 4096]
