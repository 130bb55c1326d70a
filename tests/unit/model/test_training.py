"""Training on synthetic data: a GRU beats popularity, fit continues from served weights, determinism."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from model.baselines import evaluate_baseline
from model.data import split_by_time
from model.evaluate import evaluate
from model.network import GRU4RecNet
from model.params import OFFICIAL, GRU4RecParams
from model.recommender import Recommender
from model.synthetic import generate
from model.train import build_vocabulary, fit, train_model

# the official (cross-entropy) config made small: these tests check mechanics, not the shipped defaults
SMALL = dataclasses.replace(OFFICIAL, layers=(48,), n_epochs=3, batch_size=32, n_sample=256, learning_rate=0.1)


@pytest.fixture(scope="module")
def split():
    df = generate(n_sessions=4000, n_items=400, seed=11, span_days=10.0)
    return split_by_time(df, days=2.0)


def test_synthetic_is_deterministic_and_structured() -> None:
    a, b = generate(300, 100, seed=5), generate(300, 100, seed=5)
    pd_equal = a.equals(b)
    assert pd_equal
    assert not a.equals(generate(300, 100, seed=6))
    assert set(a["EventType"].unique()) >= {0, 2, 3}
    # purchases follow a cart of the same item in the same session
    carts = set(zip(a.SessionId[a.EventType == 2], a.ItemId[a.EventType == 2]))
    buys = set(zip(a.SessionId[a.EventType == 3], a.ItemId[a.EventType == 3]))
    assert buys and buys <= carts


def test_gru_beats_popularity_on_synthetic(split) -> None:
    train, test = split
    net, vocab, pop = train_model(train, SMALL, progress=False)
    gru = evaluate(net, vocab, test)
    popular = evaluate_baseline("popularity", train, test)
    assert gru["n_events"] == popular["n_events"] > 1000
    assert gru["recall"]["20"] > popular["recall"]["20"] + 0.15
    assert gru["mrr"]["20"] > popular["mrr"]["20"] + 0.1
    assert pop.shape == (len(vocab),) and pop.sum() == len(train)


def test_fit_is_deterministic_for_a_seed(split) -> None:
    train, _ = split
    small = train[train.SessionId < train.SessionId.min() + 300]
    vocab = build_vocabulary(small)
    nets = [GRU4RecNet(len(vocab), SMALL) for _ in range(2)]
    for net in nets:
        fit(net, small, SMALL, n_epochs=1, item_rows=vocab, progress=False)
    for a, b in zip(nets[0].state_dict().values(), nets[1].state_dict().values()):
        assert torch.equal(a, b)


def test_fit_continues_from_served_weights_on_micro_batches(split) -> None:
    train, test = split
    net, vocab, pop = train_model(train, SMALL, progress=False)
    served = Recommender(copy.deepcopy(net), vocab, 1, pop)
    before = evaluate(served, None, test)
    recent = train[train.Time > train.Time.max() - 86400.0]
    tuned = copy.deepcopy(net)
    summary = fit(tuned, recent, SMALL, n_epochs=1, item_rows=vocab, progress=False)
    assert summary["events"] > 0 and np.isfinite(summary["loss"][0])
    changed = [not torch.equal(a, b) for a, b in zip(net.state_dict().values(), tuned.state_dict().values())]
    assert any(changed)
    after = evaluate(Recommender(tuned, vocab, 2, pop), None, test)
    # a short fine-tune on recent data keeps the model useful (no reset, no blow-up)
    assert after["recall"]["20"] > 0.8 * before["recall"]["20"]
    # the served copy is untouched
    assert evaluate(served, None, test) == before


def test_fit_with_unknown_items_and_grown_tables(split) -> None:
    train, _ = split
    vocab = build_vocabulary(train)
    net = GRU4RecNet(len(vocab), SMALL)
    old_rows = net.Wy.weight.detach().clone()
    extra = train.head(50).copy()
    extra["ItemId"] = extra["ItemId"] + "-new"
    for item in extra["ItemId"].unique():
        vocab.add(item)
    with pytest.raises(ValueError, match="expand_items"):
        fit(net, extra, SMALL, n_epochs=1, item_rows=vocab, progress=False)
    net.expand_items(len(vocab))
    assert torch.equal(net.Wy.weight[: len(old_rows)], old_rows)
    summary = fit(net, extra, SMALL, n_epochs=1, item_rows=vocab, progress=False)
    assert summary["events"] > 0


def test_other_modes_train_without_error(split) -> None:
    train, test = split
    small = train[train.SessionId < train.SessionId.min() + 400]
    for changes in ({"loss": "bpr-max", "bpreg": 1.0, "elu_param": 0.5, "momentum": 0.3},
                    {"constrained_embedding": False, "embedding": 16, "layers": (24, 16), "dropout_p_embed": 0.1},
                    {"constrained_embedding": False, "embedding": 0, "layers": (24,), "n_sample": 0},
                    {"event_types": False, "logq": 0.0}):
        params = GRU4RecParams(**{**SMALL.to_dict(), "layers": SMALL.layers, "n_epochs": 1, **changes})
        net, vocab, _ = train_model(small, params, progress=False)
        res = evaluate(net, vocab, test, cutoffs=(20,))
        assert 0.0 < res["recall"]["20"] <= 1.0, changes
