"""Which top-K path scores on this machine: measured, not assumed.

``model.topk`` has three exact paths (float32; int8 through torch; the compiled int8 kernel). Which one
is fastest depends on the CPU, not only on the model: torch's int8 product is a fast kernel on some machines,
a slow reference loop on others (where float32 wins by an order of magnitude), and inexact on others (where
the int8 path is refused). So ``calibrate`` times every path that can run here on the served weights and
keeps the fastest one whose answers it has checked against exact scores; ``ScorerCache`` does so for every
model the worker serves (docs/scoring.md).
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from model.recommender import Recommender
from model.retrieval import use_approximate
from model.retrieval_scorer import IndexedScorer, IndexKeeper, RetrievalPolicy
from model.topk import _CANDIDATE_BLOCKS, PATHS, ScorerPath, TopKScorer, int8_product_is_exact
from model.topk_tiers import MIN_ITEMS, NormTiers, TieredTopK

log = logging.getLogger(__name__)

ExactScorer = TopKScorer | TieredTopK
Scorer = ExactScorer | IndexedScorer  # what the worker scores with: an exact path, or a model's index

_CALIBRATION_SCORES = 6_000_000  # item scores per timed pass of a path (rows = this / items): short
_CALIBRATION_ROWS = (64, 2048)  # but at least a chunk's worth of rows, at most a full batch
_CALIBRATION_PASSES = 3  # timed passes per path; the best one counts (the machine may be busy)
_CALIBRATION_BUDGET_S = 1.0  # no further passes once this much was spent timing
_CALIBRATION_DROP = 4.0  # a path this many times slower than the best after a pass is not timed again
_CALIBRATION_CHECK_ROWS = 64  # rows whose answers are checked against float64 scores, per path
_CHECK_ITEMS = 65_536  # items whose float64 scores the check computes at a time
_TIER_STATES = 256  # sample states that size the head of a tiered catalogue (model.topk_tiers)


@dataclass(frozen=True)
class Calibration:
    """What ``calibrate`` found: the path kept; rows/s of one thread for each path whose answers were exact
    (its best timed pass, or its first small pass where that was already far behind, so it was not timed);
    the paths refused for a wrong answer; whether the path was forced by a setting."""

    path: str  # a ScorerPath, or "approximate" (model.retrieval_scorer)
    rows_per_s: Mapping[str, float]
    probe_rows: int = 0
    rejected: tuple[str, ...] = ()
    forced: bool = False
    seconds: float = 0.0


def candidate_scorers(model: Recommender, k: int, *, threads: int = 1, compiled: bool | str = True
                      ) -> dict[ScorerPath, ExactScorer]:
    """One scorer per path that can run here for ``model`` and ``k``: float32 always; int8 where the
    weights allow its bound and k is small enough for its candidates; compiled where the kernel runs too.
    In a large catalogue whose rows mostly cannot reach the top-K (``model.topk_tiers``), each path scores
    only the rows that can, and the others are proven out by their norms."""
    tiers, W, b, retired = _norm_tiers(model, k)
    rows = tiers.head if tiers is not None else None
    scorers = _path_scorers(model, k, threads, compiled, rows)
    if tiers is None:
        return scorers  # type: ignore[return-value]
    return {name: TieredTopK(scorer, tiers, W, b, retired) for name, scorer in scorers.items()}


def _norm_tiers(model: Recommender, k: int) -> tuple[NormTiers | None, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The head/tier split of ``model``'s catalogue (None where it does not pay), with the full tables."""
    with torch.no_grad():
        W = model.net.Wy.weight.detach().float()
        b = model.net.By.weight.detach().float().reshape(-1)
    retired = getattr(model, "_retired", None)
    retired_rows = np.asarray(retired, dtype=np.int64) if retired is not None and len(retired) else None
    tiers = None
    if model.n_items >= MIN_ITEMS and k < _CANDIDATE_BLOCKS:
        tiers = NormTiers.build(W, b, retired_rows, probe_states(model, _TIER_STATES, seed=1), k)
    return tiers, W, b, None if retired_rows is None else torch.from_numpy(retired_rows)


