"""Poisoned models on a real broker: NaN and absurd versions, and lower version numbers, published the way
the trainer publishes (model_sync.publish_version with real checkpoint bytes), are refused by a running
worker process and by a running trainer; no non-finite hidden state reaches the changelog, and one that
is already there (left by an earlier incident) is dropped when its user comes back."""

from __future__ import annotations

import copy
import dataclasses
import math
import time

import numpy as np
import pytest
import torch

from model.checkpoint import checkpoint_from_bytes, checkpoint_to_bytes, load_checkpoint, save_checkpoint
from model.weight_check import weight_problem
from state.codec import UserState, encode
from stream.online import model_protocol, model_rollback, model_sync
from stream.observe.metrics import Metrics
from stream.online.model_store import ModelStore
from stream.tools.replay import replay
from stream.kafka.topics import TopicNames, changelog_topic, ensure_topics
from test_online_trainer import _wait, small_model  # noqa: F401 - the trainer tests' model fixture
from workerkit import Ev, TopicReader, WorkerProc, make_events, produce, read_states, save_tiny_model

pytestmark = pytest.mark.integration


def _poisoned(net, name: str, index: object, value: float):
    bad = copy.deepcopy(net)
    with torch.no_grad():
        bad.state_dict()[name][index] = value
    return bad


def _ckpt_bytes(ckpt, net, version: int) -> bytes:
    return checkpoint_to_bytes(net, ckpt.vocab, ckpt.params, ckpt.popularity, {"version": version})


def _all_scores_finite(recs: list[dict]) -> bool:
    return all(it["score"] is not None and math.isfinite(it["score"]) for r in recs for it in r["items"])


def _put_state(settings, user: str, state: UserState) -> None:
    """Write one record into the worker's changelog the way the worker does (keyed, murmur2)."""
    from confluent_kafka import Producer

    from stream.kafka.config import producer_config

    p = Producer(producer_config(settings))
    p.produce(changelog_topic(settings), encode(state), user.encode())
    assert p.flush(30) == 0


def _serving_version_5(kafka, tmp_path):
    """Topics, and a tiny model published as version 5 (also the worker's GRUFLOW_MODEL_PATH)."""
    settings = kafka.settings(partitions=2, batch_max_ms=10.0)
    ensure_topics(settings)
    path = save_tiny_model(tmp_path / "v5.gfc", version=5)
    ckpt = load_checkpoint(path)
    model_sync.publish_version(settings, _ckpt_bytes(ckpt, ckpt.net, 5), 5, 4)
    return settings, path, ckpt


def _finite_states(settings) -> dict[str, UserState]:
    states = read_states(settings, read_committed=False)
    bad = sorted(user for user, st in states.items() if st.hidden is not None and not np.isfinite(st.hidden).all())
    assert not bad, f"non-finite hidden states in the changelog: {bad[:5]}"
    return states


def test_worker_drops_a_poisoned_stored_state_when_its_user_comes_back(kafka, tmp_path) -> None:
    settings, path, ckpt = _serving_version_5(kafka, tmp_path)
    t0 = int(time.time() * 1000) - 3_600_000
    # what an earlier NaN model left behind: a user whose stored hidden state is NaN, within the session gap
    hidden = np.full(ckpt.net.state_size, np.nan, dtype=np.float32)
    _put_state(settings, "poisoned", UserState(hidden, t0, 3, 6, np.zeros(0, dtype=np.int32)))
    reader = TopicReader(settings, TopicNames.from_settings(settings).recommendations)
    try:
        with WorkerProc(kafka, settings, path, tmp_path) as w:
            events = make_events(5, 2, seed=1, t0=t0) + [Ev("poisoned", "i7", t0 + 1000)]
            produce(settings, events)
            answers = reader.poll_until(lambda c: len(c.answered()) >= len(events), 120, "answers")
            assert _all_scores_finite(answers.recommendations())
            assert w.metric("gruflow_state_resets_total", reason="non_finite_stored") == 1
        states = _finite_states(settings)
        assert states["poisoned"].hidden is not None  # stepped from a fresh session
    finally:
        reader.close()


