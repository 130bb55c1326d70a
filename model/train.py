"""Training, faithful to the official GRU4Rec (hidasib/GRU4Rec_PyTorch_Official), but fast on a CPU.

The maths is the reference's: session-parallel mini-batches over sessions in start-time order
(finished slots refilled, their hidden state zeroed); targets of the other sessions in the mini-batch
as negatives plus ``n_sample`` items shared by the mini-batch, drawn from popularity^``sample_alpha`` and
precomputed in bulk; cross-entropy (with optional logQ correction) or BPR-max (with ``bpreg`` and
``elu_param``); dropout as *drop* probability; no backpropagation through time (the hidden state is
detached every step); Adagrad with optional momentum, applied sparsely to the item rows a step used;
the loss summed over the mini-batch and divided by ``batch_size``.

The engineering differs: autograd only runs through the small [B, hidden] recurrent part; the
[B, B + n_sample] score matrix and its gradients w.r.t. the item rows are computed directly, and the
sparse Adagrad coalesces duplicate rows itself. Nothing here touches global state (no global RNG,
thread settings or module caches), so :func:`fit` can be called again and again on micro-batches to
continue training served weights; each call starts a fresh optimizer state, like the reference.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Mapping

import numpy as np
import pandas as pd
import torch

from model.adagrad import SparseAdagradM
from model.batching import SessionIndex, index_sessions, session_parallel
from model.features import feature_matrix
from model.gru_backprop import ForwardCache, gru_backward, gru_forward
from model.losses import bpr_max, cross_entropy
from model.negative_sampling import NegativeSampler
from model.network import GRU4RecNet
from model.params import GRU4RecParams
from model.vocab import Vocabulary



def item_rows_for(df: pd.DataFrame, item_rows: Vocabulary | Mapping[str, int]) -> np.ndarray:
    """Row of each event's item (-1 when unknown), looking each distinct id up once."""
    uniq, inverse = np.unique(df["ItemId"].to_numpy(dtype=object).astype(str), return_inverse=True)
    if isinstance(item_rows, Vocabulary):
        rows = item_rows.rows(list(uniq))
    else:
        rows = np.fromiter((int(item_rows.get(i, -1)) for i in uniq), dtype=np.int64, count=len(uniq))
    return rows[inverse].astype(np.int64)


def features_for(net: GRU4RecNet, df: pd.DataFrame, grow: bool = False) -> np.ndarray | None:
    """The feature rows of ``df`` for ``net`` (None when it uses no feature). With ``grow`` the
    network's category vocabulary and table first take the categories ``df`` brings (online growth)."""
    if not net.uses_features:
        return None
    if grow and net.C is not None and "Category" in df.columns:
        net.grow_categories(pd.unique(df["Category"].dropna().astype(str)))
    return feature_matrix(df, net.categories if net.C is not None else None)


def build_vocabulary(df: pd.DataFrame) -> Vocabulary:
    """Items in order of first appearance in the (sorted) table, as the reference numbers them."""
    return Vocabulary(pd.unique(df["ItemId"].astype(str)))


def training_generator(seed: int) -> torch.Generator:
    """The random stream for dropout masks and negative samples, derived from ``seed``.

    :meth:`GRU4RecNet.reset_parameters` seeds a generator with the same seed; seeding training's
    generator with it directly replays the initial weights' uniforms as the first dropout masks and
    the first ~1M negative samples, tying those samples to the initial weights. The reference draws
    them independently, so a separate stream is derived here."""
    state = np.random.SeedSequence(int(seed) % (1 << 64), spawn_key=(1,)).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def item_counts(rows: np.ndarray, n_items: int) -> np.ndarray:
    """Events per row (float64), ignoring unknown (-1) rows."""
    rows = rows[rows >= 0]
    return np.bincount(rows, minlength=n_items).astype(np.float64)


