"""Growing the item tables of a network: new rows for items that joined the catalogue online.

Pure (torch/numpy/pandas): the fine-tuner (:mod:`model.finetune`) grows a copy of the served network
when new items became frequent enough, and a worker grows its copy the same way when it applies a
published model.
"""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import torch

from model.network import GRU4RecNet
from model.vocab import Vocabulary

# parameters with one row per item: grown when the vocabulary grows
ITEM_ROW_PARAMS = ("Wy.weight", "By.weight", "E.weight", "GE.Wx0.weight")


def grow_net(net: GRU4RecNet, n_items: int, init_rows: dict[str, torch.Tensor]) -> GRU4RecNet:
    """A grown copy of ``net`` with ``n_items`` rows: old rows kept, new rows from ``init_rows[name]``
    (parameter name -> tensor of the new rows; tables not named keep the network's own init)."""
    old_n = net.n_items
    if n_items < old_n:
        raise ValueError(f"vocabulary can only grow ({old_n} -> {n_items})")
    new = copy.deepcopy(net)
    new.expand_items(n_items)
    with torch.no_grad():
        for name, p in new.named_parameters():
            if name in init_rows and n_items > old_n and p.shape[0] == n_items:
                p[old_n:] = init_rows[name].to(p.dtype)
    return new


def cooccurrence_init(net: GRU4RecNet, rows: np.ndarray, sessions: np.ndarray, n_old: int, n_new: int,
                      noise: float = 0.01, seed: int = 0) -> dict[str, torch.Tensor]:
    """Initial vectors of new rows ``n_old..n_old+n_new-1``: the mean vector of the known items they
    share sessions with (co-occurrence weighted); small noise for a new item with no known neighbour."""
    pairs = pd.DataFrame({"s": sessions, "r": rows}).drop_duplicates()
    new = pairs[pairs["r"] >= n_old]
    old = pairs[(pairs["r"] >= 0) & (pairs["r"] < n_old)]
    joined = new.merge(old, on="s", suffixes=("_new", "_old"))
    idx_new = np.array(joined["r_new"].to_numpy() - n_old, dtype=np.int64)
    idx_old = np.array(joined["r_old"].to_numpy(), dtype=np.int64)
    counts = np.bincount(idx_new, minlength=n_new).astype(np.float32)
    gen = torch.Generator().manual_seed(seed)
    state = net.state_dict()
    out: dict[str, torch.Tensor] = {}
    for name in ITEM_ROW_PARAMS:
        if name not in state or state[name].shape[0] != n_old:
            continue
        w = state[name].detach().float()
        sums = torch.zeros((n_new,) + tuple(w.shape[1:]))
        if len(idx_new):
            sums.index_add_(0, torch.from_numpy(idx_new), w[torch.from_numpy(idx_old)])
        c = torch.from_numpy(np.maximum(counts, 1.0)).reshape((-1,) + (1,) * (w.dim() - 1))
        mean = sums / c
        scale = noise * float(w.std()) if w.numel() > 1 else noise
        lonely = torch.from_numpy(counts == 0)
        if bool(lonely.any()):
            mean[lonely] = torch.randn((int(lonely.sum()),) + tuple(w.shape[1:]), generator=gen) * scale
        out[name] = mean.to(state[name].dtype)
    return out


def frequent_new_items(items: pd.Series, vocab: Vocabulary, min_count: int) -> list[str]:
    """The ids in ``items`` seen at least ``min_count`` times that ``vocab`` lacks, most frequent first
    (ties by id, so the rows they get do not depend on the order of the events)."""
    freq = items.value_counts()
    freq = freq[freq >= min_count]
    return sorted((i for i in freq.index if i not in vocab), key=lambda i: (-int(freq[i]), i))
