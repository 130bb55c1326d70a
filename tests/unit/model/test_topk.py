"""The int8 pre-filter of the worker's top-K: its error bound holds, and its answers are the float32 top-K."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from model.network import GRU4RecNet
from model.params import GRU4RecParams
from model.recommender import Recommender
from model.vocab import Vocabulary
from prometheus_client import generate_latest

from model import topk_calibration as calibration_module
from model import native
from model.topk_calibration import (Calibration, ScorerCache, calibrate, candidate_scorers, is_exact_top_k,
                                probe_states)
from stream.observe.metrics import Metrics
from stream.worker.model_holder import ModelHolder
from model.topk import PATHS, Int8Prefilter, TopKScorer
from stream.settings import Settings, SettingsError

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(params=[True, "avx2", False], ids=["compiled", "compiled-avx2", "torch"])
def compiled(request) -> bool | str:
    """Every int8 path: the compiled kernel at its best instruction set here, its AVX2 version (where this
    machine can build and run them), and torch's."""
    if request.param and native.topk_kernel("auto" if request.param is True else request.param) is None:
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
    assert native.topk_kernel().isa == "avx512_vnni"
    assert native.topk_kernel("avx2").isa == "avx2"  # every AVX-512 VNNI CPU has AVX2 and FMA too
    with pytest.raises(ValueError, match="unknown instruction set"):
        native.topk_kernel("neon")


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
    assert (scorer.native is not None) is bool(compiled)
    if compiled == "avx2":
        assert scorer.native.kernel.isa == "avx2"
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


# --- choosing the path: calibration on the served weights ---------------------------------------------

def test_every_path_gives_the_exact_top_k_on_the_same_states(same_top_k) -> None:
    rec = _spread_model(8003, hidden=100)
    scorers = candidate_scorers(rec, 20, threads=2)
    assert {"float32", "int8"} <= set(scorers) <= set(PATHS)
    assert ("compiled" in scorers) is (native.topk_kernel() is not None)
    for hidden in (probe_states(rec, 300, seed=1), _states(rec, 300, seed=2)):
        for name, scorer in scorers.items():
            assert scorer.path == name
            same_top_k(rec, hidden, 20, *scorer.top_k(hidden, 20))
            assert is_exact_top_k(scorer, hidden, 20, *scorer.top_k(hidden, 20)), name


def test_calibration_picks_a_path_that_can_run_and_resets_its_counts() -> None:
    rec = _spread_model(8000)
    scorer, calibration = calibrate(rec, 20, threads=2)
    assert calibration.path == scorer.path
    assert calibration.path in candidate_scorers(rec, 20)
    assert set(calibration.rows_per_s) == set(candidate_scorers(rec, 20))
    assert calibration.rows_per_s[calibration.path] == max(calibration.rows_per_s.values())
    assert calibration.rejected == () and not calibration.forced
    assert calibration.probe_rows > 0 and 0 < calibration.seconds < 60
    assert scorer.rows_scored == scorer.rows_int8 == 0


def _slowed(scorers: dict, slow: set[str], times: int = 100) -> dict:
    """The same scorers, those named in ``slow`` made ``times`` times slower (they repeat their work), so
    far that calibration drops them after their first small pass whatever else runs on the machine."""
    for name in slow:
        scorer, fast = scorers[name], scorers[name].top_k

        def top_k(hidden, k, fast=fast):
            for _ in range(times - 1):
                fast(hidden, k)
            return fast(hidden, k)
        scorer.top_k = top_k
    return scorers


