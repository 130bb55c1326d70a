""""Because you viewed ...": which recent session items a recommendation owes most to.

The attribution is the cosine similarity, in the model's output space, between the recommended item's
output vector ``Wy[j]`` and each recent session item's ``Wy[i]``; the one or two most similar session
items (similarity > 0) are named. With gruflow's default constrained embedding ``Wy`` is also the input
embedding, so this is the similarity of the recommended item's output vector to the session items'
input embeddings; for the other input kinds the session items are compared by their output vectors,
which live in the same space as ``Wy[j]``.

Why this measures contribution: the score is ``h . Wy[j] + b[j]`` and a GRU step moves ``h`` toward
the stepped item's input, so an item whose vector points where ``Wy[j]`` points raises ``j``'s score
the most. It is cheap (k x history dot products of width H per event, from a unit-normalised copy of
``Wy`` made once per model) and is checked on held-out sessions against leave-one-out scores by
``gruflow experiment because`` (docs/http-api.md has the figures).
"""

from __future__ import annotations

import threading

import numpy as np

from model.network import GRU4RecNet

NO_ITEM = -1  # padding of recent-row matrices and of the answer


class Attribution:
    """Unit-normalised output vectors of one model version (read once; a new version gets a new one)."""

    def __init__(self, net: GRU4RecNet) -> None:
        W = net.Wy.weight.detach().float().numpy()
        norms = np.linalg.norm(W, axis=1, keepdims=True)
        self.unit = np.divide(W, norms, out=np.zeros_like(W), where=norms > 0)

    def because(self, rec_rows: np.ndarray, recent: np.ndarray, n: int = 2) -> np.ndarray:
        """For each recommended row ``rec_rows[b, j]`` (negative = none) the ``n`` rows of ``recent[b]``
        (negative = padding) most similar to it, best first: an int64 array [B, K, n], NO_ITEM where
        fewer than ``n`` have a positive similarity."""
        B, K = rec_rows.shape
        out = np.full((B, K, n), NO_ITEM, dtype=np.int64)
        if B == 0 or K == 0 or recent.shape[1] == 0:
            return out
        U = self.unit
        rec_ok = rec_rows >= 0
        rec_ok &= rec_rows < U.shape[0]
        ses_ok = (recent >= 0) & (recent < U.shape[0])
        R = U[np.where(rec_ok, rec_rows, 0)]  # [B, K, H]
        S = U[np.where(ses_ok, recent, 0)]  # [B, M, H]
        sims = np.matmul(R, S.transpose(0, 2, 1))  # [B, K, M]: batched BLAS, not einsum's loops
        sims[~np.broadcast_to(ses_ok[:, None, :], sims.shape)] = -np.inf
        m = min(n, recent.shape[1])
        order = np.argsort(-sims, axis=2, kind="stable")[:, :, :m]
        best = np.take_along_axis(sims, order, axis=2)
        rows = np.take_along_axis(np.broadcast_to(recent[:, None, :], sims.shape), order, axis=2)
        keep = (best > 0) & rec_ok[:, :, None]
        out[:, :, :m] = np.where(keep, rows, NO_ITEM)
        return out


_cache: dict[int, tuple[GRU4RecNet, Attribution]] = {}
_cache_lock = threading.Lock()


def attribution_for(net: GRU4RecNet) -> Attribution:
    """The ``Attribution`` of ``net``, built on first use (the newest two nets are kept: served and swapping)."""
    with _cache_lock:
        hit = _cache.get(id(net))
        if hit is not None and hit[0] is net:
            return hit[1]
        att = Attribution(net)
        if len(_cache) >= 2:
            _cache.pop(next(iter(_cache)))
        _cache[id(net)] = (net, att)
        return att


def session_rows(history: list[int], row: int, limit: int) -> list[int]:
    """``history`` (oldest first) after a step on ``row``: a repeated item moves to the end, at most
    ``limit`` rows are kept."""
    if row in history:
        history = [r for r in history if r != row]
    history = history + [row]
    return history[-limit:]
