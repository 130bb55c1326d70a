"""Exact top-K over the whole catalogue for many hidden states, faster than a plain ``torch.topk``.

Scoring every event against every item is the worker's main cost: a [B, H] x [H, N] product, then a
top-K over N items per event. ``TopKScorer`` makes both cheaper without changing the answer:

- Block selection: split each row of scores into blocks of 32 items; the top-K items of a row lie in
  its K blocks with the largest maxima (any other block's maximum is beaten by K items), so a top-K over
  those K*32 candidates gives the same items as a top-K over all N.
- An int8 pre-filter with a proven error bound: the product is first computed in int8 (a third to a
  quarter of the float32 product's time on this CPU, which has VNNI), the few items whose approximation
  could still reach the exact top-K are re-scored in float32, and a row is answered from them only when
  the bound proves that no other item can be in its exact top-K. Other rows (flat scores, untrained
  weights) take the float32 path.

- Where the machine can build and run it (a C compiler, AVX-512 VNNI or AVX2), the int8 path runs as one
  compiled pass per batch (``native.c``, loaded by ``model.native``): the product is formed 32 items at a time
  in registers and a block is dropped at once when it cannot reach the row's threshold so far, so the [B, N]
  int32 matrix and the passes over it are never made. Same bound, same answers; elsewhere torch runs them.

Which of these paths is fastest depends on the CPU, not only on the model: ``model.topk_calibration`` times
them on the served weights and keeps the fastest exact one (``ScorerCache``).

Same results as ``Recommender.top_k`` (retired items masked the same way), up to float32 rounding:
two products of the same numbers may differ in their last bits (the kernel, so the order of the sums,
depends on the shapes), so items whose scores are that close may swap places or trade the K-th slot.
Weights are read once per served model; a model swap builds a new scorer.
"""

from __future__ import annotations

import logging
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import numpy as np
import torch

from model.recommender import Recommender
from model import native
log = logging.getLogger(__name__)

ScorerPath = Literal["float32", "int8", "compiled"]
PATHS: tuple[ScorerPath, ...] = ("float32", "int8", "compiled")
_BLOCK = 32
_CHUNK = 128  # rows scored at once by the float32 path: a [128, N] score block
_QMAX = 127  # int8 codes are kept symmetric: -127..127
_CANDIDATES = 64  # at most this many items re-scored exactly per row by the int8 path
_CANDIDATE_BLOCKS = 48  # best blocks of 32 items searched for them
_INT_CHUNK = 256  # rows scored at once by the int8 path: a [256, N] int32 block
_PROBE_ROWS = 4096  # rows after which an int8 path that proves less than half of them is dropped
_CODE_CHUNK = 65_536  # items coded at a time (float64 temporaries of this many rows)
_MAX_BIAS_COLUMNS = 64  # more would mean biases far larger than the weights: float32 path only
_NATIVE_CANDIDATES = 256  # items re-scored exactly per row by the compiled int8 path, at most
_NATIVE_BLOCK_CAP = 128  # blocks it keeps per row while the threshold rises, at most
_SPLIT_MIN_ROWS = 64  # a batch is split over the scoring threads only into parts of at least this many
# rows: a call has a fixed cost, so splitting a small batch costs more than it saves (docs/hot-path.md)

_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def _pool(threads: int) -> ThreadPoolExecutor:
    """One shared pool per thread count: scorers are rebuilt on every model swap, threads are not."""
    with _pools_lock:
        pool = _pools.get(threads)
        if pool is None:
            pool = _pools[threads] = ThreadPoolExecutor(threads, thread_name_prefix="gruflow-topk")
        return pool


def _column_major(codes: torch.Tensor) -> torch.Tensor:
    """``codes`` stored item by item: torch._int_mm reads that layout faster, with identical results
    (docs/hot-path.md). Row-major where this torch's _int_mm refuses a transposed operand."""
    stored = codes.T.contiguous().T
    try:
        torch._int_mm(torch.zeros((1, codes.shape[0]), dtype=torch.int8), stored)
    except RuntimeError:
        return codes.contiguous()
    return stored