def _path_scorers(model: Recommender, k: int, threads: int, compiled: bool | str,
                  rows: np.ndarray | None) -> dict[ScorerPath, TopKScorer]:
    if min(k, model.n_items) >= _CANDIDATE_BLOCKS:  # top_k would answer every row in float32 anyway
        return {"float32": TopKScorer(model, int8=False, threads=threads, rows=rows)}
    full = TopKScorer(model, threads=threads, compiled=compiled, rows=rows)
    # the paths share the read-only weights (a 1M-item catalogue's transposed copy alone is 400 MB); each
    # scorer has its own counters
    plain = copy.copy(full)
    plain.prefilter = plain.native = None
    scorers: dict[ScorerPath, TopKScorer] = {"float32": plain}
    if full.prefilter is None:
        return scorers
    if full.native is not None:
        scorers["compiled"] = full
        if int8_product_is_exact(full.prefilter):
            torch_int8 = copy.copy(full)  # shares the read-only weights and codes; its own counters
            torch_int8.native = None
            scorers["int8"] = torch_int8
    else:
        scorers["int8"] = full
    return dict(sorted(scorers.items(), key=lambda item: PATHS.index(item[0])))


def probe_states(model: Recommender, rows: int, *, steps: int = 3, seed: int = 0) -> np.ndarray:
    """Hidden states from the model's own GRU steps over items drawn by popularity: what the worker scores.
    Random vectors would misstate the int8 paths, whose speed depends on the spread of real scores."""
    rng = np.random.default_rng(seed)
    pop = np.asarray(model.popularity, dtype=np.float64) if model.popularity is not None else None
    p = pop / pop.sum() if pop is not None and len(pop) == model.n_items and pop.sum() > 0 else None
    hidden = model.zero_state(rows)
    clicks = np.zeros(rows, dtype=np.int64)
    for _ in range(steps):
        hidden = model.step(hidden, rng.choice(model.n_items, size=rows, p=p), clicks)
    return hidden


def is_exact_top_k(scorer: ExactScorer, hidden: np.ndarray, k: int, rows: np.ndarray, values: np.ndarray) -> bool:
    """Whether ``rows``/``values`` are a top-k of float64 scores of ``hidden``, up to float32 rounding: no item
    twice, no retired item, the values true, in descending order, and no better item left out."""
    k = min(k, scorer.n)
    x = torch.from_numpy(np.ascontiguousarray(hidden[:, -scorer.top_width:], dtype=np.float32)).double()
    # the float64 weights a slice of items at a time: a whole 1M-item copy would be 800 MB
    parts, magnitude = [], torch.zeros(len(x), dtype=torch.float64)
    for i in range(0, scorer.n, _CHECK_ITEMS):
        W = scorer.W[i:i + _CHECK_ITEMS].double()
        parts.append(torch.addmm(scorer.b[i:i + _CHECK_ITEMS].double(), x, W.T))
        magnitude = torch.maximum(magnitude, (x.abs() @ W.abs().T).amax(dim=1))
    exact = torch.cat(parts, dim=1)
    del parts
    if scorer.retired is not None:
        exact[:, scorer.retired] = -torch.inf
    # float32 rounding of a dot product: a few ulps of the sum of the magnitudes of its terms
    tol = (64 * float(np.finfo(np.float32).eps) * (magnitude + scorer.b.double().abs().max())).unsqueeze(1)
    r = torch.from_numpy(np.asarray(rows, dtype=np.int64))
    v = torch.from_numpy(np.asarray(values, dtype=np.float64))
    if r.shape != (len(hidden), k) or v.shape != r.shape:
        return False
    true = exact.gather(1, r)
    kth = torch.topk(exact, k, dim=1).values[:, -1:]
    distinct = bool((r.sort(dim=1).values.diff(dim=1) != 0).all())
    valid = bool((torch.isfinite(true) | torch.isinf(kth)).all())  # retired only where nothing else is left
    close = bool((((v - true).abs() <= tol) | (v == true)).all())
    descending = bool((true.diff(dim=1) <= tol).all())
    complete = bool((true.amin(dim=1, keepdim=True) >= kth - tol).all())
    return distinct and valid and close and descending and complete


