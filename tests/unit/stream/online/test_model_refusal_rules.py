"""What a models-topic reader refuses besides bad bytes: non-finite or absurd weights, and versions not
newer than the served one (after catching up). ``ModelSubscriber._handle`` is driven with fake
messages here; the broker-backed runs are in tests/integration/test_model_refusals.py."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from model import weight_check
from model.checkpoint import checkpoint_to_bytes
from model.network import GRU4RecNet
from model.params import GRU4RecParams
from model.vocab import Vocabulary
from stream.online import model_sync
from stream.observe.metrics import Metrics
from stream.worker.model_holder import ModelHolder
from stream.online.model_sync import (R_ABSURD, R_LOWER, R_NON_FINITE, R_SAME, REFUSAL_REASONS, Assembled, Assembler,
                               ModelSubscriber, ModelSyncError, encode_chunks, to_recommender)

N_ITEMS = 40


@pytest.fixture(scope="module")
def net() -> GRU4RecNet:
    return GRU4RecNet(N_ITEMS, GRU4RecParams(layers=(8,), seed=2))


def _bytes(net: GRU4RecNet, version: int, popularity: np.ndarray | None = None) -> bytes:
    pop = np.arange(N_ITEMS, 0, -1, dtype=np.float64) if popularity is None else popularity
    return checkpoint_to_bytes(net, Vocabulary(f"i{r}" for r in range(N_ITEMS)), None, pop, {"version": version})


def _poisoned(net: GRU4RecNet, name: str, index: object, value: float) -> GRU4RecNet:
    bad = copy.deepcopy(net)
    with torch.no_grad():
        bad.state_dict()[name][index] = value
    return bad


def test_refusal_reasons_are_the_weight_checks_and_listed() -> None:
    assert (R_NON_FINITE, R_ABSURD) == (weight_check.NON_FINITE, weight_check.ABSURD)
    assert len(set(REFUSAL_REASONS)) == len(REFUSAL_REASONS)
    assert {R_NON_FINITE, R_ABSURD, R_LOWER, R_SAME, model_sync.R_CORRUPT} <= set(REFUSAL_REASONS)


@pytest.mark.parametrize("name,index,value,reason", [
    ("Wy.weight", slice(0, 25), math.nan, R_NON_FINITE),  # 25 output rows
    ("G.0.weight_hh", (1, 2), math.nan, R_NON_FINITE),  # one GRU weight
    ("By.weight", (3, 0), math.inf, R_NON_FINITE),
    ("G.0.weight_ih", (0, 0), 1e7, R_ABSURD),
])
def test_to_recommender_refuses_unfit_weights(net: GRU4RecNet, name: str, index: object, value: float,
                                              reason: str) -> None:
    data = _bytes(_poisoned(net, name, index, value), 2)
    with pytest.raises(ModelSyncError) as info:
        to_recommender(Assembled(2, 1, data, None))
    assert info.value.reason == reason and name in str(info.value) and "version 2" in str(info.value)


def test_to_recommender_refuses_non_finite_popularity(net: GRU4RecNet) -> None:
    pop = np.ones(N_ITEMS)
    pop[7] = math.nan
    with pytest.raises(ModelSyncError) as info:
        to_recommender(Assembled(2, 1, _bytes(net, 2, pop), None))
    assert info.value.reason == R_NON_FINITE


def test_to_recommender_accepts_a_sane_model(net: GRU4RecNet) -> None:
    assert to_recommender(Assembled(2, 1, _bytes(net, 2), None)).version == 2


@dataclass
class _Msg:
    """The part of a confluent_kafka.Message that ModelSubscriber._handle reads."""

    k: bytes
    v: bytes

    def key(self) -> bytes:
        return self.k

    def value(self) -> bytes:
        return self.v


def _messages(data: bytes, version: int, chunk_bytes: int) -> list[_Msg]:
    return [_Msg(k, v) for k, v in encode_chunks(data, version, version - 1, chunk_bytes=chunk_bytes)]


def _subscriber(net: GRU4RecNet, served: int) -> tuple[ModelSubscriber, Metrics]:
    rec = to_recommender(Assembled(served, served - 1, _bytes(net, served), None))
    metrics = Metrics.create()
    return ModelSubscriber(settings=None, holder=ModelHolder(rec), metrics=metrics), metrics


def _refusals(metrics: Metrics, reason: str) -> float:
    return metrics.registry.get_sample_value("gruflow_model_refusals_total", {"reason": reason}) or 0.0


def test_subscriber_refuses_nan_and_absurd_versions_and_keeps_serving(net: GRU4RecNet) -> None:
    sub, metrics = _subscriber(net, 5)
    served = sub.holder.current
    asm = Assembler()
    sub.caught_up.set()
    for m in _messages(_bytes(_poisoned(net, "Wy.weight", slice(0, 25), math.nan), 6), 6, 4096):
        sub._handle(asm, m)
    for m in _messages(_bytes(_poisoned(net, "G.0.weight_hh", (0, 0), -1e9), 7), 7, 4096):
        sub._handle(asm, m)
    assert sub.refused == [(6, R_NON_FINITE), (7, R_ABSURD)]
    assert (_refusals(metrics, R_NON_FINITE), _refusals(metrics, R_ABSURD)) == (1, 1)
    assert sub.holder.current is served and sub.swapped == [] and sub.highest_seen == 7
    # a sane version after them is taken
    for m in _messages(_bytes(net, 8), 8, 4096):
        sub._handle(asm, m)
    assert sub.swapped == [8] and sub.holder.current.version == 8
    assert metrics.registry.get_sample_value("gruflow_model_version") == 8


def test_subscriber_refuses_lower_and_same_versions_once_each_after_catching_up(net: GRU4RecNet) -> None:
    sub, metrics = _subscriber(net, 5)
    served = sub.holder.current
    asm = Assembler()
    old = _messages(_bytes(net, 3), 3, 2048)
    assert len(old) > 1  # several chunks: still one refusal
    for m in old:  # before the first catch-up: the topic's history, skipped silently
        sub._handle(asm, m)
    assert sub.refused == [] and _refusals(metrics, R_LOWER) == 0
    sub.caught_up.set()
    for m in old + _messages(_bytes(net, 4), 4, 2048) + old:
        sub._handle(asm, m)
    for m in _messages(_bytes(net, 5), 5, 2048):
        sub._handle(asm, m)
    assert sub.refused == [(3, R_LOWER), (4, R_LOWER), (5, R_SAME)]
    assert (_refusals(metrics, R_LOWER), _refusals(metrics, R_SAME)) == (2, 1)
    assert sub.holder.current is served and asm.pending_versions == []


def test_a_follower_that_does_not_serve_counts_refusals_but_not_swaps(net: GRU4RecNet) -> None:
    rec = to_recommender(Assembled(1, 0, _bytes(net, 1), None))
    metrics = Metrics.create()
    seen: list[int] = []
    sub = ModelSubscriber(None, ModelHolder(rec), metrics, on_version=lambda r: seen.append(r.version), serving=False)
    sub.caught_up.set()
    asm = Assembler()
    for m in _messages(_bytes(_poisoned(net, "By.weight", (0, 0), math.nan), 2), 2, 4096) + \
            _messages(_bytes(net, 3), 3, 4096):
        sub._handle(asm, m)
    assert seen == [3] and _refusals(metrics, R_NON_FINITE) == 1
    assert (metrics.registry.get_sample_value("gruflow_model_swaps_total") or 0) == 0
