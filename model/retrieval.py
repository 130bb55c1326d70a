"""Approximate top-K retrieval over a large catalogue, with exact float32 re-scoring of the candidates.

An item's score for a hidden state ``h`` is ``h . W[i] + b[i]``. Appending the bias as one more
dimension turns that into a pure inner product, ``[h, 1] . [W[i], b[i]]``, so a maximum-inner-product
(MIPS) index from faiss (``METRIC_INNER_PRODUCT``: IVF with flat or 8-bit scalar-quantised lists, or
HNSW) proposes ``n_candidates`` rows per query. The ``n_popular`` rows of largest bias are kept out of
that index and are candidates for every query: a trained model's biases carry popularity, so its most
popular items compete for almost every state, yet they are spread over the whole space and an index
partitioned by direction misses them. Those candidates are then scored again from the float32
weights themselves, so every reported score is the model's true score and the order is the true order
among the candidates; only recall (whether the true top-K was among the candidates) is approximate.

Invariants:
- Retired rows are never in the faiss index, and excluded rows are masked after re-scoring: neither is
  ever returned.
- An index belongs to one model version: ``matches(model)`` checks the version, the catalogue size and a
  fingerprint of the weights, so a worker can refuse to pair a model with another version's index.
- An ``ItemIndex`` is immutable once built: ``updated`` returns a new index for the new version and
  leaves the old one serving the old model until the swap.
- Every live row is either in the faiss index or among the popular rows, never both (no duplicates).
- Exhaustive search is exact: with ``nprobe == nlist`` on an IVF index every indexed row is visited; the
  candidates are then a top-``n_candidates`` by the index's scores (float32 for ``ivf_flat``, 8-bit
  for ``ivf_sq8``), so with ``ivf_flat``, or with ``n_candidates`` at least the catalogue size, the
  answer is the exact top-K up to float32 rounding.

faiss parallelises a batch over OpenMP threads, process-wide (``faiss.omp_set_num_threads``); this
module never changes that setting, its caller does.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Literal, Sequence

import faiss
import numpy as np
import torch

IndexKind = Literal["ivf_flat", "ivf_sq8", "hnsw"]
RetrievalMode = Literal["exact", "approximate", "auto"]

_FINGERPRINT_ROWS = 1024  # rows (evenly spaced) hashed into an index's weight fingerprint
_TRAIN_PER_LIST = 40  # k-means training points per inverted list (faiss warns below 39)
_SIMD_WIDTH = 16  # vectors are zero-padded to a multiple of this: faiss's SIMD scalar-quantiser
# kernels need it (with 101 dimensions IVF-SQ8 ran several times slower than with 112)
_KMEANS_ITERATIONS = 10  # faiss's default is 25; the lists only need to be roughly balanced
_TRAIN_SEED = 1234


@dataclass(frozen=True)
class RetrievalConfig:
    """How the candidate index is built and searched.

    ``nlist``/``nprobe`` apply to the IVF kinds (``nprobe == nlist`` visits every list: exhaustive),
    ``hnsw_m``/``ef_construction``/``ef_search`` to HNSW. ``n_candidates`` rows per query from the index
    (at least ``k``) plus the ``n_popular`` rows of largest bias are re-scored exactly. ``n_popular`` is
    fixed at build time. The defaults suit catalogues of about a million items (docs/retrieval.md);
    ``nlist`` near 2-4 sqrt(N) and ``nprobe`` are to be chosen per catalogue by the benchmark."""

    kind: IndexKind = "ivf_sq8"
    nlist: int = 2048
    nprobe: int = 16
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 64
    n_candidates: int = 100
    n_popular: int = 200

    def __post_init__(self) -> None:
        if self.kind not in ("ivf_flat", "ivf_sq8", "hnsw"):
            raise ValueError(f"unknown index kind {self.kind!r}: use ivf_flat, ivf_sq8 or hnsw")
        for name in ("nlist", "nprobe", "hnsw_m", "ef_construction", "ef_search", "n_candidates"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if int(self.n_popular) < 0:
            raise ValueError(f"n_popular must not be negative, got {self.n_popular}")

    def exhaustive(self) -> RetrievalConfig:
        """The same index searched over every list (IVF kinds): the exact answer, slowly."""
        return replace(self, nprobe=self.nlist)


def use_approximate(mode: RetrievalMode, exact_events_per_s: float, target_events_per_s: float) -> bool:
    """Whether to serve from the index: ``auto`` keeps exact scoring where calibration measured it
    fast enough for the target rate (exact answers cost nothing in recall)."""
    if mode == "exact":
        return False
    if mode == "approximate":
        return True
    if mode == "auto":
        return exact_events_per_s < target_events_per_s
    raise ValueError(f"unknown retrieval mode {mode!r}: use exact, approximate or auto")


def weight_fingerprint(W: np.ndarray, b: np.ndarray) -> str:
    """A cheap digest of the item weights: shape plus evenly spaced rows (a full hash of a 1M x 100
    table would cost about a second per model swap). Two versions differ in it unless a fine-tune
    touched none of the sampled rows, which is why ``matches`` also compares the version."""
    n = W.shape[0]
    pick = np.unique(np.linspace(0, max(n - 1, 0), num=min(n, _FINGERPRINT_ROWS)).astype(np.int64))
    h = hashlib.blake2b(digest_size=16)
    h.update(np.asarray(W.shape, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(W[pick], dtype=np.float32).tobytes())
    h.update(np.ascontiguousarray(b[pick], dtype=np.float32).tobytes())
    return h.hexdigest()


def model_tables(model) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(W [N, H] float32, b [N] float32, retired rows, version) of a ``Recommender``."""
    net = model.net
    with torch.no_grad():
        W = net.Wy.weight.detach().float().contiguous().numpy()
        b = net.By.weight.detach().float().reshape(-1).contiguous().numpy()
    retired = np.asarray(model.metadata.get("retired_rows", ()) or (), dtype=np.int64)
    return W, b, retired, int(model.version)


