"""Online fine-tuning parts: the bounded session buffer, holdout split, vocabulary growth, and a
guarded round on synthetic data with the real training and evaluation code."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import torch

from model.finetune import (FineTuneConfig, FineTuner, ModelState, SessionBuffer, cooccurrence_init, grow_net,
                            split_recent)
from model.network import GRU4RecNet
from model.params import OFFICIAL, GRU4RecParams
from model.vocab import Vocabulary


def _fill(buf: SessionBuffer, n_users: int, per_user: int, t0: float = 1000.0, step: float = 10.0) -> None:
    t = t0
    for u in range(n_users):
        for e in range(per_user):
            buf.add(f"u{u}", f"i{(u + e) % 7}", t, 1)
            t += step


def test_buffer_bounded_by_count_and_reports_bytes() -> None:
    buf = SessionBuffer(max_events=50, max_age_s=1e9, session_gap_s=1e9)
    sizes = []
    for u in range(40):
        for e in range(3):
            buf.add(f"user{u}", f"item{e}", 1000.0 + u * 10 + e, 1)
        sizes.append(buf.nbytes)
        assert buf.n_events <= 50
    assert buf.n_events > 40
    assert buf.nbytes > 0
    assert max(sizes[20:]) - min(sizes[20:]) < min(sizes[20:])  # steady once full, not growing
    df = buf.to_frame()
    assert len(df) == buf.n_events
    assert set(df.columns) >= {"SessionId", "ItemId", "Time", "EventType"}
    assert df["SessionId"].dtype == np.int64 and df["Time"].dtype == np.float64 and df["EventType"].dtype == np.int8
    # the newest users are kept, the oldest evicted
    assert df["Time"].max() == 1000.0 + 39 * 10 + 2


def test_buffer_bounded_by_event_time_age() -> None:
    buf = SessionBuffer(max_events=10_000, max_age_s=100.0, session_gap_s=1e9)
    for i in range(100):
        buf.add(f"u{i}", "a", float(i * 10), 1)
    df = buf.to_frame()
    assert df["Time"].min() >= buf.newest_time - 100.0
    assert buf.n_events == len(df) < 100


def test_session_gap_splits_a_users_events() -> None:
    buf = SessionBuffer(max_events=100, max_age_s=1e9, session_gap_s=60.0)
    for t in (0.0, 10.0, 20.0, 500.0, 510.0):
        buf.add("u", "x", t, 1)
    df = buf.to_frame()
    assert df.groupby("SessionId").size().sort_index().tolist() == [3, 2]


def test_reservoir_keeps_a_bounded_sample_of_evicted_sessions() -> None:
    buf = SessionBuffer(max_events=20, max_age_s=1e9, session_gap_s=1e9, reservoir_sessions=5, seed=3)
    _fill(buf, n_users=60, per_user=2)
    assert buf.reservoir_size == 5
    df = buf.to_frame()
    assert (~df["Recent"]).sum() == 10  # 5 sessions x 2 events
    assert len(buf.to_frame(include_reservoir=False)) == buf.n_events


def test_drain_stats_counts_since_last_call() -> None:
    buf = SessionBuffer(max_events=100, max_age_s=1e9)
    buf.add("u", "a", 1.0)
    buf.add("u", "a", 2.0)
    buf.add("v", "b", 3.0)
    counts, last = buf.drain_stats()
    assert counts == {"a": 2, "b": 1} and last == {"a": 2.0, "b": 3.0}
    counts, last = buf.drain_stats()
    assert not counts and not last


def test_split_recent_holds_out_the_latest_sessions() -> None:
    rows = []
    for s in range(10):
        for e in range(4):
            rows.append((s, f"i{e}", float(s * 100 + e), 1, True))
    df = pd.DataFrame(rows, columns=["SessionId", "ItemId", "Time", "EventType", "Recent"])
    train, hold = split_recent(df, 0.25, 1)
    assert len(train) + len(hold) == len(df)
    assert set(hold["SessionId"]) == {7, 8, 9}  # 25% of 40 events = 10 -> 3 sessions of 4
    assert train["Time"].max() < hold["Time"].min()


def _net(n: int, seed: int = 1) -> GRU4RecNet:
    return GRU4RecNet(n, GRU4RecParams(layers=(8,), seed=seed))


@pytest.mark.parametrize("extra", [{}, {"constrained_embedding": False, "embedding": 6},
                                   {"constrained_embedding": False, "embedding": 0}])
def test_grow_net_keeps_old_rows_and_scores(extra: dict) -> None:
    params = GRU4RecParams(layers=(8,), seed=1, **extra)
    net = GRU4RecNet(5, params)
    n_new = 3
    init = {name: torch.full((n_new,) + tuple(p.shape[1:]), 0.5)
            for name, p in net.state_dict().items() if p.dim() >= 1 and p.shape[0] == 5}
    grown = grow_net(net, 8, init)
    assert grown.n_items == 8
    for name, p in net.state_dict().items():
        q = grown.state_dict()[name]
        if p.shape[0] == 5 and name in init:
            assert torch.equal(q[:5], p) and torch.all(q[5:] == 0.5)
        else:
            assert torch.equal(q, p)
    net.eval()
    grown.eval()
    H1, H2 = net.init_hidden(2), grown.init_hidden(2)
    X = torch.tensor([0, 3])
    with torch.no_grad():
        s1 = net(X, H1, None)
        s2 = grown(X, H2, None)
    assert torch.allclose(s1, s2[:, :5])
    with pytest.raises(ValueError):
        grow_net(net, 4, {})


def test_cooccurrence_init_is_the_mean_of_neighbours() -> None:
    net = _net(4)
    w = net.Wy.weight.detach()
    # new row 4 shares session 0 with rows 0 and 1, session 1 with row 2; new row 5 has no known neighbour
    sessions = np.array([0, 0, 0, 1, 1, 2, 2])
    rows = np.array([0, 1, 4, 2, 4, 5, -1])
    init = cooccurrence_init(net, rows, sessions, n_old=4, n_new=2, noise=0.01)
    expected = (w[0] + w[1] + w[2]) / 3
    assert torch.allclose(init["Wy.weight"][0], expected, atol=1e-6)
    lonely = init["Wy.weight"][1]
    assert float(lonely.abs().max()) < float(w.abs().max())  # small noise, not a copy
    assert not torch.equal(lonely, torch.zeros_like(lonely))
    assert init["By.weight"].shape == (2, 1)


def test_config_from_settings_takes_shared_fields() -> None:
    class S:
        buffer_max_events = 7
        guardrail_tolerance = 0.5
        unrelated = 1

    cfg = FineTuneConfig.from_settings(S(), n_epochs=2)
    assert cfg.buffer_max_events == 7 and cfg.guardrail_tolerance == 0.5 and cfg.n_epochs == 2


@pytest.fixture(scope="module")
def stream_setup():
    """A small base model trained on the first part of a synthetic stream, and the later part."""
    from model.synthetic import generate
    from model.train import train_model

    torch.set_num_threads(1)
    df = generate(n_sessions=1500, n_items=150, seed=5, span_days=2.0)
    cut = float(df["Time"].quantile(0.3))
    first = df.groupby("SessionId")["Time"].transform("min") < cut
    base_df = df[first]
    # hold some items back from the base model so the stream brings new ones
    held_items = set(sorted(df["ItemId"].unique())[:20])
    base_df = base_df[~base_df["ItemId"].isin(held_items)]
    params = dataclasses.replace(OFFICIAL, layers=(32,), n_sample=64, batch_size=32, n_epochs=2, learning_rate=0.05)
    net, vocab, pop = train_model(base_df, params, progress=False)
    return net, vocab, pop, params, df[~first]


def _buffer_from(df: pd.DataFrame) -> SessionBuffer:
    buf = SessionBuffer(max_events=5000, max_age_s=1e9, session_gap_s=1e9, reservoir_sessions=50)
    for s, i, t, e in df.sort_values("Time")[["SessionId", "ItemId", "Time", "EventType"]].itertuples(index=False):
        buf.add(str(s), i, t, e)
    return buf


def _round(stream_setup, **cfg):
    net, vocab, pop, params, later = stream_setup
    state = ModelState(net, vocab, params, pop.copy(), {"version": 1}, version=1)
    tuner = FineTuner(state, FineTuneConfig(min_holdout_events=20, min_train_events=50, **cfg))
    buf = _buffer_from(later)
    frame = buf.to_frame()
    result = tuner.run_round(frame, buf.drain_stats(), buf.first_time)
    return tuner, state, result, later


def test_round_grows_vocabulary_and_promotes_within_tolerance(stream_setup) -> None:
    before = {k: v.clone() for k, v in stream_setup[0].state_dict().items()}
    tuner, state, result, later = _round(stream_setup, guardrail_tolerance=1.0, new_item_min_count=3)
    assert result.status == "promoted", result.summary()
    assert math.isfinite(result.loss)
    cand = result.candidate
    n_old = len(state.vocab)
    assert cand.vocab.ids[:n_old] == state.vocab.ids  # append-only
    counts = later["ItemId"].value_counts()
    assert len(result.new_items) > 0
    assert all(counts[i] >= 3 and i not in state.vocab for i in result.new_items)
    assert cand.net.n_items == len(cand.vocab) == len(cand.popularity)
    assert cand.metadata["parent_version"] == 1 and cand.metadata["new_items"] == len(result.new_items)
    assert set(result.current_scores) >= {"recall", "mrr"} and set(result.candidate_scores) >= {"recall", "mrr"}
    # the served weights were not touched (the round trained a copy)
    for k, v in stream_setup[0].state_dict().items():
        assert torch.equal(v, before[k]), k
    assert tuner.current is state
    tuner.accept(cand, 2)
    assert tuner.current.version == 2 and tuner.current.metadata["version"] == 2


def test_guardrail_rejects_a_candidate_that_is_not_better_enough(stream_setup) -> None:
    # a negative tolerance demands an improvement of more than 1.0 in recall: impossible
    tuner, state, result, _ = _round(stream_setup, guardrail_tolerance=-1.0)
    assert result.status == "rejected"
    assert result.candidate_scores["recall"] < result.current_scores["recall"] + 1.0
    assert tuner.current is state


def test_retirement_marks_rows_unseen_for_long(stream_setup) -> None:
    net, vocab, pop, params, later = stream_setup
    span = float(later["Time"].max() - later["Time"].min())
    tuner, state, result, _ = _round(stream_setup, guardrail_tolerance=1.0, item_retire_after_s=span / 4)
    retired = result.candidate.metadata["retired_rows"]
    assert retired and result.retired_items == len(retired)
    recent = set(later[later["Time"] >= later["Time"].max() - span / 4]["ItemId"])
    assert not any(result.candidate.vocab.item_id(r) in recent for r in retired)


@pytest.mark.parametrize("learning_rate,why", [
    (1e30, "loss is nan"),  # fit raises FloatingPointError
    (1e6, "absurd_weights"),  # the loss stays finite, the weights do not stay sane
])
def test_a_diverged_round_is_discarded_and_the_next_one_goes_on(stream_setup, learning_rate: float, why: str) -> None:
    tuner, state, result, later = _round(stream_setup, guardrail_tolerance=1.0, learning_rate=learning_rate)
    assert result.status == "diverged" and not result.promoted and result.candidate is None
    assert why in result.reason, result.reason
    assert tuner.current is state
    # the same tuner, a sane rate: the next round trains from the unchanged current model and promotes
    tuner.config = dataclasses.replace(tuner.config, learning_rate=0.05)
    buf = _buffer_from(later)
    again = tuner.run_round(buf.to_frame(), buf.drain_stats(), buf.first_time)
    assert again.status == "promoted", again.summary()


def test_round_skips_when_the_buffer_is_too_small(stream_setup) -> None:
    net, vocab, pop, params, later = stream_setup
    tuner = FineTuner(ModelState(net, vocab, params, pop, {}, 1), FineTuneConfig())
    buf = _buffer_from(later.head(30))
    result = tuner.run_round(buf.to_frame(), buf.drain_stats())
    assert result.status == "skipped" and result.candidate is None


def test_recommender_never_recommends_retired_rows() -> None:
    from model.recommender import Recommender

    net = _net(6)
    pop = np.array([9.0, 8.0, 7.0, 1.0, 1.0, 1.0])
    rec = Recommender(net, Vocabulary(list("abcdef")), 2, pop, {"retired_rows": [0, 2]})
    rows, _ = rec.top_k(rec.zero_state(3), 4)
    assert rows.shape == (3, 4) and not np.isin(rows, [0, 2]).any()
    assert rec.popular(3)[0].tolist() == [1, 3, 4]
    plain = Recommender(net, Vocabulary(list("abcdef")), 1, pop)
    assert plain.popular(2)[0].tolist() == [0, 1]
