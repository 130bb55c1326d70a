"""Ranking with ties, the evaluation protocol, and the baselines."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from model.baselines import CooccurrenceModel, evaluate_baseline
from model.evaluate import Accumulator, evaluate
from model.network import GRU4RecNet
from model.params import GRU4RecParams
from model.vocab import Vocabulary


def test_ranks_standard_and_conservative_ties() -> None:
    scores = torch.tensor([[0.5, 2.0, 2.0, 1.0, 2.0],
                           [3.0, 1.0, 1.0, 1.0, 0.0]])
    targets = torch.tensor([1, 2])
    std = Accumulator((1, 3), "standard")
    con = Accumulator((1, 3), "conservative")
    assert std.ranks(scores, targets).tolist() == [1, 2]  # #(>) + 1
    assert con.ranks(scores, targets).tolist() == [3, 4]  # #(>=)
    std.add(std.ranks(scores, targets))
    res = std.result()
    assert res["recall"] == {"1": 0.5, "3": 1.0}
    assert res["mrr"]["3"] == pytest.approx((1.0 + 0.5) / 2)
    assert res["tie"] == "standard" and res["n_events"] == 2
    con.add(con.ranks(scores, targets))
    assert con.result()["recall"] == {"1": 0.0, "3": 0.5}


def _table(rows):
    return pd.DataFrame(rows, columns=["SessionId", "ItemId", "Time", "EventType"]).astype(
        {"SessionId": "int64", "Time": "float64", "EventType": "int8"})


def test_protocol_drops_unknown_items_and_counts_predictions() -> None:
    vocab = Vocabulary(["a", "b", "c"])
    net = GRU4RecNet(3, GRU4RecParams(layers=(4,)))
    test = _table([(1, "a", 0.0, 1), (1, "zzz", 1.0, 1), (1, "b", 2.0, 1), (1, "c", 3.0, 1),
                   (2, "c", 5.0, 1), (2, "zzz", 6.0, 1)])
    res = evaluate(net, vocab, test, cutoffs=(1, 3))
    # session 1 becomes a, b, c (2 predictions); session 2 has one known event (none)
    assert res["n_events"] == 2
    assert res["recall"]["3"] == 1.0  # only 3 items exist
    assert set(res) == {"recall", "mrr", "n_events", "tie"}


def test_hidden_state_starts_at_zero_for_every_test_session() -> None:
    """A session's metrics do not depend on which sessions ran before it in the same slot."""
    vocab = Vocabulary([str(i) for i in range(10)])
    net = GRU4RecNet(10, GRU4RecParams(layers=(6,)))
    with torch.no_grad():
        net.Wy.weight.normal_(0, 1, generator=torch.Generator().manual_seed(0))
    s = [(0, "1", 0.0, 1), (0, "2", 1.0, 1), (0, "3", 2.0, 1)]
    alone = evaluate(net, vocab, _table(s), cutoffs=(1, 2, 5), batch_size=1)
    other = [(9, "7", -10.0, 1), (9, "8", -9.0, 1), (9, "9", -8.0, 1), (9, "1", -7.0, 1)]
    both = evaluate(net, vocab, _table(other + s), cutoffs=(1, 2, 5), batch_size=1)
    first = evaluate(net, vocab, _table(other), cutoffs=(1, 2, 5), batch_size=1)
    for k in ("1", "2", "5"):
        combined = (first["mrr"][k] * 3 + alone["mrr"][k] * 2) / 5
        assert both["mrr"][k] == pytest.approx(combined)


def test_cooccurrence_counts_next_items_and_fills_by_popularity() -> None:
    train = _table([(1, "a", 0, 1), (1, "b", 1, 1), (2, "a", 2, 1), (2, "b", 3, 1), (3, "a", 4, 1), (3, "c", 5, 1),
                    (4, "d", 6, 1), (4, "d", 7, 1), (4, "d", 8, 1), (4, "d", 9, 1)])
    m = CooccurrenceModel(train)
    rows = {i: m.vocab.row(i) for i in "abcd"}
    s = m.scores(torch.tensor([rows["a"]]))[0]
    assert s[rows["b"]] > s[rows["c"]] > s[rows["d"]] > s[rows["a"]]
    # c never follows b: ordered by popularity (d most popular) below any co-occurring item
    s = m.scores(torch.tensor([rows["c"]]))[0]
    assert int(torch.argmax(s)) == rows["d"]


def test_baselines_output_shape_and_both_tie_modes() -> None:
    train = _table([(s, str((s + k) % 5), s * 10.0 + k, 1) for s in range(30) for k in range(3)])
    test = _table([(100 + s, str((s + k) % 5), 1000.0 + s * 10 + k, 1) for s in range(5) for k in range(3)])
    for name in ("popularity", "cooccurrence"):
        std = evaluate_baseline(name, train, test, cutoffs=(1, 5))
        con = evaluate_baseline(name, train, test, cutoffs=(1, 5), tie="conservative")
        assert std["n_events"] == con["n_events"] == 10
        assert con["recall"]["1"] <= std["recall"]["1"]
    assert evaluate_baseline("cooccurrence", train, test, cutoffs=(1,))["recall"]["1"] == 1.0
