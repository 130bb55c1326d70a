"""Side features (model.features): buckets, growing category vocabulary, use by a trained model,
checkpoints that carry them."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from model.checkpoint import checkpoint_from_bytes, checkpoint_to_bytes
from model.features import CATEGORY, GAP, N_GAP_BUCKETS, PRICE, feature_matrix, price_buckets
from model.params import GRU4RecParams
from model.synthetic import generate
from model.train import features_for, fit, train_model
from model.vocab import Vocabulary

SMALL = "layers=24,n_epochs=2,batch_size=32,n_sample=64,loss=cross-entropy,logq=0,dropout_p_hidden=0"


def test_feature_rows_absent_buckets_and_growth() -> None:
    df = pd.DataFrame({"SessionId": [1, 1, 1, 2], "ItemId": ["a", "b", "c", "a"], "Time": [0.0, 1.0, 5000.0, 0.0],
                       "Category": ["x", None, "y", ""], "Price": [10.0, np.nan, -1.0, 1e9]})
    cats = Vocabulary(["x"])
    f = feature_matrix(df, cats)
    assert f[:, CATEGORY].tolist() == [1, 0, 0, 0]  # unknown "y", None and "" are absent
    assert f[0, PRICE] > 0 and f[1, PRICE] == 0 and f[2, PRICE] == 0 and f[3, PRICE] == price_buckets([5e9])[0]
    assert f[0, GAP] == 0 and f[3, GAP] == 0  # first event of each session
    assert 0 < f[1, GAP] < f[2, GAP] == N_GAP_BUCKETS - 1  # longer gaps, higher buckets, clipped
    grown = feature_matrix(df, cats, grow=True)
    assert grown[2, CATEGORY] == 2 and cats.ids == ["x", "y"]


def _scores(net, vocab, df: pd.DataFrame) -> torch.Tensor:
    """Top-layer scores after every event of ``df``'s sessions, stepped with its feature rows."""
    f = features_for(net, df)
    feats = torch.from_numpy(f) if f is not None else None
    rows = torch.from_numpy(vocab.rows(list(df["ItemId"])))
    types = torch.from_numpy(df["EventType"].to_numpy().astype(np.int64))
    out, H, prev = [], net.init_hidden(1), None
    with torch.no_grad():
        for i, sid in enumerate(df["SessionId"].tolist()):
            if sid != prev:
                H, prev = net.init_hidden(1), sid
            out.append(net.score_items(net.step(rows[i:i + 1], H, types[i:i + 1], features=None if feats is None else feats[i:i + 1])))
    return torch.cat(out)


def _permuted_categories(df: pd.DataFrame) -> pd.DataFrame:
    cats = sorted(df["Category"].unique())
    perm = dict(zip(cats, np.random.default_rng(0).permutation(cats)))
    return df.assign(Category=df["Category"].map(perm))


@pytest.mark.parametrize("feature_dim", [0, 8], ids=["summed", "concatenated"])
def test_permuting_categories_changes_the_scores_of_a_trained_model(feature_dim: int) -> None:
    data = generate(1500, n_items=150, seed=3)
    params = GRU4RecParams.parse(SMALL + f",category_feature=1,feature_dim={feature_dim}")
    net, vocab, _ = train_model(data, params, progress=False)
    assert len(net.categories) == data["Category"].nunique()
    weight = net.C.weight.detach()
    assert float(weight[1:].abs().sum()) > 0 and float(weight[0].abs().sum()) == 0
    probe = data[data["SessionId"] < 40].reset_index(drop=True)
    diff = (_scores(net, vocab, probe) - _scores(net, vocab, _permuted_categories(probe))).abs().max()
    assert float(diff) > 1e-2
    # without the feature the same permutation changes nothing: the difference comes from the embedding
    plain, pvocab, _ = train_model(data, GRU4RecParams.parse(SMALL), progress=False)
    assert torch.equal(_scores(plain, pvocab, probe), _scores(plain, pvocab, _permuted_categories(probe)))