def fit(net: GRU4RecNet, data: pd.DataFrame, params: GRU4RecParams | None = None, *, n_epochs: int | None = None,
        item_rows: Vocabulary | Mapping[str, int], progress: bool = True, sample_counts: np.ndarray | None = None,
        seed: int | None = None, report: Callable[[str], None] | None = None) -> dict:
    """Train ``net`` in place on the event table ``data`` (see :mod:`model.data`).

    ``item_rows`` maps item ids to the network's rows; events of unknown items are dropped.
    ``params`` defaults to ``net.params`` (the training hyperparameters may differ from the ones the
    network was built with, e.g. a lower learning rate for online fine-tuning); ``n_epochs`` overrides
    ``params.n_epochs``. Negatives are sampled from this data's item counts unless ``sample_counts``
    (per row) is given. ``progress`` draws a bar on a terminal only (a log would fill with its frames);
    ``report``, when given, receives one plain line per finished epoch. Returns a summary: per-epoch
    loss, events, seconds, events/s.
    """
    params = params or net.params
    epochs = params.n_epochs if n_epochs is None else n_epochs
    rows = item_rows_for(data, item_rows)
    if len(rows) and rows.max() >= net.n_items:
        raise ValueError(f"item_rows maps to row {int(rows.max())} but the network has {net.n_items} items; "
                         "call net.expand_items() first")
    index = index_sessions(data, rows, features_for(net, data, grow=True))
    counts = item_counts(index.items, net.n_items)
    gen = training_generator(params.seed if seed is None else seed)
    summary = {"epochs": epochs, "loss": [], "events": 0, "seconds": 0.0, "n_sessions": index.n_sessions,
               "n_events": index.n_events, "n_items": net.n_items}
    if index.n_predictions == 0 or epochs <= 0:
        summary["events_per_s"] = 0.0
        return summary
    trainer = _Trainer(net, params, counts if sample_counts is None else np.asarray(sample_counts, np.float64),
                       counts, gen, expected_steps=epochs * math.ceil(index.n_predictions / max(1, params.batch_size)))
    # the commonest event type is the reference: its event-type row is not trained, so on single-type
    # (e.g. click-only) data the network trains exactly like the reference GRU4Rec
    trainer.reference_type = int(np.bincount(index.event_types).argmax())
    summary["reference_event_type"] = trainer.reference_type
    t0 = time.perf_counter()
    was_training = net.training
    net.train()
    try:
        for epoch in range(epochs):
            loss, events = trainer.epoch(index, progress, f"epoch {epoch + 1}/{epochs}")
            if not math.isfinite(loss):
                raise FloatingPointError(f"training diverged (loss is {loss}) in epoch {epoch + 1}; "
                                         "try a lower learning_rate")
            summary["loss"].append(loss)
            summary["events"] += events
            if report is not None:
                seconds = time.perf_counter() - t0
                report(f"epoch {epoch + 1}/{epochs}: loss {loss:.4f}, {summary['events']} events, "
                       f"{summary['events'] / max(seconds, 1e-9):.0f} events/s")
    finally:
        net.train(was_training)
        net.eval()
    summary["seconds"] = time.perf_counter() - t0
    summary["events_per_s"] = summary["events"] / max(summary["seconds"], 1e-9)
    return summary


