"""The int8 pre-filter of the worker's top-K: its error bound holds, and its answers are the float32 top-K."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from model.network import GRU4RecNet
from model.params import GRU4RecParams
from model.recommender import Recommender
from model.vocab import Vocabulary
from stream import native
from stream.model_holder import ModelHolder
from stream.scoring import Int8Prefilter, ScorerCache, TopKScorer


@pytest.fixture(params=[True, False], ids=["compiled", "torch"])
def compiled(request) -> bool:
    """Both int8 paths: the compiled kernel (where this machine can build and run it) and torch's."""
    if request.param and native.topk_kernel() is None:
        pytest.skip("the compiled top-K kernel cannot run here (see test_the_compiled_kernel_runs_where_it_can)")
    return request.param


def _cpu_has_vnni() -> bool:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return " avx512_vnni" in flags and " avx512bw" in flags


@pytest.mark.skipif(not _cpu_has_vnni() or not shutil.which("cc"), reason="needs AVX-512 VNNI and a C compiler")
def test_the_compiled_kernel_runs_where_it_can() -> None:
    assert native.topk_kernel() is not None


def _spread_model(n_items: int, hidden: int = 32, seed: int = 3, retired: list[int] | None = None) -> Recommender:
    """Scores spread out like a trained model's (an untrained one's are nearly flat)."""
    net = GRU4RecNet(n_items, GRU4RecParams(layers=(hidden,), seed=seed))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        net.Wy.weight.copy_(torch.randn(net.Wy.weight.shape, generator=g) * 0.3)
        net.By.weight.copy_(torch.randn(net.By.weight.shape, generator=g) * 0.5)
    metadata = {"retired_rows": retired} if retired else {}
    return Recommender(net, Vocabulary(f"i{r}" for r in range(n_items)), version=1, metadata=metadata)