@pytest.mark.parametrize("feature_dim", [0, 8], ids=["summed", "concatenated"])
def test_checkpoint_round_trip_keeps_feature_tables_and_categories(feature_dim: int) -> None:
    data = generate(400, n_items=60, seed=4)
    params = GRU4RecParams.parse(SMALL + f",n_epochs=1,category_feature=1,price_feature=1,time_feature=1,"
                                         f"feature_dim={feature_dim}")
    net, vocab, pop = train_model(data, params, progress=False)
    back = checkpoint_from_bytes(checkpoint_to_bytes(net, vocab, params, pop))
    assert back.params == params and back.net.categories.ids == net.categories.ids
    for name in ("C.weight", "P.weight", "D.weight"):
        assert torch.equal(back.net.state_dict()[name], net.state_dict()[name])
    probe = data[data["SessionId"] < 10].reset_index(drop=True)
    assert torch.equal(_scores(back.net, back.vocab, probe), _scores(net, vocab, probe))


def test_category_table_grows_online_and_keeps_old_rows() -> None:
    data = generate(300, n_items=60, seed=5)
    params = GRU4RecParams.parse(SMALL + ",n_epochs=1,category_feature=1")
    net, vocab, _ = train_model(data, params, progress=False)
    before = net.C.weight.detach().clone()
    more = data.assign(Category=data["Category"] + "-new")
    fit(net, more, params, item_rows=vocab, progress=False)
    assert len(net.categories) == 2 * data["Category"].nunique()
    assert net.C.weight.shape[0] == len(net.categories) + 1
    assert not torch.equal(net.C.weight[len(before):], torch.zeros_like(net.C.weight[len(before):]))


@pytest.mark.parametrize("feature_dim", [0, 5], ids=["summed", "concatenated"])
def test_hand_written_backward_with_features_matches_autograd(feature_dim: int, monkeypatch) -> None:
    """Training's hand-written backward (feature rows updated sparsely, the concatenated input's
    gradient split) gives the same weights as autograd through GRU4RecNet.step_rows."""
    from model.network import GRU4RecNet
    from model.train import _Trainer

    data = generate(60, n_items=20, seed=6)
    vocab = Vocabulary(sorted(data["ItemId"].unique()))
    params = GRU4RecParams(layers=(8,), batch_size=4, n_sample=6, dropout_p_hidden=0.0, n_epochs=1,
                           category_feature=True, price_feature=True, time_feature=True, feature_dim=feature_dim)
    nets = [GRU4RecNet(len(vocab), params) for _ in range(2)]
    fit(nets[0], data, params, item_rows=vocab, progress=False, seed=7)
    original = _Trainer.__init__

    def autograd_init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.manual = False

    monkeypatch.setattr(_Trainer, "__init__", autograd_init)
    fit(nets[1], data, params, item_rows=vocab, progress=False, seed=7)
    assert float(nets[0].C.weight.detach()[1:].abs().sum()) > 0
    for (name, a), b in zip(nets[0].state_dict().items(), nets[1].state_dict().values()):
        assert torch.allclose(a, b, atol=2e-5), name


def test_online_buffer_carries_category_and_price_into_training() -> None:
    from model.session_buffer import SessionBuffer

    buf = SessionBuffer(max_events=100, max_age_s=3600.0)
    for n, (user, item, cat, price) in enumerate([("u", "i1", "c1", 9.5), ("u", "i2", "c2", None), ("v", "i1", None, 3.0)]):
        buf.add(user, item, 1000.0 + n, 1, cat, price)
    frame = buf.to_frame()
    assert frame["Category"].tolist() == ["c1", "c2", None]
    assert frame["Price"].iloc[0] == 9.5 and np.isnan(frame["Price"].iloc[1])
    params = GRU4RecParams.parse(SMALL + ",n_epochs=1,n_sample=0,category_feature=1")
    net, vocab, _ = train_model(generate(100, n_items=20, seed=1), params, progress=False)
    fit(net, frame.assign(ItemId=["i1", "i2", "i1"]).drop(columns=["Recent"]), params, item_rows=vocab, progress=False)
    assert {"c1", "c2"} <= set(net.categories.ids)