def test_worker_refuses_poisoned_and_lower_versions_and_keeps_states_finite(kafka, tmp_path) -> None:
    settings, path, ckpt = _serving_version_5(kafka, tmp_path)
    t0 = int(time.time() * 1000) - 3_600_000
    reader = TopicReader(settings, TopicNames.from_settings(settings).recommendations)
    try:
        with WorkerProc(kafka, settings, path, tmp_path) as w:
            first = make_events(20, 3, seed=1, t0=t0)
            produce(settings, first)
            reader.poll_until(lambda c: len(c.answered()) >= len(first), 120, "answers to the first events")

            # NaN in 25 output rows, NaN in one GRU weight, one absurd weight: all newer than the served 5
            poisons = {6: ("Wy.weight", slice(0, 25), math.nan), 7: ("G.0.weight_hh", (2, 3), math.nan),
                       8: ("G.0.weight_ih", (0, 0), 1e6)}
            for version, (name, index, value) in poisons.items():
                data = _ckpt_bytes(ckpt, _poisoned(ckpt.net, name, index, value), version)
                model_sync.publish_version(settings, data, version, version - 1)
            _wait(lambda: w.metric("gruflow_model_version") != 5 or (
                w.metric("gruflow_model_refusals_total", reason=model_protocol.R_NON_FINITE) >= 2
                and w.metric("gruflow_model_refusals_total", reason=model_protocol.R_ABSURD) >= 1), 60,
                "versions 6, 7 and 8 to be refused")
            assert w.metric("gruflow_model_version") == 5, w.log_tail()
            # a sane model under a lower number than the served one
            model_sync.publish_version(settings, _ckpt_bytes(ckpt, ckpt.net, 3), 3, 2)
            assert w.wait_metric("gruflow_model_refusals_total", lambda v: v >= 1, 60, reason=model_protocol.R_LOWER), \
                w.log_tail()
            assert w.metric("gruflow_model_version") == 5 and w.metric("gruflow_model_swaps_total") == 0

            second = make_events(30, 3, seed=2, t0=t0 + 10_000)  # users u0..u19 again, and ten new ones
            produce(settings, second)
            everything = first + second
            reader.poll_until(lambda c: len(c.answered()) >= len(everything), 120, "answers to the second events")
            recs = reader.drain().recommendations()
            assert {r["model_version"] for r in recs} == {5}
            assert _all_scores_finite(recs)
            assert len({tuple(it["item_id"] for it in r["items"]) for r in recs}) > 10  # not one list for everyone
            assert "refused model" in w.log_path.read_text()
            assert w.metric("gruflow_state_resets_total") == 0  # nothing to reset: no NaN model was served
        assert set(_finite_states(settings)) == {e.user for e in everything}
    finally:
        reader.close()


def test_worker_refuses_to_start_on_a_nan_checkpoint_file(kafka, tmp_path) -> None:
    settings = kafka.settings(partitions=1)
    ensure_topics(settings)  # an empty models topic: the worker falls back to GRUFLOW_MODEL_PATH
    ckpt = load_checkpoint(save_tiny_model(tmp_path / "good.gfc"))
    bad = save_checkpoint(tmp_path / "nan.gfc", _poisoned(ckpt.net, "By.weight", (4, 0), math.nan), ckpt.vocab,
                          ckpt.params, ckpt.popularity, {"version": 1})
    w = WorkerProc(kafka, settings, bad, tmp_path)
    w.start(wait_ready=False)
    try:
        assert w.proc.wait(120) == 2, w.log_tail()
        assert "refused to serve" in w.log_tail() and model_protocol.R_NON_FINITE in w.log_tail()
    finally:
        w.kill()