class _Trainer:
    """Per-call training state: optimizer accumulators, negative sampler, logQ table."""

    def __init__(self, net: GRU4RecNet, params: GRU4RecParams, sample_counts: np.ndarray, target_counts: np.ndarray,
                 gen: torch.Generator, expected_steps: int) -> None:
        if params.loss not in ("cross-entropy", "bpr-max"):
            raise ValueError(f"unknown loss {params.loss!r}; use cross-entropy or bpr-max")
        self.net = net
        self.p = params
        self.gen = gen
        self.opt = SparseAdagradM(params.learning_rate, params.momentum)
        self.sampler = NegativeSampler(sample_counts, params.n_sample, params.sample_alpha,
                                       params.sample_cache_max_size, gen, expected_steps) if params.n_sample > 0 else None
        self.logq = None
        if params.logq > 0 and params.loss == "cross-entropy":
            # the reference corrects targets by log(count) and samples by log(count^alpha)
            with np.errstate(divide="ignore"):
                lc = np.log(np.maximum(target_counts, 0.0))
            self.log_counts = torch.from_numpy(lc.astype(np.float32))
            sc = np.log(np.maximum(sample_counts, 1e-30)) * params.sample_alpha
            self.log_counts_samples = torch.from_numpy(sc.astype(np.float32))
            self.logq = params.logq
        self.dense = net.dense_parameters()
        self.table = net.input_table()
        self.shared_input = net.constrained
        self.manual = net.start == 0  # GRUCell layers: hand-written backward; one-hot GRU input: autograd
        self.merge = self.sampler is not None and params.loss == "cross-entropy"  # repeated samples merged
        self.reference_type = 1  # set by fit(): the event type whose embedding row stays fixed

    def epoch(self, index: SessionIndex, progress: bool, desc: str) -> tuple[float, int]:
        from model.progress import progress as progress_bar

        net, p = self.net, self.p
        items = torch.from_numpy(index.items)
        types = torch.from_numpy(index.event_types)
        feats = torch.from_numpy(index.features) if index.features is not None else None
        H = [torch.zeros(min(p.batch_size, index.n_sessions), h) for h in net.layers]
        loss_sum, n_events = 0.0, 0
        min_active = 1 if p.n_sample > 0 else 2
        bar = progress_bar(index.n_predictions, desc, "ev", enabled=progress)
        try:
            for chunk in session_parallel(index, p.batch_size, min_active):
                if chunk.n_steps:
                    pos = torch.from_numpy(chunk.input_positions())
                    X_all, T_all, Y_all = items[pos], types[pos], items[pos + 1]
                    F_all = feats[pos] if feats is not None else None
                    for i in range(chunk.n_steps):
                        loss_sum += self.step(X_all[i], T_all[i], Y_all[i], H,
                                              F_all[i] if F_all is not None else None)
                    n = chunk.n_steps * len(chunk.start)
                    n_events += n
                    bar.update(n)
                for h in H:
                    h[torch.from_numpy(chunk.finished)] = 0.0
                if not chunk.keep.all():
                    keep = torch.from_numpy(chunk.keep)
                    H = [h[keep] for h in H]
        finally:
            bar.close()
        return loss_sum / max(n_events, 1) * p.batch_size, n_events

    def step(self, X: torch.Tensor, T: torch.Tensor, Y: torch.Tensor, H: list[torch.Tensor],
             F: torch.Tensor | None = None) -> float:
        """One session-parallel step: inputs ``X`` (event types ``T``, feature rows ``F``), targets ``Y``;
        ``H`` is replaced by the new hidden states (detached). Updates the weights; returns the loss."""
        rows = self.table.detach().index_select(0, X)
        out, cache = self._recurrent_forward(rows, T, H, F)
        Yall, lq = self._columns(Y)
        Xh = out.detach()
        loss, dXh, dO, db = self._output_gradients(Xh, Yall, lq)
        if self.manual:
            d_rows = gru_backward(self.net, self.opt, dXh, cache, self.reference_type)
        else:
            d_rows = self._autograd_backward(out, rows, dXh)
        self._update_item_rows(X, Yall, d_rows, dO, db)
        return loss

    def _recurrent_forward(self, rows: torch.Tensor, T: torch.Tensor, H: list[torch.Tensor],
                           F: torch.Tensor | None) -> tuple[torch.Tensor, ForwardCache | None]:
        net, p = self.net, self.p
        types = T if net.T is not None else None
        if self.manual:
            return gru_forward(net, rows, types, H, F, p.dropout_p_embed, p.dropout_p_hidden, self.gen)
        for param in self.dense:
            param.grad = None
        rows.requires_grad_()
        with torch.enable_grad():
            out = net.step_rows(rows, H, types, training=True, generator=self.gen, features=F)
        for i in range(len(H)):
            H[i] = H[i].detach()
        return out, None

    @torch.no_grad()
    def _columns(self, Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The scored columns, the B targets of the mini-batch then the shared samples, and what is added
        to their scores (log multiplicity of merged samples, logQ correction), or None."""
        B = Y.shape[0]
        lq, S = None, None
        if self.sampler is None:
            Yall = Y
        elif self.merge:
            S, log_mult = self.sampler.next_merged()
            Yall = torch.cat([Y, S])
            lq = torch.cat([torch.zeros(B), log_mult.neg()])
        else:
            S = self.sampler.next()
            Yall = torch.cat([Y, S])
        if self.logq is not None:
            corr = self.log_counts.index_select(0, Y)
            if S is not None:
                corr = torch.cat([corr, self.log_counts_samples.index_select(0, S)])
            corr.mul_(self.logq)
            lq = corr if lq is None else lq.add_(corr)
        return Yall, lq

    @torch.no_grad()
    def _output_gradients(self, Xh: torch.Tensor, Yall: torch.Tensor,
                          lq: torch.Tensor | None) -> tuple[float, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The loss and its gradients w.r.t. the top layer's output, the scored rows of Wy and of By."""
        p = self.p
        O = self.net.Wy.weight.detach().index_select(0, Yall)
        b = self.net.By.weight.detach().index_select(0, Yall).view(1, -1)
        R = torch.addmm(b, Xh, O.T)
        scale = 1.0 / p.batch_size
        if p.loss == "cross-entropy":
            loss, dR = cross_entropy(R, lq, scale)
        else:
            loss, dR = bpr_max(R, p.bpreg, p.elu_param, scale)
        return loss, dR @ O, dR.T @ Xh, dR.sum(0).view(-1, 1)

    def _autograd_backward(self, out: torch.Tensor, rows: torch.Tensor, dXh: torch.Tensor) -> torch.Tensor:
        """Autograd through the recurrent part; dense updates applied, input-row gradient returned."""
        net = self.net
        out.backward(dXh)
        with torch.no_grad():
            if net.T is not None and net.T.weight.grad is not None:
                net.T.weight.grad[self.reference_type] = 0.0
            for _, emb in net.feature_tables():
                if emb.weight.grad is not None:  # row 0 ("absent") stays zero
                    emb.weight.grad[0] = 0.0
            for param in self.dense:
                if param.grad is not None:
                    self.opt.dense(param, param.grad)
        return rows.grad

    @torch.no_grad()
    def _update_item_rows(self, X: torch.Tensor, Yall: torch.Tensor, d_rows: torch.Tensor, dO: torch.Tensor,
                          db: torch.Tensor) -> None:
        """Sparse Adagrad on the item rows the step used: the input table (``X``) and Wy, By (``Yall``)."""
        opt, B = self.opt, X.shape[0]
        Wy, By = self.net.Wy.weight, self.net.By.weight
        # one coalescing (distinct rows + summed gradients) serves Wy and By
        if self.shared_input:
            idx, g = torch.cat([X, Yall]), torch.cat([d_rows, dO])
        else:
            opt.sparse(self.table, X, d_rows)
            idx, g = Yall, dO
        uniq, inv = torch.unique(idx, return_inverse=True)
        gs = torch.zeros(len(uniq), g.shape[1]).index_add_(0, inv, g)
        inv_y = inv[B:] if self.shared_input else inv
        gb = torch.zeros(len(uniq), 1).index_add_(0, inv_y, db)
        if self.shared_input and opt.momentum > 0:
            # By's rows are the scored items only (an input-only row must not take a momentum step)
            used = torch.zeros(len(uniq), dtype=torch.bool)
            used[inv_y] = True
            opt.sparse_coalesced(By, uniq[used], gb[used])
        else:
            opt.sparse_coalesced(By, uniq, gb)
        opt.sparse_coalesced(Wy, uniq, gs)


def train_model(data: pd.DataFrame, params: GRU4RecParams | None = None, progress: bool = True,
                vocab: Vocabulary | None = None) -> tuple[GRU4RecNet, Vocabulary, np.ndarray]:
    """Build a vocabulary from ``data`` (unless given), a fresh network, and train it.

    Returns (net, vocab, popularity) with popularity = training events per row, as the Recommender
    and the checkpoint expect."""
    params = params or GRU4RecParams()
    vocab = vocab or build_vocabulary(data)
    if len(vocab) == 0:
        raise ValueError("no events to train on")
    net = GRU4RecNet(len(vocab), params)
    fit(net, data, params, item_rows=vocab, progress=progress)
    popularity = item_counts(item_rows_for(data, vocab), len(vocab))
    net.eval()
    return net, vocab, popularity


def replace_params(params: GRU4RecParams, **changes) -> GRU4RecParams:
    """``dataclasses.replace`` re-exported for callers that tweak training params (e.g. online lr)."""
    return dataclasses.replace(params, **changes)