def _probe_size(n_items: int) -> int:
    low, high = _CALIBRATION_ROWS
    return max(low, min(high, _CALIBRATION_SCORES // max(1, n_items)))


def _cpu_clock() -> Callable[[], float]:
    """The clock that calibration times with: CPU time of the calling thread where torch computes in that
    thread alone (the worker's setting), so that other processes of a busy machine, which take turns on
    the CPUs, and the worker's other threads do not skew the comparison; else wall time."""
    return time.thread_time if torch.get_num_threads() == 1 else time.perf_counter


def calibrate(model: Recommender, k: int, *, threads: int = 1, compiled: bool | str = True,
              path: ScorerPath | Literal["auto"] = "auto") -> tuple[ExactScorer, Calibration]:
    """The scorer of the fastest exact path for ``model`` on this machine, and what was measured.

    Each path first answers a few probe states, checked against float64 scores (a path that errs is
    refused and logged) and timed twice on a few more; then the paths are timed in turns on the same
    probe states, and each path's best pass counts. A path far behind the best is not timed again, and
    no pass starts once the timing budget is spent: the slowest path is the one that costs time. Paths
    are timed on one thread (each of the ``threads`` does the same work per row), the kept one scores on
    ``threads``. ``path`` other than "auto" keeps that path without timing where it can run (else the
    others are calibrated)."""
    t0 = time.perf_counter()
    scorers = candidate_scorers(model, k, threads=1, compiled=compiled)
    if path != "auto" and path in scorers:
        scorers[path].threads = max(1, int(threads))
        return scorers[path], Calibration(path, {}, forced=True, seconds=time.perf_counter() - t0)
    if path != "auto":
        log.warning("top-K path %r cannot run here (paths available: %s); choosing among those", path,
                    ", ".join(scorers))
    m = _probe_size(model.n_items)
    hidden = probe_states(model, m)
    check, first = hidden[:_CALIBRATION_CHECK_ROWS // 2], hidden[_CALIBRATION_CHECK_ROWS // 2:_CALIBRATION_CHECK_ROWS]
    clock = _cpu_clock()
    rejected = []
    warm: dict[str, float] = {}  # rows/s of a small pass once warm: only to drop a far slower path early
    for name, scorer in list(scorers.items()):
        if not is_exact_top_k(scorer, check, k, *scorer.top_k(check, k)) and name != "float32":
            log.error("the %s top-K path gave a wrong answer on the probe states; it is not used", name)
            rejected.append(name)
            del scorers[name]
            continue
        for _ in range(2):  # the better of two: one small pass can be caught by a busy moment
            t = clock()
            scorer.top_k(first, k)
            warm[name] = max(warm.get(name, 0.0), len(first) / max(clock() - t, 1e-9))
    best: dict[str, float] = {}  # rows/s of the best timed pass
    spent = 0.0
    for _ in range(_CALIBRATION_PASSES):
        for name, scorer in scorers.items():
            rates = best if name in best else warm  # compare like with like
            if rates[name] * _CALIBRATION_DROP < max(rates.values()):
                continue
            t = clock()
            scorer.top_k(hidden, k)
            rate = m / max(clock() - t, 1e-9)
            spent += m / rate
            best[name] = max(best.get(name, 0.0), rate)
        if spent > _CALIBRATION_BUDGET_S:
            break
    chosen: ScorerPath = max(best, key=best.__getitem__)  # type: ignore[assignment]
    scorer = scorers[chosen]
    scorer.threads = max(1, int(threads))
    scorer.rows_scored = scorer.rows_int8 = 0  # the probe is not the worker's traffic
    result = Calibration(chosen, {name: round(best.get(name, rate), 1) for name, rate in warm.items()}, probe_rows=m,
                         rejected=tuple(rejected), seconds=time.perf_counter() - t0)
    log.info("top-K path for model version %s (%d items, k=%d): %s; rows/s of one thread on %d probe states: %s "
             "(%.2f s)", getattr(model, "version", "?"), model.n_items, k, chosen, m,
             ", ".join(f"{name} {rate:,.0f}" for name, rate in result.rows_per_s.items()), result.seconds)
    return scorer, result


class ScorerCache:
    """The scorer of the model served. ``prepare`` calibrates a new model's scorer in the thread that swaps it
    in (``ModelHolder.on_prepare``), so the worker's event loop and its batches never wait for one; ``get``
    builds one itself only for a model nobody prepared (the first one), in the caller's thread (the
    worker's compute thread). Models of fewer than ``min_items`` items get no scorer (``get`` returns None):
    their plain top-K is as fast. ``on_choice`` hears each calibration once its scorer is the one served.
    ``retrieval`` decides where the scorer is the model's index instead (``IndexedScorer``), made in the same
    thread before the swap; an index is served only with the model it was built from (``_pairs``)."""

    def __init__(self, threads: int = 1, min_items: int = 0, compiled: bool | str = True, *, k: int = 20,
                 path: ScorerPath | Literal["auto"] = "auto",
                 on_choice: Callable[[Calibration], None] | None = None,
                 retrieval: RetrievalPolicy | None = None) -> None:
        self.retrieval = retrieval or RetrievalPolicy(mode="exact")
        self._keeper = IndexKeeper(self.retrieval)
        self.threads = threads
        self.min_items = min_items
        self.compiled = compiled
        self.k = k
        self.path = path
        self.on_choice = on_choice
        self.calibration: Calibration | None = None  # of the scorer served
        self._lock = threading.Lock()
        self._model: Recommender | None = None
        self._scorer: Scorer | None = None
        self._prepared: tuple[Recommender, Scorer, Calibration] | None = None

    def _calibrate(self, model: Recommender) -> tuple[Scorer, Calibration]:
        """The exact path calibration keeps, or, where the retrieval policy says so, the model's index:
        ``auto`` serves from the index where the exact path's rate on the scoring threads is below the
        target."""
        mode = self.retrieval.mode
        if mode == "approximate":
            return self._indexed(model, {})
        scorer, calibration = calibrate(model, self.k, threads=self.threads, compiled=self.compiled, path=self.path)
        exact_rate = calibration.rows_per_s.get(calibration.path, float("inf")) * max(1, int(self.threads))
        if (mode == "auto" and model.n_items >= self.retrieval.auto_min_items
                and use_approximate(mode, exact_rate, self.retrieval.target_events_per_s)):
            log.info("exact top-K at about %s rows/s is below the target %s events/s: serving from an index",
                     f"{exact_rate:,.0f}", f"{self.retrieval.target_events_per_s:,.0f}")
            return self._indexed(model, dict(calibration.rows_per_s))
        return scorer, calibration

    def _indexed(self, model: Recommender, rates: dict[str, float]) -> tuple[IndexedScorer, Calibration]:
        """The model's own index (built, or updated from the last one) and its measured rate."""
        t0 = time.perf_counter()
        scorer = IndexedScorer(model, self._keeper.index_for(model), threads=self.threads)
        probe = probe_states(model, _CALIBRATION_ROWS[0] * 4)
        clock = time.perf_counter  # wall time: the search runs on the scorer's own threads, not this one
        t = clock()
        scorer.top_k(probe, self.k)
        rates["approximate"] = round(len(probe) / max(clock() - t, 1e-9) / max(1, scorer.threads), 1)
        scorer.rows_scored = 0
        return scorer, Calibration("approximate", rates, probe_rows=len(probe), seconds=time.perf_counter() - t0)

    def prepare(self, model: Recommender, *, serve: bool = False) -> None:
        """Calibrates ``model``'s scorer for when it is served; ``serve``: it already is (start-up)."""
        if model.n_items < self.min_items:
            return
        scorer, calibration = self._calibrate(model)
        with self._lock:
            self._prepared = (model, scorer, calibration)
        if serve:
            self.get(model)

    def get(self, model: Recommender) -> Scorer | None:
        """The scorer of ``model``, the model being served: prepared, kept, or calibrated now."""
        if model.n_items < self.min_items:
            return None
        with self._lock:
            if self._model is model and self._scorer is not None:
                return self._scorer
            scorer = None
            if self._prepared is not None and self._prepared[0] is model:
                if _pairs(self._prepared[1], model):
                    self._model, self._scorer, calibration = self._prepared
                    scorer = self._scorer
                self._prepared = None
        if scorer is None:
            scorer, calibration = self._calibrate(model)
            with self._lock:
                self._model, self._scorer = model, scorer
        self.calibration = calibration
        if self.on_choice is not None:
            self.on_choice(calibration)
        return scorer


def _pairs(scorer: Scorer, model: Recommender) -> bool:
    """Whether ``scorer`` may serve ``model``: an index only if it was built from these very weights (the
    version and fingerprint are checked again at the swap: a model changed in place fails)."""
    if not isinstance(scorer, IndexedScorer):
        return True
    if scorer.model is model and scorer.index.matches(model):
        return True
    log.error("the prepared index (model version %s) does not match model version %s: building its own",
              scorer.index.version, getattr(model, "version", "?"))
    return False
