"""What each process exports: its own families only, every known label value at 0 from the start, and
a bounded number of per-version prequential series."""

from __future__ import annotations

import asyncio

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from stream.online import model_sync
from stream.pipeline.events import REASONS as DLQ_REASONS
from stream.observe.metrics import PREQUENTIAL_VERSIONS_KEPT, Metrics, PrequentialVersions
from stream.observe.web import make_web_app

TRAINER_ONLY = {"gruflow_model_promotions", "gruflow_model_rejections", "gruflow_finetune_rounds",
                "gruflow_finetune_duration_seconds", "gruflow_finetune_loss", "gruflow_trainer_buffer_events",
                "gruflow_trainer_buffer_bytes", "gruflow_new_items", "gruflow_retired_items"}
WORKER_ONLY = {"gruflow_events_in", "gruflow_dlq", "gruflow_recommendations_out", "gruflow_state_entries",
               "gruflow_consumer_lag_messages", "gruflow_prequential_events", "gruflow_ready",
               "gruflow_end_to_end_latency_seconds", "gruflow_model_swaps"}


def families(exposition: bytes) -> dict[str, list]:
    return {f.name: f.samples for f in text_string_to_metric_families(exposition.decode())}


def test_worker_exports_no_trainer_family() -> None:
    names = set(families(generate_latest(Metrics.create(role="worker").registry)))
    assert WORKER_ONLY <= names
    assert not names & TRAINER_ONLY, f"a worker exports trainer families {sorted(names & TRAINER_ONLY)}"


def test_trainer_exports_no_worker_family() -> None:
    names = set(families(generate_latest(Metrics.create(role="trainer").registry)))
    assert TRAINER_ONLY <= names
    assert not names & WORKER_ONLY, f"the trainer exports worker families {sorted(names & WORKER_ONLY)}"
    assert {"gruflow_model_version", "gruflow_model_refusals"} <= names  # both serve and can refuse a model


def test_worker_web_endpoint_serves_the_worker_families_only() -> None:
    from aiohttp.test_utils import TestClient, TestServer

    async def scrape() -> bytes:
        app = make_web_app(Metrics.create(role="worker"), lambda: (True, "ready"))
        async with TestClient(TestServer(app)) as client:
            resp = await client.get("/metrics")
            assert resp.status == 200
            return await resp.read()

    names = set(families(asyncio.run(scrape())))
    assert "gruflow_ready" in names and not names & TRAINER_ONLY


def test_a_family_of_the_other_role_can_be_written_but_is_not_exported() -> None:
    m = Metrics.create(role="worker")
    m.promotions.inc()  # shared code may write it; the worker's registry does not carry it
    assert m.registry.get_sample_value("gruflow_model_promotions_total") is None


def test_fresh_worker_exposes_every_reason_at_zero() -> None:
    samples = families(generate_latest(Metrics.create(role="worker").registry))
    dlq = {s.labels["reason"]: s.value for s in samples["gruflow_dlq"] if s.name == "gruflow_dlq_total"}
    refusals = {s.labels["reason"]: s.value for s in samples["gruflow_model_refusals"]
                if s.name == "gruflow_model_refusals_total"}
    assert dlq == {reason: 0.0 for reason in DLQ_REASONS}
    assert refusals == {reason: 0.0 for reason in model_sync.REFUSAL_REASONS}


def test_fresh_trainer_exposes_every_refusal_reason_at_zero() -> None:
    m = Metrics.create(role="trainer")
    for reason in model_sync.REFUSAL_REASONS:
        assert m.registry.get_sample_value("gruflow_model_refusals_total", {"reason": reason}) == 0.0


def test_refusal_reasons_list_every_reason_constant() -> None:
    constants = {v for k, v in vars(model_sync).items() if k.startswith("R_") and isinstance(v, str)}
    assert constants and constants == set(model_sync.REFUSAL_REASONS)


def test_prequential_version_series_stay_bounded() -> None:
    m = Metrics.create(role="worker")
    pq = PrequentialVersions(m, k=20)
    for version in range(1, 31):  # thirty promotions
        pq.add("gru", str(version), events=10, hits=3, reciprocal_rank=1.5)
        pq.add("popularity", "", events=10, hits=2, reciprocal_rank=1.0)
    samples = families(generate_latest(m.registry))
    gru_versions = {s.labels["version"] for s in samples["gruflow_prequential_events"]
                    if s.name == "gruflow_prequential_events_total" and s.labels["model"] == "gru"}
    assert gru_versions == {str(v) for v in range(31 - PREQUENTIAL_VERSIONS_KEPT, 31)} | {"older"}
    for name in ("gruflow_prequential_hits", "gruflow_prequential_reciprocal_rank"):
        kept = {s.labels["version"] for s in samples[name] if s.name == name + "_total" and s.labels["model"] == "gru"}
        assert kept == gru_versions
    get = m.registry.get_sample_value
    assert get("gruflow_prequential_events_total", {"model": "gru", "version": "30"}) == 10
    assert get("gruflow_prequential_hits_total", {"model": "gru", "version": "30", "k": "20"}) == 3
    assert get("gruflow_prequential_events_total", {"model": "popularity", "version": ""}) == 300
    # evicted versions are folded into "older": the sum over versions is still every event counted
    total = sum(s.value for s in samples["gruflow_prequential_events"]
                if s.name == "gruflow_prequential_events_total" and s.labels["model"] == "gru")
    hits = sum(s.value for s in samples["gruflow_prequential_hits"]
               if s.name == "gruflow_prequential_hits_total" and s.labels["model"] == "gru")
    assert (total, hits) == (300, 90)
    assert get("gruflow_prequential_events_total", {"model": "gru", "version": "older"}) == 10 * (30 - PREQUENTIAL_VERSIONS_KEPT)


def test_a_version_served_again_keeps_its_series() -> None:
    m = Metrics.create(role="worker")
    pq = PrequentialVersions(m, k=20, keep=2)
    for version in ("5", "6", "5", "7"):  # a rollback to 5, then a new model
        pq.add("gru", version, events=1, hits=1, reciprocal_rank=1.0)
    get = m.registry.get_sample_value
    assert get("gruflow_prequential_events_total", {"model": "gru", "version": "5"}) == 2
    assert get("gruflow_prequential_events_total", {"model": "gru", "version": "6"}) is None
    assert get("gruflow_prequential_events_total", {"model": "gru", "version": "older"}) == 1
    assert get("gruflow_prequential_events_total", {"model": "gru", "version": "7"}) == 1
