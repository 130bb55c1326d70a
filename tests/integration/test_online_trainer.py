"""Trainer, load_latest and ModelSubscriber on a real broker with real torch (no worker needed)."""

from __future__ import annotations

import time

import pytest
import torch

from model.checkpoint import checkpoint_to_bytes, save_checkpoint
from model.params import GRU4RecParams
from model.synthetic import generate
from model.train import train_model
from stream.online import model_protocol, model_rollback, model_sync
from stream.observe.metrics import Metrics
from stream.worker.model_holder import ModelHolder
from stream.online.model_store import ModelStore
from stream.tools.replay import replay
from stream.kafka.topics import ensure_topics

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def small_model():
    torch.set_num_threads(1)
    df = generate(n_sessions=1200, n_items=120, seed=11, span_days=1.0)
    cut = float(df["Time"].quantile(0.4))
    first = df.groupby("SessionId")["Time"].transform("min") < cut
    base = df[first]
    base = base[~base["ItemId"].isin(sorted(df["ItemId"].unique())[:15])]  # the stream brings new items
    params = GRU4RecParams(layers=(16,), n_sample=32, batch_size=16, n_epochs=1)
    net, vocab, pop = train_model(base, params, progress=False)
    return net, vocab, pop, params, df[~first]


def _wait(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_load_latest_and_subscriber_swap_refuse(kafka, small_model) -> None:
    net, vocab, pop, params, _ = small_model
    settings = kafka.settings(partitions=1)
    ensure_topics(settings)
    assert model_sync.load_latest(settings) is None
    v1 = checkpoint_to_bytes(net, vocab, params, pop, {"version": 1})
    model_sync.publish_version(settings, v1, 1, 0)
    rec = model_sync.load_latest(settings)
    assert rec is not None and rec.version == 1 and rec.vocab.ids == vocab.ids

    metrics = Metrics.create()
    holder = ModelHolder(rec)
    with model_sync.ModelSubscriber(settings, holder, metrics) as sub:
        _wait(sub.caught_up.is_set, 30, "subscriber to reach the end of the topic")
        assert holder.current is rec  # version 1 is not newer than the one served
        # a corrupt version: right envelopes, garbage bytes -> refused, the old model stays
        model_sync.publish_version(settings, b"not a checkpoint at all" * 10, 2, 1)
        _wait(lambda: sub.refused, 30, "the corrupt version to be refused")
        assert sub.refused[-1] == (2, model_protocol.R_CORRUPT)
        assert holder.current is rec
        # a version whose checksum does not match its descriptor
        chunks = model_protocol.encode_chunks(v1, 3, 1)
        producer = model_sync._producer(settings)
        for key, value in chunks:
            producer.produce(settings.topic("models"), value=value[:-1] + b"\x00", key=key, partition=0)
        producer.flush(10)
        _wait(lambda: len(sub.refused) >= 2, 30, "the bad-checksum version to be refused")
        assert sub.refused[-1] == (3, model_protocol.R_CHECKSUM)
        # an incompatible one (other hidden size)
        other_net, other_vocab, other_pop = train_model(small_model[4].head(300), GRU4RecParams(
            layers=(8,), n_sample=8, batch_size=8, n_epochs=1), progress=False)
        model_sync.publish_version(settings, checkpoint_to_bytes(other_net, other_vocab, None, other_pop, {}), 4, 1)
        _wait(lambda: len(sub.refused) >= 3, 30, "the incompatible version to be refused")
        assert sub.refused[-1][1] in (model_protocol.R_STATE, model_protocol.R_VOCAB)
        assert holder.current is rec
        # a good version is swapped in
        model_sync.publish_version(settings, checkpoint_to_bytes(net, vocab, params, pop, {"version": 5}), 5, 1)
        _wait(lambda: holder.current.version == 5, 30, "version 5 to be swapped in")
    assert sub.swapped == [5]
    text = metrics.registry.get_sample_value
    assert text("gruflow_model_refusals_total", {"reason": model_protocol.R_CORRUPT}) == 1
    assert text("gruflow_model_refusals_total", {"reason": model_protocol.R_CHECKSUM}) == 1
    assert text("gruflow_model_swaps_total") == 1
    # a fresh reader skips the invalid versions and loads the newest valid one
    assert model_sync.load_latest(settings).version == 5


def test_trainer_finetunes_publishes_and_rolls_back(kafka, small_model, tmp_path) -> None:
    from stream.online.trainer import Trainer

    net, vocab, pop, params, later = small_model
    path = save_checkpoint(tmp_path / "base.gfc", net, vocab, params, pop, {})
    settings = kafka.settings(partitions=2, model_path=str(path), finetune_every_events=10**9,
                              finetune_interval_s=0.0, guardrail_tolerance=1.0, new_item_min_count=2,
                              models_keep=3, buffer_max_age_s=1e9)
    ensure_topics(settings)
    metrics = Metrics.create(role="trainer")
    trainer = Trainer(settings, metrics, serve_http=False)
    trainer.start()
    try:
        _wait(trainer.ready.is_set, 60, "trainer consumer to be assigned")
        assert [i.version for i in model_sync.list_versions(settings)] == [1]  # the initial model, published
        stats = replay(settings, later, progress=False)
        assert stats.failed == 0
        assert trainer.wait_consumed(stats.delivered, 60)
        for round_no in range(1, 5):
            trainer.request_round()
            assert trainer.wait_rounds(round_no, 300), trainer.error
        results = trainer.results
        assert all(r.status == "promoted" for r in results), [r.summary() for r in results]
        assert sum(len(r.new_items) for r in results) > 0
        infos = model_sync.list_versions(settings)
        assert [i.version for i in infos] == [3, 4, 5]  # models_keep=3: versions 1 and 2 tombstoned
        assert all(i.complete for i in infos)
        assert ModelStore.from_settings(settings).versions() == [3, 4, 5]
        latest = model_sync.load_latest(settings)
        assert latest.version == 5 and len(latest.vocab) > len(vocab)
        assert latest.vocab.ids[: len(vocab)] == vocab.ids
        assert metrics.registry.get_sample_value("gruflow_model_promotions_total") == 4
        assert metrics.registry.get_sample_value("gruflow_trainer_buffer_bytes") > 0
        assert metrics.registry.get_sample_value("gruflow_vocabulary_items") == len(latest.vocab)

        # rollback to version 3: a new version 6 with 3's weights, the trainer adopts it
        new = model_rollback.rollback(settings, 3, ModelStore.from_settings(settings))
        assert new == 6
        rolled = model_sync.load_latest(settings)
        assert rolled.version == 6 and rolled.metadata["rollback_of"] == 3
        assert rolled.vocab.ids[: len(latest.vocab)] == latest.vocab.ids  # never shrinks
        _wait(lambda: trainer.tuner.current.version == 6, 30, "the trainer to adopt the rollback")
        trainer.request_round()
        assert trainer.wait_rounds(5, 300)
        assert model_sync.load_latest(settings).metadata["parent_version"] == 6
    finally:
        trainer.stop()