@pytest.fixture(params=[1, 2], ids=["torch-1-thread", "torch-2-threads"])
def torch_threads(request):
    """Calibration times CPU time of its thread where torch computes in it alone (the worker), else wall time."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("slow", [{"float32"}, {"int8", "compiled"}, {"float32", "compiled"}],
                         ids=["float32-slow", "int8-slow", "only-torch-int8-fast"])
def test_calibration_keeps_the_fastest_path(monkeypatch, slow: set[str], torch_threads: int) -> None:
    assert calibration_module._cpu_clock() is (time.thread_time if torch_threads == 1 else time.perf_counter)
    rec = _spread_model(8000)
    real = candidate_scorers
    monkeypatch.setattr(calibration_module, "candidate_scorers", lambda *a, **kw: _slowed(real(*a, **kw), slow))
    available = set(real(rec, 20))
    scorer, calibration = calibrate(rec, 20)
    assert calibration.path in available - slow, calibration
    assert scorer.path == calibration.path


def test_calibration_refuses_a_path_that_gives_a_wrong_answer(monkeypatch, same_top_k) -> None:
    rec = _spread_model(8000)
    real = candidate_scorers

    def with_a_wrong_int8(*args, **kwargs):
        scorers = real(*args, **kwargs)
        scorers.pop("compiled", None)
        right = scorers["int8"].top_k

        def wrong(hidden, k):
            rows, values = right(hidden, k)
            rows[:, -1] = rows[:, 0]  # the best item twice, the k-th left out
            return rows, values
        scorers["int8"].top_k = wrong
        return _slowed(scorers, {"float32"})  # the wrong one is also the fastest

    monkeypatch.setattr(calibration_module, "candidate_scorers", with_a_wrong_int8)
    scorer, calibration = calibrate(rec, 20)
    assert calibration.path == "float32" and calibration.rejected == ("int8",)
    hidden = _states(rec, 50)
    same_top_k(rec, hidden, 20, *scorer.top_k(hidden, 20))


def test_a_forced_path_is_kept_where_it_can_run(caplog) -> None:
    rec = _spread_model(8000)
    scorer, calibration = calibrate(rec, 20, path="float32")
    assert scorer.path == calibration.path == "float32" and calibration.forced
    assert calibration.rows_per_s == {}
    with caplog.at_level("WARNING", logger="model.topk_calibration"):
        scorer, calibration = calibrate(rec, 20, compiled=False, path="compiled")
    assert not calibration.forced and calibration.path in ("float32", "int8")
    assert "cannot run here" in caplog.text


def test_a_large_k_leaves_only_the_float32_path() -> None:
    rec = _spread_model(8000)
    assert list(candidate_scorers(rec, 48)) == ["float32"]
    assert calibrate(rec, 60)[1].path == "float32"


def _saturating_int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """An int8 product as oneDNN computes it without VNNI: the signed inputs shifted to unsigned (+128),
    adjacent pairs of 8-bit products added in 16 bits with saturation, the shift taken off again."""
    u = a.long() + 128
    w = b.long()
    if u.shape[1] % 2:
        u, w = torch.nn.functional.pad(u, (0, 1)), torch.nn.functional.pad(w, (0, 0, 0, 1))
    pairs = u.view(u.shape[0], -1, 2).unsqueeze(3) * w.view(-1, 2, w.shape[1]).unsqueeze(0)
    saturated = pairs.sum(dim=2).clamp(-(1 << 15), (1 << 15) - 1).sum(dim=1)
    return (saturated - 128 * w.sum(dim=0)).to(torch.int32)


def test_an_int8_product_that_saturates_keeps_the_int8_path_off(monkeypatch, same_top_k) -> None:
    rec = _spread_model(8000, hidden=64)
    assert TopKScorer(rec, compiled=False).path == "int8"
    monkeypatch.setattr(torch, "_int_mm", _saturating_int_mm)
    scorer = TopKScorer(rec, compiled=False)
    assert scorer.path == "float32" and scorer.prefilter is None
    hidden = _states(rec, 100)
    same_top_k(rec, hidden, 20, *scorer.top_k(hidden, 20))
    assert "int8" not in candidate_scorers(rec, 20, compiled=False)
    # the compiled kernel computes its own products: it stays where it runs
    assert ("compiled" in candidate_scorers(rec, 20)) is (native.topk_kernel() is not None)
    assert "int8" not in candidate_scorers(rec, 20)


_AVX2_ONLY = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
_SATURATION_PROBE = """
import json, torch
from tests.unit.model.test_topk import _spread_model, _states
from tests.unit.conftest import check_top_k
from model.topk import TopKScorer
g = torch.Generator().manual_seed(0)
a = torch.randint(-127, 128, (32, 104), dtype=torch.int8, generator=g)
b = torch.randint(-127, 128, (104, 512), dtype=torch.int8, generator=g)
saturates = not torch.equal(torch._int_mm(a, b).long(), a.long() @ b.long())
rec = _spread_model(8000, hidden=100)
scorer = TopKScorer(rec, compiled=False)
hidden = _states(rec, 200)
check_top_k(rec, hidden, 20, *scorer.top_k(hidden, 20))
print(json.dumps({"saturates": saturates, "path": scorer.path}))
"""


@pytest.mark.skipif(not _cpu_has_vnni(), reason="emulates an AVX2-only machine on one with AVX-512 VNNI")
def test_on_an_emulated_avx2_machine_torch_int8_is_refused_where_it_saturates() -> None:
    """oneDNN limited to AVX2 computes torch's int8 product without VNNI, where it saturates: the int8
    path must not be used there, and the answers stay exact."""
    env = {**os.environ, **_AVX2_ONLY, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", _SATURATION_PROBE], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["saturates"], "oneDNN limited to AVX2 no longer saturates here: emulate differently"
    assert result["path"] == "float32"


def test_the_scorer_cache_reports_each_served_choice() -> None:
    old, new = _spread_model(8000, seed=3), _spread_model(8000, seed=4)
    metrics = Metrics.create()
    choices: list[Calibration] = []

    def on_choice(calibration: Calibration) -> None:
        choices.append(calibration)
        metrics.scorer.info({"path": calibration.path})

    holder = ModelHolder(old)
    cache = ScorerCache(threads=2, on_choice=on_choice, path="float32")
    holder.on_prepare(cache.prepare)
    cache.prepare(old, serve=True)  # start-up: calibrated and served at once
    assert len(choices) == 1 and cache.calibration is choices[0] and cache._prepared is None
    assert cache.get(old) is not None and len(choices) == 1  # served again: not reported again
    holder.swap(new)
    assert len(choices) == 1  # prepared, not yet served
    assert cache.get(new).path == "float32" and len(choices) == 2
    text = generate_latest(metrics.registry).decode()
    assert 'gruflow_scorer_info{path="float32"} 1.0' in text


def test_the_scorer_path_setting() -> None:
    assert Settings.from_env({}).scoring.scorer_path == "auto"
    assert Settings.from_env({"GRUFLOW_SCORER_PATH": "int8"}).scoring.scorer_path == "int8"
    with pytest.raises(SettingsError, match="GRUFLOW_SCORER_PATH"):
        Settings.from_env({"GRUFLOW_SCORER_PATH": "fastest"})
    with pytest.raises(SettingsError, match="GRUFLOW_COMPILED_TOPK"):
        Settings.from_env({"GRUFLOW_SCORER_PATH": "compiled", "GRUFLOW_COMPILED_TOPK": "false"})


def test_a_non_finite_weight_past_the_first_slice_of_items_is_refused() -> None:
    """The codes are built a slice of items at a time: a NaN in a later slice still refuses the int8 bound."""
    W, b = torch.ones((70_000, 4)), torch.zeros(70_000)
    W[69_999, 2] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        Int8Prefilter(W, b)
