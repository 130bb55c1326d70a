"""Online fine-tuning: the holdout split, the configuration, and guarded rounds on synthetic data with
the real training and evaluation code (the buffer and vocabulary growth have tests of their own)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import torch

from model.finetune import FineTuneConfig, FineTuner, ModelState
from model.guardrail import split_recent
from model.network import GRU4RecNet
from model.params import OFFICIAL, GRU4RecParams
from model.session_buffer import SessionBuffer
from model.vocab import Vocabulary


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

    net = GRU4RecNet(6, GRU4RecParams(layers=(8,), seed=1))
    pop = np.array([9.0, 8.0, 7.0, 1.0, 1.0, 1.0])
    rec = Recommender(net, Vocabulary(list("abcdef")), 2, pop, {"retired_rows": [0, 2]})
    rows, _ = rec.top_k(rec.zero_state(3), 4)
    assert rows.shape == (3, 4) and not np.isin(rows, [0, 2]).any()
    assert rec.popular(3)[0].tolist() == [1, 3, 4]
    plain = Recommender(net, Vocabulary(list("abcdef")), 1, pop)
    assert plain.popular(2)[0].tolist() == [0, 1]
