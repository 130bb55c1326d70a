"""Hot swap across real worker processes: a version reaches two workers sharing the input partitions,
a corrupt version is refused with the old model kept, a restarted worker starts on the newest version."""

from __future__ import annotations

import time
from collections import Counter

import orjson
import pytest
import torch

from model.checkpoint import checkpoint_to_bytes
from model.finetune import FineTuneConfig, FineTuner, ModelState, SessionBuffer
from model.params import GRU4RecParams
from model.synthetic import generate
from model.train import train_model
from stream.online import model_sync
from stream.kafka.broker import free_port
from stream.lab.experiment import WorkerProcess, _sum, scrape
from stream.tools.replay import replay
from stream.kafka.topics import TopicNames, ensure_topics

pytestmark = pytest.mark.integration


def _read_recommendations(settings, expected: int, timeout: float = 60.0) -> list[dict]:
    from confluent_kafka import Consumer, TopicPartition

    from stream.kafka.config import consumer_config

    topic = TopicNames.from_settings(settings).recommendations
    consumer = Consumer(consumer_config(settings, None))
    parts = [TopicPartition(topic, p, 0) for p in range(settings.topics.partitions)]
    consumer.assign(parts)
    out: list[dict] = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < expected and time.monotonic() < deadline:
            for m in consumer.consume(1000, 0.5):
                if m.error() is None:
                    out.append(orjson.loads(m.value()))
        # drain whatever else is there (duplicates from at-least-once)
        for m in consumer.consume(10000, 2.0):
            if m.error() is None:
                out.append(orjson.loads(m.value()))
    finally:
        consumer.close()
    return out


def _wait_metric(worker: WorkerProcess, name: str, value: float, timeout: float = 60.0, **labels: str) -> None:
    deadline = time.monotonic() + timeout
    while _sum(scrape(worker.settings), name, **labels) < value:
        assert time.monotonic() < deadline, f"{name}{labels} did not reach {value} on :{worker.settings.process.web_port}"
        time.sleep(0.2)


def test_version_reaches_two_workers_corrupt_refused_restart_loads_latest(kafka, tmp_path) -> None:
    torch.set_num_threads(1)
    df = generate(n_sessions=600, n_items=80, seed=3, span_days=1.0)
    df = df.sort_values("Time", kind="stable").reset_index(drop=True)
    params = GRU4RecParams(layers=(16,), n_sample=16, batch_size=16, n_epochs=1)
    base_df = df.iloc[: len(df) // 2]
    net, vocab, pop = train_model(base_df[~base_df["ItemId"].isin(sorted(df["ItemId"].unique())[:10])], params,
                                  progress=False)
    # version 2: a real fine-tune round (grown vocabulary) on the second half
    buf = SessionBuffer(10_000, 1e9, 1800.0)
    for s, i, t, e in df.iloc[len(df) // 2:][["SessionId", "ItemId", "Time", "EventType"]].itertuples(index=False):
        buf.add(str(s), i, t, e)
    tuner = FineTuner(ModelState(net, vocab, params, pop, {"version": 1}, 1),
                      FineTuneConfig(guardrail_tolerance=1.0, min_holdout_events=10, min_train_events=10,
                                     new_item_min_count=1))
    result = tuner.run_round(buf.to_frame(), buf.drain_stats())
    assert result.promoted and result.new_items
    v2 = result.candidate

    settings = kafka.settings(partitions=4, batch_max_ms=10.0)
    ensure_topics(settings)
    model_sync.publish_version(settings, checkpoint_to_bytes(net, vocab, params, pop, {"version": 1}), 1, 0)
    s1 = settings
    s2 = settings.replace(web_port=free_port(), data_dir=tmp_path / "w2")
    users_a = df[df["SessionId"].isin(df["SessionId"].unique()[:150])]
    users_b = df[df["SessionId"].isin(df["SessionId"].unique()[150:300])]
    with WorkerProcess(s1, tmp_path / "w1.log") as w1, WorkerProcess(s2, tmp_path / "w2.log") as w2:
        # both workers in the group before any event: no rebalance while replaying
        time.sleep(3)
        assert replay(settings, users_a, progress=False).failed == 0
        _wait_metric(w1, "gruflow_events_in_total", 1, 120)
        deadline = time.monotonic() + 120
        while sum(_sum(scrape(w.settings), "gruflow_events_in_total") for w in (w1, w2)) < len(users_a):
            assert time.monotonic() < deadline, "workers did not process batch A"
            time.sleep(0.2)

        model_sync.publish_version(settings, checkpoint_to_bytes(v2.net, v2.vocab, v2.params, v2.popularity,
                                                                 {**v2.metadata, "version": 2}), 2, 1)
        for w in (w1, w2):
            _wait_metric(w, "gruflow_model_version", 2)
            _wait_metric(w, "gruflow_model_swaps_total", 1)

        # a corrupt version: refused by both, version 2 stays
        model_sync.publish_version(settings, b"\x00garbage" * 100, 3, 2)
        for w in (w1, w2):
            _wait_metric(w, "gruflow_model_refusals_total", 1, reason=model_sync.R_CORRUPT)
            assert _sum(scrape(w.settings), "gruflow_model_version") == 2

        assert replay(settings, users_b, progress=False).failed == 0
        total = len(users_a) + len(users_b)
        deadline = time.monotonic() + 120
        while sum(_sum(scrape(w.settings), "gruflow_events_in_total") for w in (w1, w2)) < total:
            assert time.monotonic() < deadline, "workers did not process batch B"
            time.sleep(0.2)
        per_worker = [_sum(scrape(w.settings), "gruflow_events_in_total") for w in (w1, w2)]
        assert all(n > 0 for n in per_worker), per_worker  # both workers served part of the stream

        recs = _read_recommendations(settings, total)
        answered = Counter((r["user_id"], r["event_ts"]) for r in recs)
        events_a = {(str(s), int(round(t * 1000))) for s, t in users_a[["SessionId", "Time"]].itertuples(index=False)}
        events_b = {(str(s), int(round(t * 1000))) for s, t in users_b[["SessionId", "Time"]].itertuples(index=False)}
        assert all(answered[e] >= 1 for e in events_a | events_b)  # nothing lost (at-least-once)
        versions = {(r["user_id"], r["event_ts"]): r["model_version"] for r in recs}
        assert {versions[e] for e in events_a} == {1}
        assert {versions[e] for e in events_b} == {2}
        new_items = set(v2.vocab.ids[len(vocab):])
        assert not any(it["item_id"] in new_items for r in recs if r["model_version"] == 1 for it in r["items"])

    # restart: a new worker (same group) loads the newest valid version from the topic before serving
    model_sync.publish_version(settings, checkpoint_to_bytes(v2.net, v2.vocab, v2.params, v2.popularity,
                                                             {**v2.metadata, "version": 4}), 4, 2)
    with WorkerProcess(s1.replace(web_port=free_port()), tmp_path / "w1b.log") as w1b:
        assert _sum(scrape(w1b.settings), "gruflow_model_version") == 4
