"""Trainer.run_round without a broker: a diverged round is counted and discarded, nothing is published,
and the trainer goes on to promote the next sane round. Publishing is replaced by a recorder (the
broker-backed trainer is in tests/integration/test_model_refusals.py)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from model.checkpoint import checkpoint_from_bytes
from model.finetune import FineTuneConfig, FineTuner, ModelState, SessionBuffer
from model.network import GRU4RecNet
from model.params import OFFICIAL
from model.synthetic import generate
from model.vocab import Vocabulary
from model.weight_check import weight_problem
from stream.observe.metrics import Metrics
from stream.settings import Settings
from stream.online.trainer import Trainer


@pytest.fixture(scope="module")
def setup():
    """An untrained network over a synthetic shop's items (the guardrail is opened wide below, so the
    verdict only depends on divergence), and a buffer of that shop's sessions."""
    torch.set_num_threads(1)
    df = generate(n_sessions=600, n_items=80, seed=9, span_days=1.0)
    params = dataclasses.replace(OFFICIAL, layers=(16,), n_sample=32, batch_size=16)
    vocab = Vocabulary(sorted(df["ItemId"].unique()))
    buf = SessionBuffer(max_events=5000, max_age_s=1e9, session_gap_s=1e9)
    for s, i, t, e in df.sort_values("Time")[["SessionId", "ItemId", "Time", "EventType"]].itertuples(index=False):
        buf.add(str(s), i, t, e)
    return ModelState(GRU4RecNet(len(vocab), params), vocab, params, np.ones(len(vocab)), {"version": 3}, 3), buf


def _value(metrics: Metrics, name: str) -> float:
    return metrics.registry.get_sample_value(name) or 0.0


def test_a_diverged_round_is_discarded_and_the_trainer_goes_on(setup, tmp_path) -> None:
    state, buf = setup
    metrics = Metrics.create(role="trainer")
    trainer = Trainer(Settings.of(data_dir=tmp_path), metrics, serve_http=False)
    published: list[tuple[bytes, int, int]] = []
    trainer._publish = lambda data, version, parent, meta: published.append((data, version, parent))
    trainer._max_version = 3
    cfg = FineTuneConfig(min_holdout_events=20, min_train_events=50, guardrail_tolerance=1.0, learning_rate=1e30)
    trainer.tuner = FineTuner(state, cfg)
    frame = buf.to_frame()

    result = trainer.run_round(frame, None)
    assert result.status == "diverged"
    assert published == [] and trainer.tuner.current is state and trainer.error is None
    assert _value(metrics, "gruflow_finetune_diverged_total") == 1
    assert _value(metrics, "gruflow_model_promotions_total") == 0 and trainer.rounds_done == 1

    trainer.tuner.config = dataclasses.replace(cfg, learning_rate=0.05)
    result = trainer.run_round(frame, None)
    assert result.status == "promoted", result.summary()
    assert [(v, p) for _, v, p in published] == [(4, 3)]
    ckpt = checkpoint_from_bytes(published[0][0])
    assert weight_problem(ckpt.net, ckpt.popularity) is None
    assert _value(metrics, "gruflow_finetune_diverged_total") == 1 and trainer.rounds_done == 2