def _states(rec: Recommender, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.tanh(rng.standard_normal((n, rec.state_size)) * 1.5).astype(np.float32)


@pytest.mark.parametrize("bias_scale", [0.0, 0.5, 5.0])
def test_the_error_bound_holds(bias_scale: float) -> None:
    rng = np.random.default_rng(1)
    W = torch.from_numpy(rng.standard_normal((3000, 40)).astype(np.float32) * 0.2)
    b = torch.from_numpy(rng.standard_normal(3000).astype(np.float32) * bias_scale)
    pf = Int8Prefilter(W, b)
    x = torch.from_numpy(np.concatenate([np.tanh(rng.standard_normal((200, 40))),
                                         rng.standard_normal((20, 40)) * 2]).astype(np.float32))  # |x| > 1 too
    approx, eps = pf.scores(x)
    exact = (x.double() @ W.double().T + b.double()) / pf.unit
    err = (exact - approx[:, :3000].double()).abs().amax(dim=1)
    assert bool((err <= eps).all()), float((err - eps).max())
    assert float(eps.median()) < 0.01 * float(exact.abs().max())  # and it is not vacuous


def test_biases_far_larger_than_the_weights_keep_the_float32_path() -> None:
    W, b = torch.full((5000, 8), 1e-3), torch.full((5000,), 50.0)
    with pytest.raises(ValueError, match="too large"):
        Int8Prefilter(W, b)


@pytest.mark.parametrize("n_items", [8000, 8003])
def test_int8_top_k_is_exact_and_proves_most_rows(n_items: int, same_top_k, compiled: bool) -> None:
    rec = _spread_model(n_items)
    hidden = _states(rec, 600)
    scorer = TopKScorer(rec, compiled=compiled)
    assert scorer.prefilter is not None
    assert (scorer.native is not None) is compiled
    same_top_k(rec, hidden, 20, *scorer.top_k(hidden, 20))
    assert scorer.rows_int8 > 0.9 * len(hidden), scorer.rows_int8


def test_the_compiled_path_takes_a_hidden_size_of_no_whole_vectors(same_top_k) -> None:
    if native.topk_kernel() is None:
        pytest.skip("the compiled top-K kernel cannot run here")
    rec = _spread_model(8003, hidden=100)  # 100 = 6 vectors of 16 and a partial one, like the bench's H
    hidden = _states(rec, 300, seed=13)
    scorer = TopKScorer(rec, compiled=True)
    same_top_k(rec, hidden, 20, *scorer.top_k(hidden, 20))
    assert scorer.rows_int8 > 0.9 * len(hidden), scorer.rows_int8


def test_int8_top_k_never_recommends_retired_items(same_top_k, compiled: bool) -> None:
    base = _spread_model(8000)
    hidden = _states(base, 300, seed=2)
    retired = sorted(set(base.top_k(hidden, 20)[0][:, :3].ravel().tolist()))
    rec = _spread_model(8000, retired=retired)
    scorer = TopKScorer(rec, compiled=compiled)
    same_top_k(rec, hidden, 20, *scorer.top_k(hidden, 20))  # no retired item among them
    assert scorer.rows_int8 > 0


def test_flat_scores_fall_back_to_float32_and_stop_trying(same_top_k, compiled: bool) -> None:
    n_items = 8000
    net = GRU4RecNet(n_items, GRU4RecParams(layers=(16,), seed=4))
    with torch.no_grad():  # nearly equal item vectors: scores closer together than the int8 error
        net.Wy.weight.copy_(0.3 + 1e-4 * torch.randn(net.Wy.weight.shape, generator=torch.Generator().manual_seed(4)))
        net.By.weight.zero_()
    rec = Recommender(net, Vocabulary(f"i{r}" for r in range(n_items)), version=1)
    hidden = _states(rec, 5000, seed=5)
    scorer = TopKScorer(rec, compiled=compiled)
    for part in (hidden[:4000], hidden[4000:], hidden[:100]):
        same_top_k(rec, part, 20, *scorer.top_k(part, 20))  # near-ties everywhere here
    assert scorer.rows_scored == 5100
    assert scorer.prefilter is None  # dropped after the probe rows: it proved (almost) nothing


def test_states_outside_the_gru_range_are_still_exact(same_top_k, compiled: bool) -> None:
    rec = _spread_model(8000)
    hidden = _states(rec, 64, seed=7)
    hidden[:8] *= 50.0  # far outside (-1, 1): a huge bound, nothing provable
    hidden[8:16] *= 1.5
    scorer = TopKScorer(rec, compiled=compiled)
    same_top_k(rec, hidden, 20, *scorer.top_k(hidden, 20))
    assert scorer.top_k(hidden[:0], 20)[0].shape == (0, 20)


def test_the_top_k_check_catches_wrong_answers(same_top_k) -> None:
    rec = _spread_model(3000)
    hidden = _states(rec, 8, seed=9)
    rows, scores = rec.top_k(hidden, 40)
    same_top_k(rec, hidden, 20, rows[:, :20], scores[:, :20])
    wrong = rows[:, :20].copy()
    wrong[3, 19] = rows[3, 35]  # a worse item in place of the 20th
    with pytest.raises(AssertionError, match="left out|reported scores"):
        same_top_k(rec, hidden, 20, wrong, scores[:, :20])
    with pytest.raises(AssertionError, match="descending"):
        same_top_k(rec, hidden, 20, rows[:, 19::-1], scores[:, 19::-1])


def test_threads_split_a_batch_and_give_the_same_answers(same_top_k, compiled: bool) -> None:
    rec = _spread_model(8000)
    hidden = _states(rec, 700, seed=11)
    one, two = TopKScorer(rec, threads=1, compiled=compiled), TopKScorer(rec, threads=2, compiled=compiled)
    for part in (hidden, hidden[:130], hidden[:5]):  # 3 chunks; split in two though under one chunk; too small
        same_top_k(rec, part, 20, *two.top_k(part, 20))
        same_top_k(rec, part, 20, *one.top_k(part, 20))
    assert two.rows_scored == one.rows_scored == 835
    assert min(two.rows_int8, one.rows_int8) > 0.9 * 835
    flat = TopKScorer(rec, int8=False, threads=2)
    same_top_k(rec, hidden, 20, *flat.top_k(hidden, 20))


def test_a_swapped_in_model_gets_its_scorer_before_it_is_served(same_top_k) -> None:
    """The holder's preparers run in the swapping thread before the new model is current, so the worker's
    batches (and its event loop) never build a scorer for a model that was swapped in."""
    old, new = _spread_model(8000, seed=3), _spread_model(8000, seed=4)
    holder, cache = ModelHolder(old), ScorerCache(threads=2)
    seen: list[tuple[Recommender, Recommender]] = []
    holder.on_prepare(lambda model: seen.append((model, holder.current)))
    holder.on_prepare(cache.prepare)
    first = cache.get(old)  # nobody prepared the first model: built on demand, then kept
    assert cache.get(old) is first
    holder.swap(new)
    assert seen == [(new, old)]  # prepared while the old model was still the one served
    prepared = cache._prepared[1]
    assert cache.get(new) is prepared and cache.get(new) is prepared and cache._prepared is None
    hidden = _states(new, 50, seed=5)
    same_top_k(new, hidden, 20, *cache.get(new).top_k(hidden, 20))
    assert cache.get(old) is not first  # a model that is no longer current is not kept
    small = ScorerCache(min_items=10_000)  # below the size bound: no scorer, prepared or built
    small.prepare(new)
    assert small.get(new) is None and small._prepared is None
