"""Hand-written forward and backward of the recurrent part of training (GRUCell layers), no autograd.

Used by training when the network's input is a row of an item table (``net.start == 0``); the
one-hot GRU input layer goes through autograd instead. Both paths give the same weights (the unit
tests compare them). The forward caches what the backward needs; the backward applies the dense
Adagrad updates itself and returns the gradient w.r.t. the input rows, which the caller applies
sparsely.
"""

from __future__ import annotations

from typing import Any

import torch

from model.adagrad import SparseAdagradM
from model.network import GRU4RecNet

# (event types, feature rows, embedding dropout mask, per layer (input, hidden, r|z, W_hn h + b_hn, n, mask))
ForwardCache = tuple[Any, ...]


def _mask(x: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor | None:
    """Inverted-dropout multiplier with ``p`` the drop probability (None when p == 0)."""
    if p <= 0.0:
        return None
    keep = 1.0 - p
    return torch.empty_like(x).bernoulli_(keep, generator=gen).div_(keep)


@torch.no_grad()
def gru_forward(net: GRU4RecNet, x: torch.Tensor, types: torch.Tensor | None, H: list[torch.Tensor],
                F: torch.Tensor | None, dropout_embed: float, dropout_hidden: float,
                gen: torch.Generator) -> tuple[torch.Tensor, ForwardCache]:
    """The top layer's output for input rows ``x``; ``H`` (one tensor per layer) is replaced by the new
    hidden states. Dropout masks are drawn from ``gen`` (embedding mask first, then one per layer)."""
    if types is not None:
        x = x + net.T.weight.index_select(0, types)
    if F is not None and not net.concat:
        for col, emb in net.feature_tables():
            x = x + emb.weight.index_select(0, F[:, col])
    if net.concat:
        x = torch.cat([x] + [emb.weight.index_select(0, F[:, col]) if F is not None else
                             torch.zeros(x.shape[0], emb.embedding_dim) for col, emb in net.feature_tables()], 1)
    mask_e = _mask(x, dropout_embed, gen)
    if mask_e is not None:
        x = x * mask_e
    layers = []
    for i, cell in enumerate(net.G):
        h = H[i]
        hs = h.shape[1]
        gi = torch.addmm(cell.bias_ih, x, cell.weight_ih.T)
        gh = torch.addmm(cell.bias_hh, h, cell.weight_hh.T)
        rz = torch.sigmoid(gi[:, :2 * hs] + gh[:, :2 * hs])
        r, z = rz[:, :hs], rz[:, hs:]
        ghn = gh[:, 2 * hs:]
        n = torch.tanh(torch.addcmul(gi[:, 2 * hs:], r, ghn))
        hn = torch.addcmul(n, z, h - n)
        mask_h = _mask(hn, dropout_hidden, gen)
        out = hn * mask_h if mask_h is not None else hn
        layers.append((x, h, rz, ghn, n, mask_h))
        H[i] = out
        x = out
    return x, (types, F, mask_e, layers)


@torch.no_grad()
def gru_backward(net: GRU4RecNet, opt: SparseAdagradM, d_out: torch.Tensor, cache: ForwardCache,
                 reference_type: int) -> torch.Tensor:
    """Back-propagate ``d_out`` (gradient w.r.t. the top layer's output) through the step cached by
    :func:`gru_forward`, update the GRU weights, event-type and feature tables with ``opt``, and return
    the gradient w.r.t. the input rows. The ``reference_type`` row of the event-type table stays fixed."""
    types, F, mask_e, layers = cache
    grads = []
    for i in range(len(layers) - 1, -1, -1):
        cell = net.G[i]
        x, h, rz, ghn, n, mask_h = layers[i]
        hs = h.shape[1]
        dh = d_out * mask_h if mask_h is not None else d_out
        r, z = rz[:, :hs], rz[:, hs:]
        dn_pre = (dh * (1.0 - z)) * (1.0 - n * n)
        dz = dh * (h - n)
        drz = torch.cat([dn_pre * ghn, dz], dim=1).mul_(rz * (1.0 - rz))
        dgi = torch.cat([drz, dn_pre], dim=1)
        dgh = torch.cat([drz, dn_pre * r], dim=1)
        grads.append((cell.weight_ih, dgi.T @ x))
        grads.append((cell.bias_ih, dgi.sum(0)))
        grads.append((cell.weight_hh, dgh.T @ h))
        grads.append((cell.bias_hh, dgh.sum(0)))
        d_out = dgi @ cell.weight_ih
    if mask_e is not None:
        d_out = d_out * mask_e
    d_feats = {col: d_out for col, _ in net.feature_tables()}
    if net.concat:  # the input was [item (+type) | feature embeddings]: split its gradient
        widths = [net.n_input] + [emb.embedding_dim for _, emb in net.feature_tables()]
        d_out, *rest = torch.split(d_out, widths, dim=1)
        d_feats = {col: g for (col, _), g in zip(net.feature_tables(), rest)}
    if types is not None:
        gT = torch.zeros_like(net.T.weight).index_add_(0, types, d_out)
        gT[reference_type] = 0.0
        grads.append((net.T.weight, gT))
    for param, g in grads:
        opt.dense(param, g)
    if F is not None:
        for col, emb in net.feature_tables():
            idx = F[:, col]
            used = idx > 0  # row 0 ("absent") stays zero
            if bool(used.any()):
                opt.sparse(emb.weight, idx[used], d_feats[col][used])
    return d_out
