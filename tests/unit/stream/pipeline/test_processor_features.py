"""The worker steps the hidden state with the side features (category, price, time gap) exactly as
offline evaluation does, across micro-batches and session gaps."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from model.features import feature_matrix
from model.network import GRU4RecNet
from model.params import GRU4RecParams
from model.recommender import Recommender
from model.vocab import Vocabulary
from state.store import MemoryStore
from stream.pipeline.events import Event
from stream.pipeline.processor import ProcessorConfig, process_batch

GAP_MS = 60_000
CFG = ProcessorConfig(k=5, session_gap_ms=GAP_MS)


def _featured_model(feature_dim: int) -> Recommender:
    params = GRU4RecParams(layers=(16,), seed=5, category_feature=True, price_feature=True, time_feature=True,
                           feature_dim=feature_dim)
    net = GRU4RecNet(30, params, n_categories=4)
    net.categories = Vocabulary(["c0", "c1", "c2"])
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # trained-like, non-zero feature rows (row 0 = absent stays zero)
        for emb in (net.C, net.P, net.D):
            emb.weight[1:] = torch.randn(emb.weight.shape[0] - 1, emb.weight.shape[1], generator=gen)
    return Recommender(net, Vocabulary(f"i{r}" for r in range(30)), version=1)


# (user, item, ts_ms, category, price): user a has a session gap before its last two events; "c9" is
# a category the model does not know (absent), and some events carry no price or category
STREAM = [("a", "i1", 1_000_000, "c0", 12.5), ("b", "i2", 1_000_500, "c1", None), ("a", "i4", 1_003_000, "c0", 99.0),
          ("b", "i7", 1_010_000, None, 3.0), ("a", "i4", 1_020_000, "c2", 99.0), ("b", "i2", 1_011_000, "c9", 0.5),
          ("a", "i9", 1_200_000, "c1", 40.0), ("a", "i3", 1_200_900, "c1", 41.0)]


def _events(with_features: bool) -> list[Event]:
    return [Event(u, i, 1, ts, u.encode(), "clicks", 0, n, ts, 0, p if with_features else None,
                  c if with_features else None) for n, (u, i, ts, c, p) in enumerate(STREAM)]


def _worker_states(model: Recommender, events: list[Event]) -> dict[bytes, np.ndarray]:
    store = MemoryStore()
    for part in (events[:3], events[3:]):  # two micro-batches: the gap of event 3 reads the stored time
        keys = list(dict.fromkeys(e.key for e in part))
        store.put_many(process_batch(model, part, store.get_many(keys), CFG).states)
    return {k: store.get_many([k])[k].hidden for k in (b"a", b"b")}


def _offline_states(model: Recommender) -> dict[bytes, np.ndarray]:
    """Each user's last session stepped one event at a time with model.features' offline rows."""
    rows = []
    for user, item, ts, cat, price in STREAM:
        rows.append({"User": user, "ItemId": item, "Time": ts / 1000.0, "Category": cat,
                     "Price": np.nan if price is None else price})
    df = pd.DataFrame(rows).sort_values(["User", "Time"], kind="stable").reset_index(drop=True)
    new = (df["User"] != df["User"].shift()) | (df["Time"].diff() > GAP_MS / 1000.0)
    df["SessionId"] = new.cumsum()
    feats = feature_matrix(df, model.net.categories)
    out = {}
    for user, part in df.groupby("User"):
        last = part[part["SessionId"] == part["SessionId"].max()]
        h = model.zero_state(1)
        for i in last.index:
            h = model.step(h, np.array([model.vocab.row(df.at[i, "ItemId"])]), np.array([1]), feats[i:i + 1])
        out[user.encode()] = h[0]
    return out


@pytest.mark.parametrize("feature_dim", [0, 6], ids=["summed", "concatenated"])
def test_worker_steps_with_features_equal_offline_steps(feature_dim: int) -> None:
    model = _featured_model(feature_dim)
    worker = _worker_states(model, _events(with_features=True))
    offline = _offline_states(model)
    for key in (b"a", b"b"):
        np.testing.assert_allclose(worker[key], offline[key], rtol=1e-5, atol=1e-6)
    # the features matter: without category and price the worker ends elsewhere
    plain = _worker_states(model, _events(with_features=False))
    assert not np.allclose(plain[b"a"], worker[b"a"], atol=1e-4)