def _width(hidden: int) -> int:
    """Index dimension: the hidden size, one bias column, zero padding to the SIMD width."""
    return -(-(hidden + 1) // _SIMD_WIDTH) * _SIMD_WIDTH


def _augmented(W: np.ndarray, b: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Item vectors ``[W[i], b[i], 0...]`` of ``rows``: inner product with ``[h, 1, 0...]`` is the score."""
    h = W.shape[1]
    out = np.zeros((len(rows), _width(h)), dtype=np.float32)
    out[:, :h] = W[rows]
    out[:, h] = b[rows]
    return out


def _queries(x: np.ndarray) -> np.ndarray:
    out = np.zeros((x.shape[0], _width(x.shape[1])), dtype=np.float32)
    out[:, :x.shape[1]] = x
    out[:, x.shape[1]] = 1.0
    return out


def _new_faiss_index(config: RetrievalConfig, dim: int, n_live: int) -> faiss.Index:
    if config.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = config.ef_construction
        return faiss.IndexIDMap(index)
    nlist = max(1, min(config.nlist, n_live))
    quantizer = faiss.IndexFlatIP(dim)
    if config.kind == "ivf_flat":
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    else:
        index = faiss.IndexIVFScalarQuantizer(quantizer, dim, nlist, faiss.ScalarQuantizer.QT_8bit,
                                              faiss.METRIC_INNER_PRODUCT)
    index.cp.niter = _KMEANS_ITERATIONS
    index.cp.seed = _TRAIN_SEED
    return index


def _train_sample(vectors: np.ndarray, nlist: int) -> np.ndarray:
    n = vectors.shape[0]
    want = nlist * _TRAIN_PER_LIST
    if n <= want:
        return vectors
    pick = np.sort(np.random.default_rng(_TRAIN_SEED).choice(n, size=want, replace=False))
    return vectors[pick]


def _split_live(b: np.ndarray, retired: np.ndarray, n_popular: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows for the faiss index, popular rows): the live rows, the ``n_popular`` of largest bias apart."""
    live = np.setdiff1d(np.arange(b.shape[0], dtype=np.int64), retired, assume_unique=True)
    if n_popular >= len(live):
        return live[:0], live
    top = live[np.argpartition(-b[live], n_popular - 1)[:n_popular]] if n_popular else live[:0]
    return np.setdiff1d(live, top, assume_unique=True), np.sort(top)


def _with_ids(index: faiss.Index, vectors: np.ndarray, ids: np.ndarray) -> None:
    if len(ids):
        index.add_with_ids(vectors, np.ascontiguousarray(ids, dtype=np.int64))


class ItemIndex:
    """Candidate index of one model version plus the float32 tables that re-score the candidates."""

    def __init__(self, index: faiss.Index, W: np.ndarray, b: np.ndarray, retired: np.ndarray,
                 popular: np.ndarray, version: int, config: RetrievalConfig) -> None:
        self._index = index
        self.popular = popular
        self.W = W
        self.b = b
        self.retired = retired
        self.version = version
        self.config = config
        self.fingerprint = weight_fingerprint(W, b)
        self._Wt = torch.from_numpy(W)
        self._bt = torch.from_numpy(b)

    @classmethod
    def build(cls, W: np.ndarray, b: np.ndarray, retired: Sequence[int] | np.ndarray | None, version: int,
              config: RetrievalConfig | None = None) -> ItemIndex:
        """Index every row of ``W``/``b`` except the retired ones (IVF: k-means on a sample first)."""
        config = config or RetrievalConfig()
        W, b = _checked_tables(W, b)
        retired_rows = _retired_rows(retired, W.shape[0])
        indexed, popular = _split_live(b, retired_rows, config.n_popular)
        if len(indexed) + len(popular) == 0:
            raise ValueError("every item is retired: nothing to index")
        vectors = _augmented(W, b, indexed)
        index = _new_faiss_index(config, _width(W.shape[1]), len(indexed))
        if not index.is_trained and len(indexed):
            index.train(_train_sample(vectors, index.nlist))
        _with_ids(index, vectors, indexed)
        return cls(index, W, b, retired_rows, popular, int(version), config)

    @classmethod
    def for_model(cls, model, config: RetrievalConfig | None = None) -> ItemIndex:
        """The index of a ``Recommender`` (its output weights, biases, retired rows and version)."""
        W, b, retired, version = model_tables(model)
        return cls.build(W, b, retired, version, config)

    @property
    def n_items(self) -> int:
        return self.W.shape[0]

    @property
    def n_indexed(self) -> int:
        return int(self._index.ntotal)

    @property
    def n_live(self) -> int:
        """Rows that can be returned: indexed plus popular (every row that is not retired)."""
        return self.n_indexed + len(self.popular)

    @property
    def supports_update(self) -> bool:
        """IVF lists can drop and re-add rows; an HNSW graph cannot remove a node, so it is rebuilt."""
        return self.config.kind != "hnsw"

    def index_bytes(self) -> int:
        """Size of the serialised faiss index (the float32 re-scoring tables are the model's own)."""
        return int(faiss.serialize_index(self._index).nbytes)

    def matches(self, model) -> bool:
        """True only for the model version this index was built from (version, size and weights)."""
        W, b, _, version = model_tables(model)
        return (version == self.version and W.shape == self.W.shape
                and weight_fingerprint(W, b) == self.fingerprint)

    def search(self, hidden: np.ndarray, k: int,
               exclude: Sequence[np.ndarray | Sequence[int] | None] | None = None,
               config: RetrievalConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` rows and their true scores, descending, for each of B hidden states.

        ``hidden`` is [B, H] or the whole state [B, >= H] (the top layer is its last H columns). Rows
        are -1 (score -inf) where fewer than ``k`` live candidates were found. ``config`` overrides the
        search-time settings (``nprobe``, ``ef_search``, ``n_candidates``) for this call."""
        cfg = config or self.config
        h = self.W.shape[1]
        x = np.ascontiguousarray(np.asarray(hidden, dtype=np.float32)[:, -h:])
        m = x.shape[0]
        k = max(0, min(int(k), self.n_items))
        extra = max((len(e) for e in exclude if e is not None), default=0) if exclude is not None else 0
        n_fetch = min(max(cfg.n_candidates, k) + extra, self.n_indexed)
        cand = np.broadcast_to(self.popular, (m, len(self.popular)))
        if n_fetch > 0:
            _, found = self._index.search(_queries(x), n_fetch, params=self._search_params(cfg))
            cand = np.hstack([found, cand])
        return self._rescore(x, np.ascontiguousarray(cand), k, exclude)

    def _search_params(self, cfg: RetrievalConfig) -> faiss.SearchParameters:
        if self.config.kind == "hnsw":
            return faiss.SearchParametersHNSW(efSearch=max(cfg.ef_search, cfg.n_candidates))
        return faiss.SearchParametersIVF(nprobe=min(cfg.nprobe, self._index.nlist))

    def _rescore(self, x: np.ndarray, cand: np.ndarray, k: int,
                 exclude: Sequence[np.ndarray | Sequence[int] | None] | None) -> tuple[np.ndarray, np.ndarray]:
        """Exact float32 scores of the candidates; missing (-1) and excluded ones masked to -inf."""
        m, c = cand.shape
        missing = cand < 0
        safe = torch.from_numpy(np.where(missing, 0, cand))
        with torch.inference_mode():
            w = self._Wt.index_select(0, safe.reshape(-1)).view(m, c, -1)
            exact = torch.baddbmm(self._bt[safe].unsqueeze(2), w, torch.from_numpy(x).unsqueeze(2)).squeeze(2)
            exact[torch.from_numpy(missing)] = -torch.inf
            if exclude is not None:
                for i, rows in enumerate(exclude):
                    if rows is not None and len(rows):
                        hit = np.isin(cand[i], np.asarray(rows, dtype=np.int64))
                        exact[i, torch.from_numpy(hit)] = -torch.inf
            kk = min(k, c)
            values, pick = torch.topk(exact, kk, dim=1, sorted=True)
        rows = np.take_along_axis(cand, pick.numpy(), axis=1)
        values = values.numpy().astype(np.float32)
        rows[~np.isfinite(values)] = -1
        if kk < k:
            rows = np.hstack([rows, np.full((m, k - kk), -1, dtype=np.int64)])
            values = np.hstack([values, np.full((m, k - kk), -np.inf, dtype=np.float32)])
        return rows.astype(np.int64), values

    def updated(self, rows: Sequence[int] | np.ndarray, W: np.ndarray, b: np.ndarray,
                retired: Sequence[int] | np.ndarray | None, version: int) -> ItemIndex:
        """The index of the next version whose tables differ from this one's only in ``rows`` (plus any
        rows added at the end, and rows whose retirement changed): a copy with just those rows re-indexed.

        IVF lists keep their trained centroids (and ``ivf_sq8`` its value ranges), so after many rounds a
        full ``build`` gives better recall; HNSW cannot remove a node and is rebuilt in full."""
        W, b = _checked_tables(W, b)
        if W.shape[0] < self.n_items or W.shape[1] != self.W.shape[1]:
            raise ValueError(f"tables of shape {W.shape} cannot follow an index over {self.W.shape}")
        if not self.supports_update:
            return ItemIndex.build(W, b, retired, version, self.config)
        n = W.shape[0]
        new_retired = _retired_rows(retired, n)
        changed = np.union1d(np.asarray(rows, dtype=np.int64), np.arange(self.n_items, n, dtype=np.int64))
        if len(changed) and (changed.min() < 0 or changed.max() >= n):
            raise ValueError(f"changed rows must lie in [0, {n})")
        _, popular = _split_live(b, new_retired, self.config.n_popular)
        # rows whose place changed (retired, popular or indexed) are re-placed with the changed ones
        changed = np.union1d(changed, np.setxor1d(self.retired, new_retired))
        changed = np.union1d(changed, np.setxor1d(self.popular, popular))
        index = faiss.clone_index(self._index)
        index.remove_ids(np.ascontiguousarray(changed, dtype=np.int64))
        add = np.setdiff1d(np.setdiff1d(changed, new_retired), popular)
        _with_ids(index, _augmented(W, b, add), add)
        return ItemIndex(index, W, b, new_retired, popular, int(version), self.config)


def _checked_tables(W: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    W = np.ascontiguousarray(W, dtype=np.float32)
    b = np.ascontiguousarray(np.asarray(b, dtype=np.float32).reshape(-1))
    if W.ndim != 2 or b.shape[0] != W.shape[0]:
        raise ValueError(f"weights {W.shape} and biases {b.shape} do not describe the same items")
    if not (np.isfinite(W).all() and np.isfinite(b).all()):
        raise ValueError("item weights or biases are not finite")
    return W, b


def _retired_rows(retired: Sequence[int] | np.ndarray | None, n: int) -> np.ndarray:
    r = np.unique(np.asarray(retired if retired is not None else (), dtype=np.int64))
    return r[(r >= 0) & (r < n)]
