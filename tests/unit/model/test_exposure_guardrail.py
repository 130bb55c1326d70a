"""The concentration check of the promotion guardrail (model/exposure.py) on real networks: exposure
counted from real top-K lists, a candidate built to over-expose one item refused, and a poisoned
fine-tune round refused by it while the quality check alone lets it through."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from model.exposure import (GINI, ITEM_EXPOSURE, ConcentrationLimits, Exposure, concentration_problem, coverage,
                            gini, item_jump, topk_exposure)
from model.finetune import FineTuneConfig, FineTuner, ModelState
from model.network import GRU4RecNet
from model.params import OFFICIAL, GRU4RecParams
from model.session_buffer import SessionBuffer
from model.vocab import Vocabulary


def test_gini_and_coverage_of_simple_exposures() -> None:
    assert gini(np.full(10, 5)) == pytest.approx(0.0)
    one = np.zeros(10)
    one[3] = 7
    assert gini(one) == pytest.approx(0.9)  # 1 - 1/n: everything on one item
    assert coverage(one) == pytest.approx(0.1)
    assert gini(np.zeros(4)) == 0.0


def _sessions(n_items: int, n_sessions: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = [(s, f"i{int(i)}", float(s * 100 + j)) for s in range(n_sessions)
            for j, i in enumerate(rng.integers(0, n_items, size=int(rng.integers(2, 8))))]
    return pd.DataFrame(rows, columns=["SessionId", "ItemId", "Time"]).assign(EventType=np.int8(1))


def _current_and_copy(n: int) -> tuple[Vocabulary, GRU4RecNet, GRU4RecNet]:
    """A small untrained network over ``n`` items and a copy of it to turn into a candidate."""
    torch.manual_seed(0)
    vocab = Vocabulary([f"i{i}" for i in range(n)])
    current = GRU4RecNet(n, GRU4RecParams(layers=(16,), seed=3))
    return vocab, current, copy.deepcopy(current)


def test_a_candidate_built_to_over_expose_one_item_is_refused() -> None:
    n = 60
    vocab, current, candidate = _current_and_copy(n)
    target = vocab.row("i7")
    with torch.no_grad():
        candidate.state_dict()["By.weight"][target] += 50.0  # the item outscores everything for everyone
    held = _sessions(n, 80, seed=1)
    cur_x, cand_x = topk_exposure(current, vocab, held, 20), topk_exposure(candidate, vocab, held, 20)
    assert cand_x.lists == cur_x.lists > 0
    assert cand_x.counts[target] == cand_x.lists  # in every list
    row, factor = item_jump(cur_x, cand_x, 0.01)
    assert row == target and factor > 2.0
    reason, detail = concentration_problem(cur_x, cand_x, ConcentrationLimits(max_item_exposure_factor=2.0))
    assert reason == ITEM_EXPOSURE and "i7" not in detail
    # the same network against itself passes every check
    assert concentration_problem(cur_x, cur_x, ConcentrationLimits(0.01, 0.99, 1.01)) == ("", "")


def test_gini_check_refuses_lists_narrowed_to_few_items() -> None:
    wide = Exposure(np.full(100, 20), 100)
    narrow_counts = np.zeros(100, dtype=np.int64)
    narrow_counts[:20] = 100
    narrow = Exposure(narrow_counts, 100)
    assert concentration_problem(wide, narrow, ConcentrationLimits(max_gini_increase=0.1))[0] == GINI
    assert concentration_problem(narrow, wide, ConcentrationLimits(max_gini_increase=0.1)) == ("", "")


@pytest.fixture(scope="module")
def poisoned():
    """A base model on synthetic sessions, and a later buffer where 15% of sessions are fake: random
    filler, then one target item."""
    from model.synthetic import generate
    from model.train import train_model

    torch.set_num_threads(1)
    df = generate(n_sessions=1200, n_items=120, seed=7, span_days=2.0)
    cut = float(df["Time"].quantile(0.4))
    first = df.groupby("SessionId")["Time"].transform("min") < cut
    params = dataclasses.replace(OFFICIAL, layers=(32,), n_sample=64, batch_size=32, n_epochs=2, learning_rate=0.05)
    net, vocab, pop = train_model(df[first], params, progress=False)
    later = df[~first]
    rng = np.random.default_rng(0)
    target = vocab.ids[len(vocab) // 2]
    t0, t1 = float(later["Time"].min()), float(later["Time"].max())
    sid = int(df["SessionId"].max()) + 1
    fake = []
    for j in range(int(0.15 * later["SessionId"].nunique())):
        start = float(rng.uniform(t0, t1))
        items = [vocab.ids[int(i)] for i in rng.integers(0, len(vocab), size=6)] + [target]
        fake += [(sid + j, it, start + k) for k, it in enumerate(items)]
    attacked = pd.concat([later, pd.DataFrame(fake, columns=["SessionId", "ItemId", "Time"]).assign(EventType=1)])
    buf = SessionBuffer(max_events=20_000, max_age_s=1e9, session_gap_s=1e9)
    for s, i, t, e in attacked.sort_values("Time")[["SessionId", "ItemId", "Time", "EventType"]].itertuples(index=False):
        buf.add(str(s), i, t, e)
    return ModelState(net, vocab, params, pop.copy(), {"version": 1}, version=1), buf.to_frame(), target


def _poisoned_round(poisoned, **limits):
    state, frame, _ = poisoned
    cfg = FineTuneConfig(min_holdout_events=20, min_train_events=50, guardrail_tolerance=1.0, learning_rate=0.2,
                         n_epochs=2, **limits)
    return FineTuner(state, cfg).run_round(frame)


def test_concentration_guardrail_refuses_a_poisoned_round(poisoned) -> None:
    state, _, target = poisoned
    off = _poisoned_round(poisoned)
    assert off.status == "promoted", off.summary()  # the quality check alone lets the poisoned model through
    factor = off.candidate_scores["exposure"]["max_item_factor"]
    assert factor > 3.0, off.summary()
    on = _poisoned_round(poisoned, guardrail_max_item_exposure_factor=3.0)
    assert on.status == "rejected" and on.concentration == ITEM_EXPOSURE, on.summary()
    assert "concentration" in on.reason and target not in on.reason


def test_holding_back_the_pushed_item_keeps_the_rest_of_the_candidate() -> None:
    from model.guardrail import judge

    n = 60
    vocab, current, candidate = _current_and_copy(n)
    target = vocab.row("i7")
    with torch.no_grad():
        for w in candidate.dense_parameters():  # what the round learned elsewhere: small changes
            w.add_(0.001 * torch.randn_like(w))
        candidate.Wy.weight.add_(0.001 * torch.randn_like(candidate.Wy.weight))
        candidate.By.weight[target] += 50.0  # the pushed item outscores everything for everyone
    learned = candidate.Wy.weight.clone()
    held = _sessions(n, 80, seed=1)
    limits = ConcentrationLimits(max_item_exposure_factor=2.0)
    refused = judge((current, vocab), (copy.deepcopy(candidate), vocab), held, 20, 1.0, limits)
    assert refused.refusal == ITEM_EXPOSURE and refused.held_back == ()
    kept = judge((current, vocab), (candidate, vocab), held, 20, 1.0, dataclasses.replace(limits, hold_back_items=3))
    assert kept.refusal == "" and kept.held_back == (target,), kept
    assert kept.candidate["exposure"]["held_back_items"] == 1 and kept.candidate["exposure"]["max_item_factor"] <= 2.0
    assert torch.equal(candidate.By.weight[target], current.By.weight[target])
    assert torch.equal(candidate.Wy.weight[target], current.Wy.weight[target])
    others = [r for r in range(n) if r != target]
    assert torch.equal(candidate.Wy.weight[others], learned[others])  # nothing else taken back


def test_holding_back_stops_at_an_item_the_current_model_lacks() -> None:
    from model.guardrail import judge

    n = 40
    vocab, current, candidate = _current_and_copy(n)
    grown = Vocabulary(vocab.ids + ["new"])
    candidate.expand_items(n + 1, seed=1)
    with torch.no_grad():
        candidate.By.weight[n] += 50.0  # a new item in every list: there is no current row to go back to
    limits = ConcentrationLimits(max_item_exposure_factor=2.0, hold_back_items=3)
    verdict = judge((current, vocab), (candidate, grown), _sessions(n, 60, seed=2), 10, 1.0, limits)
    assert verdict.refusal == ITEM_EXPOSURE and verdict.held_back == ()