def test_trainer_refuses_poisoned_versions_survives_divergence_and_publishes_only_finite(
        kafka, small_model, tmp_path) -> None:  # noqa: F811 - the imported fixture
    from stream.online.trainer import Trainer

    net, vocab, pop, params, later = small_model
    path = save_checkpoint(tmp_path / "base.gfc", net, vocab, params, pop, {})
    settings = kafka.settings(partitions=2, model_path=str(path), finetune_every_events=10**9,
                              finetune_interval_s=0.0, guardrail_tolerance=1.0, new_item_min_count=2,
                              buffer_max_age_s=1e9)
    ensure_topics(settings)
    metrics = Metrics.create(role="trainer")
    trainer = Trainer(settings, metrics, serve_http=False).start()
    refusals = metrics.registry.get_sample_value
    try:
        _wait(trainer.ready.is_set, 60, "trainer consumer to be assigned")
        _wait(trainer._subscriber.caught_up.is_set, 30, "the trainer's subscriber to read the models topic")
        assert trainer.tuner.current.version == 1
        # "someone else" publishes a NaN version and an absurd one: not adopted, counted
        base = load_checkpoint(path)
        for version, (name, index, value) in {2: ("G.0.weight_ih", (1, 1), math.nan),
                                              3: ("Wy.weight", (0, 0), -1e8)}.items():
            data = _ckpt_bytes(base, _poisoned(net, name, index, value), version)
            model_sync.publish_version(settings, data, version, 1)
        _wait(lambda: trainer.tuner.current.version != 1 or (
            (refusals("gruflow_model_refusals_total", {"reason": model_protocol.R_NON_FINITE}) or 0) >= 1
            and (refusals("gruflow_model_refusals_total", {"reason": model_protocol.R_ABSURD}) or 0) >= 1),
            60, "the trainer to refuse versions 2 and 3")
        assert trainer.tuner.current.version == 1 and trainer.error is None

        stats = replay(settings, later, progress=False)
        assert stats.failed == 0 and trainer.wait_consumed(stats.delivered, 60)
        # a round whose training diverges is discarded; the trainer goes on
        sane = trainer.tuner.config
        trainer.tuner.config = dataclasses.replace(sane, learning_rate=1e30)
        trainer.request_round()
        assert trainer.wait_rounds(1, 300), trainer.error
        assert trainer.results[-1].status == "diverged" and trainer.error is None
        assert refusals("gruflow_finetune_diverged_total") == 1 and trainer.tuner.current.version == 1
        trainer.tuner.config = sane
        trainer.request_round()
        assert trainer.wait_rounds(2, 300), trainer.error
        assert trainer.results[-1].promoted, trainer.results[-1].summary()
        assert trainer.tuner.current.version == 4  # past the refused numbers 2 and 3: none is reused

        # a lower number than the one the trainer follows: refused with its own reason
        model_sync.publish_version(settings, _ckpt_bytes(base, net, 2), 2, 1)
        _wait(lambda: (refusals("gruflow_model_refusals_total", {"reason": model_protocol.R_LOWER}) or 0) >= 1,
              60, "the lower version to be refused")
        assert trainer.tuner.current.version == 4 and trainer.error is None

        # rolling back to the absurd version is refused before anything is published
        with pytest.raises(model_protocol.ModelSyncError) as info:
            model_rollback.rollback(settings, 3, ModelStore.from_settings(settings))
        assert info.value.reason == model_protocol.R_ABSURD
        assert max(i.version for i in model_sync.list_versions(settings)) == 4

        # everything the trainer published (topic and local store) is finite and sane
        assert trainer._own_versions == {1, 4}
        for version in sorted(trainer._own_versions):
            for data in (model_sync.read_version_bytes(settings, version), ModelStore.from_settings(settings).load(version)):
                ckpt = checkpoint_from_bytes(data)
                assert weight_problem(ckpt.net, ckpt.popularity) is None, version
    finally:
        trainer.stop()
