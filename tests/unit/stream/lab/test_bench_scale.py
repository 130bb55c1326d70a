"""The scale bench's pieces that need no broker: sizes, recall against the exact top-K, the worker's index log."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.network import GRU4RecNet
from model.params import GRU4RecParams
from model.recommender import Recommender
from model.vocab import Vocabulary
from stream.lab.bench_scale import index_times, parse_items, recall_vs_exact


def test_item_sizes_parse_one_or_many() -> None:
    assert parse_items("20000") == [20000]
    assert parse_items("20000,200_000,1000000") == [20000, 200000, 1000000]
    assert parse_items(5000) == [5000]
    for bad in ("", "1", "20000,0"):
        with pytest.raises(ValueError, match="--items"):
            parse_items(bad)


def test_recall_counts_the_exact_top_k_found() -> None:
    n, h, k = 500, 8, 10
    net = GRU4RecNet(n, GRU4RecParams(layers=(h,), seed=1))
    with torch.no_grad():
        net.By.weight.copy_(torch.randn(n, 1))
    model = Recommender(net, Vocabulary(f"i{r}" for r in range(n)), version=1)
    hidden = np.tanh(np.random.default_rng(0).normal(size=(70, h))).astype(np.float32)
    exact, _ = model.top_k(hidden, k)
    assert recall_vs_exact(model, exact, hidden, k) == 1.0
    half = exact.copy()
    half[:, k // 2:] = -2  # half of every list replaced by no item
    assert recall_vs_exact(model, half, hidden, k) == 0.5


def test_index_times_come_from_the_worker_log() -> None:
    log = ("2026-12-07 INFO retrieval index for model version 1 (1000000 items, 2048 lists): full build in 31.52 s\n"
           "2026-12-07 INFO retrieval index for model version 2 (1000000 items, 2048 lists): 10,000 changed rows "
           "re-indexed in 1.25 s\n")
    assert index_times(log) == {"index_build_s": 31.52, "index_lists": 2048, "index_update_s": 1.25,
                                "index_update_rows": "10,000"}
    assert index_times("no index here") == {}