class Int8Prefilter:
    """Approximate scores in integer units, with a per-row bound on their error.

    With ``sw = max|W| / 127`` and ``u = sw / 127`` (one integer unit, in score units), the hidden state
    ``x`` (|x| <= 1 for a GRU) is coded ``xq = round(127 x)``, an item's weights ``wq = round(w / sw)``
    and its bias ``b / u`` as ``127 * (coarse columns) + fine`` against constant inputs (127s and a 1),
    so one int8 product gives ``I = xq . wq + round(b / u)`` in int32. Against the exact score in the
    same units, ``E = (x . w + b) / u``:

        E - I = d . (w / sw) + xq . e + (b / u - round(b / u)),   d = 127 x - xq,  e = w / sw - wq

    so ``|E - I| <= |d| max|w / sw| + |xq| max|e| + 1/2`` (Euclidean norms, maxima over items): ``eps``,
    known per row before anything is compared (plus a slack for float32 rounding of the reference).
    Every item j of the exact top-K has ``I_j >= I_K - 2 eps``, I_K being the K-th best approximation:
    the K items with I >= I_K all have E >= I_K - eps, so the K-th best E is at least that, and
    I_j >= E_j - eps. ``TopKScorer`` re-scores exactly the items above a threshold no higher than that.
    """

    def __init__(self, W: torch.Tensor, b: torch.Tensor) -> None:
        n, h = W.shape
        b64 = b.double()
        # float64 work goes _CODE_CHUNK items at a time: whole-catalogue float64 temporaries of a 1M x 100
        # matrix are 800 MB each, and held together they took the worker's peak memory past 5 GB
        maxima = [float(W[i:i + _CODE_CHUNK].abs().max()) for i in range(0, n, _CODE_CHUNK)] if h else []
        amax = max(maxima, default=0.0)
        if not all(map(math.isfinite, maxima)) or amax == 0.0 or not bool(torch.isfinite(b64).all()):
            raise ValueError("weights are empty, all zero or not finite")
        sw = amax / _QMAX
        unit = sw / _QMAX
        b_int = torch.round(b64 / unit)
        coarse = torch.round(b_int / _QMAX)
        fine = b_int - _QMAX * coarse  # in [-63, 63]
        n_coarse = max(1, math.ceil(float(coarse.abs().max()) / _QMAX))
        if n_coarse > _MAX_BIAS_COLUMNS:
            raise ValueError("biases are too large next to the weights for int8 codes")
        width = -(-(h + n_coarse + 1) // 8) * 8
        self.padded = -(-n // _BLOCK) * _BLOCK  # whole blocks; the extra items are masked by the caller
        by_item = torch.zeros((self.padded, width), dtype=torch.int8)  # [N, width]: each item's codes together
        w_norm = e_norm = 0.0
        for i in range(0, n, _CODE_CHUNK):
            scaled = W[i:i + _CODE_CHUNK].double() / sw
            wq = torch.round(scaled).clamp_(-_QMAX, _QMAX)
            by_item[i:i + len(wq), :h] = wq.to(torch.int8)
            w_norm = max(w_norm, float(scaled.norm(dim=1).max()))  # max |w / sw|
            e_norm = max(e_norm, float((scaled - wq).norm(dim=1).max()))  # max |e|
        base = torch.trunc(coarse / n_coarse)
        rest = coarse - base * n_coarse  # |rest| < n_coarse: one more unit in |rest| columns
        for c in range(n_coarse):
            by_item[:n, h + c] = (base + torch.sign(rest) * (rest.abs() > c)).to(torch.int8)
        by_item[:n, h + n_coarse] = fine.to(torch.int8)
        self.codes = _column_major(by_item.T)  # [width, N], stored item by item (no copy)
        self.const = torch.zeros(width, dtype=torch.int8)
        self.const[h:h + n_coarse] = _QMAX
        self.const[h + n_coarse] = 1
        self.hidden = h
        self.n_coarse = n_coarse
        self.w_norm = w_norm
        self.e_norm = e_norm
        # float32 rounding of the exact scores themselves (the reference is a float32 product): a
        # generous relative bound, in integer units, on top of the quantisation error
        self.fp_slack = 1e-4 * (_QMAX * math.sqrt(h) * self.w_norm + float(b_int.abs().max())) + 2.0
        self.unit = unit

    def scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """int32 approximate scores [B, N] and the error bound eps [B] (float64, integer units)."""
        x64 = x.double()
        xq = torch.round(x64 * _QMAX).clamp_(-_QMAX, _QMAX)
        d = x64 * _QMAX - xq
        eps = d.norm(dim=1) * self.w_norm + xq.norm(dim=1) * self.e_norm + 0.5 + self.fp_slack
        codes = self.const.expand(x.shape[0], -1).clone()
        codes[:, :self.hidden] = xq.to(torch.int8)
        return torch._int_mm(codes, self.codes), eps


def int8_product_is_exact(pf: Int8Prefilter, items: int = 512) -> bool:
    """Whether ``torch._int_mm`` gives the exact int32 products of ``pf``'s item codes on this machine.

    The error bound assumes exact integer products. oneDNN's int8 product without VNNI (AVX2 only)
    adds pairs of 8-bit products in 16 bits with saturation, so sums of large codes of one sign come out
    wrong: there torch's int8 path must not be used (the compiled kernel computes its own products).
    Checked on the codes of the first ``items`` items (and of the items most likely to saturate) against
    hidden codes chosen to saturate: all +127, all -127, random signs, and the signs of those items' own
    codes."""
    codes, const, hidden = pf.codes, pf.const, pf.hidden
    n = codes.shape[1]
    # summed a slice of items at a time: the int64 copy of all the codes would be 800 MB at 1M items
    magnitude = torch.cat([codes[:hidden, i:i + _CODE_CHUNK].abs().sum(dim=0, dtype=torch.int64)
                           for i in range(0, n, _CODE_CHUNK)])
    largest = torch.topk(magnitude, min(8, n)).indices
    cols = torch.unique(torch.cat([torch.arange(min(items, n)), largest]))
    w = codes.index_select(1, cols)
    g = torch.Generator().manual_seed(0)
    signs = [torch.ones(hidden), -torch.ones(hidden), *(torch.randint(0, 2, (hidden,), generator=g) * 2.0 - 1
                                                        for _ in range(16)),
             *(torch.sign(codes[:hidden, j].float()) for j in largest.tolist())]
    x = const.expand(len(signs), -1).clone()
    x[:, :hidden] = (torch.stack(signs) * _QMAX).to(torch.int8)
    try:
        got = torch._int_mm(x, w)
    except RuntimeError:
        return False
    return bool(torch.equal(got.long(), x.long() @ w.long()))


class NativeInt8TopK:
    """The int8 path of ``TopKScorer`` in one compiled pass (``native.c``), with the same bound
    and the same answers: the item codes packed 16 items x 4 codes per vector, stored + 128 (unsigned),
    and an accumulator start per item that keeps retired and padding items out."""

    _MASKED = -(1 << 30)

    def __init__(self, kernel: native.TopKKernel, pf: Int8Prefilter, W: torch.Tensor, b: torch.Tensor, n: int,
                 retired: torch.Tensor | None) -> None:
        self.kernel = kernel
        self.pf = pf
        width = pf.codes.shape[0]
        self.kw4 = width // 4
        self.nblocks = pf.padded // _BLOCK
        # [padded, width], each code + 128 as an unsigned byte: flipping the sign bit of an int8 adds 128 modulo
        # 256, with no int16 temporaries (two of them were 400 MB at 1M items)
        by_item = pf.codes.T.numpy().view(np.uint8) ^ np.uint8(0x80)
        packed = by_item.reshape(pf.padded // 16, 16, self.kw4, 4).transpose(0, 2, 1, 3)
        self.codes = np.ascontiguousarray(packed, dtype=np.uint8)
        self.init = np.zeros(pf.padded, dtype=np.int32)
        self.init[n:] = self._MASKED
        if retired is not None:
            self.init[retired.numpy()] = self._MASKED
        self.W = W.numpy()
        self.b = b.numpy()
        self.n = n

    def top_k(self, x: np.ndarray, k: int, rows: np.ndarray, values: np.ndarray) -> np.ndarray:
        """Fills ``rows``/``values`` ([m, k], contiguous) for the rows it proves and leaves the other rows
        as they were; returns the proven rows as a bool mask. ``x``: [m, hidden] float32, contiguous."""
        m = x.shape[0]
        ok = np.zeros(m, dtype=np.uint8)
        pf = self.pf
        self.kernel.run(self.codes.ctypes.data, self.init.ctypes.data, self.nblocks, self.kw4,
                         self.W.ctypes.data, self.b.ctypes.data, self.n, pf.hidden, pf.n_coarse,
                         pf.w_norm, pf.e_norm, pf.fp_slack,
                         x.ctypes.data, m, k, _NATIVE_CANDIDATES, _NATIVE_BLOCK_CAP,
                         rows.ctypes.data, values.ctypes.data, ok.ctypes.data)
        return ok.view(bool)


class TopKScorer:
    """Exact top-K for a batch of hidden states; ``int8=False`` keeps the float32 path only.

    The int8 path pays off only where scores are spread out, as a trained model's are: on flat scores
    (an untrained model) no row can be proven and every row is scored twice. So once ``_PROBE_ROWS``
    rows have been scored, a scorer whose int8 path proved less than half of them stops using it.

    ``threads`` > 1 scores the chunks of a batch on that many Python threads at once, torch's own pool
    being left at one thread: torch releases the GIL inside its kernels, and unlike torch's OpenMP
    threads these do not spin between calls (spinning OpenMP threads took the CPU that the event loop
    and the broker needed; the end-to-end rate fell by about a quarter with two of them)."""

    def __init__(self, model: Recommender, *, int8: bool = True, threads: int = 1, compiled: bool | str = True,
                 rows: np.ndarray | None = None) -> None:
        """``compiled``: False, True (the kernel's best instruction set here) or one of ``native.ISAS``;
        ``rows``: only these live rows, answered as catalogue rows (``model.topk_tiers`` proves the rest out)."""
        self.model = model
        self.threads = max(1, int(threads))
        net = model.net
        self.row_ids = None if rows is None else np.asarray(rows, dtype=np.int64)
        with torch.no_grad():
            W, b = net.Wy.weight.detach().float(), net.By.weight.detach().float().reshape(-1)
            if self.row_ids is not None:
                W, b = W[torch.from_numpy(self.row_ids)], b[torch.from_numpy(self.row_ids)]
            self.W, self.b = W.contiguous(), b.contiguous()
        self.n = self.W.shape[0]
        self.WT = self.W.T.contiguous()
        self.top_width = int(net.layers[-1])
        retired = getattr(model, "_retired", None) if rows is None else None
        self.retired = None
        if retired is not None and len(retired):
            self.retired = torch.as_tensor(np.asarray(retired, dtype=np.int64))
        self.prefilter: Int8Prefilter | None = None
        if int8 and self.n >= 4 * _BLOCK * _CANDIDATE_BLOCKS:
            try:
                self.prefilter = Int8Prefilter(self.W, self.b)
            except ValueError:
                self.prefilter = None
        self.native: NativeInt8TopK | None = None
        isa = "auto" if compiled is True else str(compiled)
        kernel = native.topk_kernel(isa) if compiled and self.prefilter is not None else None
        if kernel is not None:
            self.native = NativeInt8TopK(kernel, self.prefilter, self.W, self.b, self.n, self.retired)
        elif self.prefilter is not None and not int8_product_is_exact(self.prefilter):
            log.warning("torch's int8 product is not exact on this CPU (it saturates): top-K in float32")
            self.prefilter = None
        self.rows_scored = 0  # rows answered, and how many of them the int8 path proved
        self.rows_int8 = 0

    @property
    def path(self) -> ScorerPath:
        """The path that answers rows first: the float32 path takes only the rows it leaves."""
        if self.prefilter is None:
            return "float32"
        return "compiled" if self.native is not None else "int8"

    def top_k(self, hidden: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, self.n)
        x = torch.from_numpy(np.ascontiguousarray(hidden[:, -self.top_width:], dtype=np.float32))
        m = x.shape[0]
        rows = np.empty((m, k), dtype=np.int64)
        values = np.empty((m, k), dtype=np.float32)
        prefilter = self.prefilter if k < _CANDIDATE_BLOCKS else None
        size = _INT_CHUNK if prefilter is not None else _CHUNK
        parts = max(1, -(-m // size), min(self.threads, m // _SPLIT_MIN_ROWS))
        bounds = [m * i // parts for i in range(parts + 1)]
        jobs = [(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]
        if len(jobs) > 1 and self.threads > 1:
            proven = sum(_pool(self.threads).map(lambda j: self._score_rows(x, j, k, prefilter, rows, values), jobs))
        else:
            proven = sum(self._score_rows(x, j, k, prefilter, rows, values) for j in jobs)
        self.rows_int8 += proven
        seen = self.rows_scored + m
        if prefilter is not None and seen >= _PROBE_ROWS > self.rows_scored and 2 * self.rows_int8 < seen:
            self.prefilter = None  # scores too flat for the int8 bound to prove anything
        self.rows_scored = seen
        if self.row_ids is not None:
            rows = self.row_ids[rows]
        return rows, values

    @torch.inference_mode()
    def _score_rows(self, x: torch.Tensor, span: tuple[int, int], k: int, prefilter: Int8Prefilter | None,
                    rows: np.ndarray, values: np.ndarray) -> int:
        """Top-k of rows ``span`` of ``x`` into ``rows``/``values`` (disjoint per call: thread-safe);
        returns how many the int8 path proved."""
        s, e = span
        todo = np.arange(s, e)
        if prefilter is not None and self.native is not None and e > s:
            ok = self.native.top_k(np.ascontiguousarray(x[s:e].numpy()), k, rows[s:e], values[s:e])
            todo = np.flatnonzero(~ok) + s
        elif prefilter is not None and e > s:
            missed = []
            for c in range(s, e, _INT_CHUNK):
                ok, v, r = self._int8_top_k(prefilter, x[c:min(e, c + _INT_CHUNK)], k)
                ok = ok.numpy()
                rows[c:c + len(ok)][ok] = r.numpy()
                values[c:c + len(ok)][ok] = v.numpy()
                missed.append(np.flatnonzero(~ok) + c)
            todo = np.concatenate(missed)
        if len(todo):
            xs = x[torch.from_numpy(todo)] if len(todo) < e - s else x[s:e]
            for c in range(0, xs.shape[0], _CHUNK):
                v, r = self._float32_top_k(xs[c:c + _CHUNK], k)
                rows[todo[c:c + r.shape[0]]] = r.numpy()
                values[todo[c:c + r.shape[0]]] = v.numpy()
        return e - s - len(todo)

    def _float32_top_k(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        scores = torch.addmm(self.b, x, self.WT)
        if self.retired is not None:
            scores[:, self.retired] = -torch.inf
        return block_topk(scores, k)

    def _int8_top_k(self, pf: Int8Prefilter, x: torch.Tensor, k: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows proven exact [B] bool, their top-k values [b, k], their top-k rows [b, k]).

        Candidates without a full sort: block maxima of the int32 scores; ``tau`` = the k-th best block
        maximum is at most the k-th best item, so every item of the exact top-k has an approximation of
        at least ``tau - 2 eps``; those items lie in the ``_CANDIDATE_BLOCKS`` best blocks when the last of
        them is already below that threshold, and at most ``_CANDIDATES`` of them are re-scored in float32."""
        approx, eps = pf.scores(x)
        low = torch.iinfo(torch.int32).min
        if self.retired is not None:
            approx[:, self.retired] = low
        if pf.padded > self.n:
            approx[:, self.n:] = low
        m = approx.shape[0]
        blocks = approx.view(m, -1, _BLOCK)
        bv, bi = torch.topk(blocks.amax(dim=2), _CANDIDATE_BLOCKS, dim=1, sorted=True)
        tau = bv[:, k - 1].double()
        thr64 = torch.ceil(tau - 2 * eps)
        ok = (bv[:, -1].double() < thr64) & (tau > low) & torch.isfinite(thr64)
        # in int32 range (retired and padding items, at ``low``, stay below it); rows not ok are dropped
        thr = torch.nan_to_num(thr64, nan=0.0).clamp(low + 1, -low - 1).to(torch.int32)
        used = int((bv >= thr.unsqueeze(1)).sum(dim=1).max())  # blocks are sorted: the rest are below
        block_ids = bi[:, :used] + (torch.arange(m) * blocks.shape[1]).unsqueeze(1)
        near = blocks.reshape(-1, _BLOCK).index_select(0, block_ids.reshape(-1)).view(m, -1)
        above = near >= thr.unsqueeze(1)
        count = above.sum(dim=1)
        ok &= count <= _CANDIDATES
        above &= ok.unsqueeze(1)
        count = torch.where(ok, count, 0)
        # compact each row's candidates to the left of a [m, width] matrix (row-major nonzero order)
        flat = torch.nonzero(above.reshape(-1)).reshape(-1)
        r = flat // above.shape[1]
        items = block_ids.reshape(-1).index_select(0, flat // _BLOCK) % blocks.shape[1] * _BLOCK + flat % _BLOCK
        width = max(k, int(count.max()))
        pos = torch.arange(len(flat)) - (torch.cumsum(count, 0) - count).index_select(0, r)
        cand = torch.zeros((m, width), dtype=torch.int64)
        cand[r, pos] = items
        w = self.W.index_select(0, cand.reshape(-1)).view(m, width, -1)
        exact = torch.baddbmm(self.b[cand].unsqueeze(2), w, x.unsqueeze(2)).squeeze(2)
        exact[torch.arange(width) >= count.unsqueeze(1)] = -torch.inf  # padding
        v, pick = torch.topk(exact, k, dim=1, sorted=True)
        idx = torch.nonzero(ok).reshape(-1)
        return ok, v[idx], torch.gather(cand, 1, pick)[idx]


def block_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk(scores, k, dim=1, sorted=True)``, computed from the rows' k best blocks."""
    m, n = scores.shape
    nb = n // _BLOCK
    if nb <= 2 * k:
        return torch.topk(scores, k, dim=1, sorted=True)
    blocks = scores[:, : nb * _BLOCK].view(m, nb, _BLOCK)
    best = torch.topk(blocks.amax(dim=2), k, dim=1, sorted=False).indices
    cand = (best.unsqueeze(2) * _BLOCK + torch.arange(_BLOCK)).reshape(m, -1)
    if nb * _BLOCK < n:  # the ragged tail is always a candidate
        cand = torch.cat([cand, torch.arange(nb * _BLOCK, n).expand(m, -1)], dim=1)
    values, pick = torch.topk(torch.gather(scores, 1, cand), k, dim=1, sorted=True)
    return values, torch.gather(cand, 1, pick)
