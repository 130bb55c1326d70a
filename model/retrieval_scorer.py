"""Serving top-K from an ``ItemIndex``: the worker's approximate path, and the index of each model version.

``IndexedScorer`` has the interface of ``TopKScorer`` (``top_k(hidden, k)``, ``rows_scored``,
``rows_int8``, ``path``), so the processor and the worker treat it like any exact path. ``IndexKeeper``
makes the index of each model the worker is about to serve: a full build, or, where the new version has
the same hidden size and at least as many rows as the last one indexed, a copy of that index with only
the rows that changed re-indexed (a fine-tune round changes a small share of the rows), with a full build
every ``rebuild_every`` versions because incremental updates keep the old centroids.

Invariants:
- An ``IndexedScorer`` is only ever made for an index that ``matches`` its model (version, size and
  weight fingerprint): ``IndexedScorer.__init__`` refuses any other pair, so no code path can serve a
  model with another version's index.
- Rows the index could not fill (fewer than k live items) are ``NO_ROW``, the value the stream's
  processor drops from a recommendation; a retired row is never returned.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import faiss
import numpy as np

from model.retrieval import ItemIndex, RetrievalConfig, RetrievalMode, model_tables

log = logging.getLogger(__name__)

NO_ROW = -2  # a recommendation slot with no item (stream.processor's padding value)
_SPLIT_MIN_ROWS = 32  # fewer rows than this per thread are searched on one thread


def lists_for(n_items: int) -> int:
    """IVF lists for a catalogue: the power of two nearest 2 sqrt(N) (1,024 at 200k items, 2,048 at 1M)."""
    target = 2.0 * math.sqrt(max(1, n_items))
    return int(2 ** round(math.log2(target)))


@dataclass(frozen=True)
class RetrievalPolicy:
    """When and how the worker serves from an index (settings ``GRUFLOW_RETRIEVAL*``).

    ``mode``: ``exact`` never, ``approximate`` always, ``auto`` where calibration measured the exact path
    slower than ``target_events_per_s`` on the scoring threads, for catalogues of at least
    ``auto_min_items`` (below that the exact path is fast on any machine and an index buys little).
    ``nlist`` 0 picks ``lists_for(N)``."""

    mode: RetrievalMode = "auto"
    target_events_per_s: float = 10_000.0
    auto_min_items: int = 50_000
    nlist: int = 0
    nprobe: int = 16
    n_candidates: int = 100
    n_popular: int = 200
    build_threads: int = 2
    rebuild_every: int = 10

    def __post_init__(self) -> None:
        if self.mode not in ("exact", "approximate", "auto"):
            raise ValueError(f"unknown retrieval mode {self.mode!r}: use exact, approximate or auto")
        if self.target_events_per_s <= 0 or self.build_threads < 1 or self.rebuild_every < 1 or self.nlist < 0:
            raise ValueError("retrieval target rate, build threads and rebuild_every must be positive, "
                             "nlist 0 or more")

    def config(self, n_items: int) -> RetrievalConfig:
        return RetrievalConfig(kind="ivf_sq8", nlist=self.nlist or lists_for(n_items), nprobe=self.nprobe,
                               n_candidates=self.n_candidates, n_popular=self.n_popular)


class IndexedScorer:
    """Top-K of a model from its own index: candidates from faiss, true float32 scores (``ItemIndex``).

    ``threads`` > 1 searches the chunks of a batch on that many Python threads, each with one OpenMP
    thread (faiss releases the GIL; spinning OpenMP threads would take the CPU from the event loop)."""

    path = "approximate"

    def __init__(self, model, index: ItemIndex, *, threads: int = 1) -> None:
        if not index.matches(model):
            raise ValueError(f"the index of model version {index.version} does not match model version "
                             f"{getattr(model, 'version', '?')}: never served together")
        self.model = model
        self.index = index
        self.threads = max(1, int(threads))
        self.n = index.n_items
        self.rows_scored = 0
        self.rows_int8 = 0  # no int8 path here: kept for the worker's per-path counters
        self._pool: ThreadPoolExecutor | None = None

    def _search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        faiss.omp_set_num_threads(1)  # per calling thread (OpenMP keeps it per thread outside a region)
        return self.index.search(x, k)

    def top_k(self, hidden: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        m = hidden.shape[0]
        parts = max(1, min(self.threads, m // _SPLIT_MIN_ROWS))
        if parts == 1:
            rows, values = self._search(hidden, k)
        else:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="gruflow-retrieval")
            bounds = [m * i // parts for i in range(parts + 1)]
            done = list(self._pool.map(lambda i: self._search(hidden[bounds[i]:bounds[i + 1]], k), range(parts)))
            rows = np.vstack([r for r, _ in done])
            values = np.vstack([v for _, v in done])
        missing = rows < 0
        if missing.any():
            rows[missing] = NO_ROW
            values[missing] = 0.0
        self.rows_scored += m
        return rows, values


def changed_rows(old: ItemIndex, W: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Rows of ``W``/``b`` (at least as many as ``old`` indexes) whose weights differ from ``old``'s."""
    n = old.n_items
    differ = (W[:n] != old.W).any(axis=1) | (b[:n] != old.b)
    return np.flatnonzero(differ).astype(np.int64)


class IndexKeeper:
    """Makes the index of each model to serve; remembers the last one for incremental updates."""

    def __init__(self, policy: RetrievalPolicy) -> None:
        self.policy = policy
        self._last: ItemIndex | None = None
        self._updates = 0  # incremental updates since the last full build
        self._lock = threading.Lock()

    def index_for(self, model) -> ItemIndex:
        """The index of ``model``: updated from the last one where it can be, else built in full."""
        t0 = time.perf_counter()
        W, b, retired, version = model_tables(model)
        with self._lock:
            last, updates = self._last, self._updates
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(self.policy.build_threads)
        try:
            incremental = (last is not None and updates + 1 < self.policy.rebuild_every
                           and W.shape[1] == last.W.shape[1] and W.shape[0] >= last.n_items)
            if incremental:
                rows = changed_rows(last, W, b)
                index, how = last.updated(rows, W, b, retired, version), f"{len(rows):,} changed rows re-indexed"
            else:
                index, how = ItemIndex.build(W, b, retired, version, self.policy.config(W.shape[0])), "full build"
        finally:
            faiss.omp_set_num_threads(threads)
        with self._lock:
            self._last, self._updates = index, (updates + 1 if incremental else 0)
        log.info("retrieval index for model version %s (%d items, %d lists): %s in %.2f s", version,
                 W.shape[0], index.config.nlist, how, time.perf_counter() - t0)
        return index
