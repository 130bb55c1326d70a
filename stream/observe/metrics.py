"""Prometheus metrics of every gruflow process: base units, prefix ``gruflow_``, no user or item ids
in labels. One ``Metrics`` object per process (tests build their own on a private registry).

Each process exports only its own families (``Metrics.create(role=...)``): a worker's /metrics has no
trainer families and the reverse, so no rule or panel reads a counter that can never move (a worker's
promotions counter stuck at 0 once made the no-promotion alert fire on every worker). A family of the
other role still exists as an unregistered collector, so shared code can write to it; nothing exports
those writes.

Every known label value is created at 0 when the process starts (``init_label_values``): a labelled
series otherwise appears only at its first increment, and ``increase()``/``rate()`` cannot see that
first step, so the first refusal or dead letter of a reason would read 0.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, fields
from typing import Any, Literal, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from model.exposure import CONCENTRATION_REASONS
from stream.pipeline.events import REASONS as DLQ_REASONS
from stream.online.model_protocol import REFUSAL_REASONS as MODEL_REFUSAL_REASONS
from stream.pipeline.processor import STATE_RESET_REASONS
from stream.pipeline.rules import RULES
from stream.pipeline.training_filter import FILTER_REASONS

PREFIX = "gruflow_"
Role = Literal["worker", "trainer"]
ROLES: tuple[Role, ...] = ("worker", "trainer")
# fields of Metrics only the trainer exports; every other field is the worker's unless it is shared
TRAINER_FAMILIES = ("finetune_rounds", "finetune_duration", "finetune_loss", "promotions", "rejections",
                    "buffer_events", "buffer_bytes", "vocabulary_size", "new_items", "retired_items",
                    "finetune_diverged", "training_filtered", "concentration_refusals")
# both load models from the models topic, so both can refuse one and both serve a version
SHARED_FAMILIES = ("model_version", "model_refusals")
# per-model versions whose prequential series are kept (the newest served ones); older series are removed
PREQUENTIAL_VERSIONS_KEPT = 3
TOPK_ROW_PATHS = ("int8", "float32", "approximate")  # label values of gruflow_topk_rows_total

# from 0.1 ms: a micro-batch GRU step is sub-millisecond per event
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0)
# recommendation requests (stream/worker/http_api.py): endpoints and the statuses they answer with
HTTP_ENDPOINTS = ("user", "anonymous")
HTTP_STATUSES = ("200", "400", "413", "503", "504")
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
STATE_RECORD_BUCKETS = (256, 512, 768, 1024, 1536, 2048, 3072, 4096)  # bytes
FINETUNE_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600)  # seconds


@dataclass(frozen=True)
class Metrics:
    registry: CollectorRegistry
    # worker
    events_in: Counter
    dlq: Counter
    recommendations_out: Counter
    unknown_items: Counter
    topk_rows: Counter
    scorer: Info
    batch_size: Histogram
    step_latency: Histogram
    end_to_end_latency: Histogram
    state_entries: Gauge
    state_evictions: Counter
    state_resets: Counter
    rocksdb_bytes: Gauge
    rocksdb_memory: Gauge
    consumer_lag: Gauge
    model_version: Gauge
    model_swaps: Counter
    model_refusals: Counter
    prequential_events: Counter
    prequential_hits: Counter
    prequential_reciprocal_rank: Counter
    ready: Gauge
    http_requests: Counter
    http_latency: Histogram
    http_routed: Counter
    http_cached_answers: Counter
    rule_masked: Counter
    item_rules: Gauge
    item_rules_rejected: Counter
    state_record_bytes: Histogram
    forgotten_users: Counter
    worker_freezes: Counter
    transactions_fenced: Counter
    changelog_superseded: Counter
    # trainer
    finetune_rounds: Counter
    finetune_duration: Histogram
    finetune_loss: Gauge
    promotions: Counter
    rejections: Counter
    finetune_diverged: Counter
    buffer_events: Gauge
    buffer_bytes: Gauge
    vocabulary_size: Gauge
    new_items: Counter
    retired_items: Counter
    training_filtered: Counter
    concentration_refusals: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry | None = None, *, role: Role = "worker") -> "Metrics":
        """The families of ``role`` registered on ``registry`` (a new one if None), label values at 0."""
        if role not in ROLES:
            raise ValueError(f"unknown metrics role {role!r}; one of {ROLES}")
        target = registry if registry is not None else CollectorRegistry()
        m = cls(registry=target, **_worker_families(), **_trainer_families())
        for name in families_of(role):
            target.register(getattr(m, name))
        init_label_values(m)
        return m


# Every collector is built unregistered (registry=None); ``Metrics.create`` registers those of its role.
def _counter(name: str, doc: str, labels: Sequence[str] = ()) -> Counter:
    return Counter(PREFIX + name, doc, labels, registry=None)


def _gauge(name: str, doc: str) -> Gauge:
    return Gauge(PREFIX + name, doc, registry=None)


def _histogram(name: str, doc: str, labels: Sequence[str] = (), *, buckets: Sequence[float]) -> Histogram:
    return Histogram(PREFIX + name, doc, labels, buckets=buckets, registry=None)


def _info(name: str, doc: str) -> Info:
    return Info(PREFIX + name, doc, registry=None)


def _worker_families() -> dict[str, Any]:
    """The worker's collectors and the shared ones (SHARED_FAMILIES), by Metrics field."""
    return dict(
        events_in=_counter("events_in", "Input events decoded, by topic and event type", ["topic", "event_type"]),
        dlq=_counter("dlq", "Messages sent to the dead-letter topic, by reason", ["reason"]),
        recommendations_out=_counter("recommendations_out", "Recommendation messages published"),
        unknown_items=_counter("unknown_items", "Events whose item is not in the model's vocabulary"),
        topk_rows=_counter("topk_rows", "Events scored for a top-K, by path: int8 (answered from the int8 "
                                        "pre-filter's proven candidates), float32 (the whole catalogue), approximate "
                                        "(the candidates of the model's index, re-scored in float32)", ["path"]),
        scorer=_info("scorer", "Top-K path of the model served (label path: float32, int8, compiled or approximate), "
                               "chosen by timing each on this machine unless GRUFLOW_SCORER_PATH forces one; "
                               "approximate where GRUFLOW_RETRIEVAL says so"),
        batch_size=_histogram("batch_size_events", "Events per processed micro-batch", buckets=BATCH_BUCKETS),
        step_latency=_histogram("step_latency_seconds", "GRU step + top-K scoring time per micro-batch",
                                                        buckets=LATENCY_BUCKETS),
        end_to_end_latency=_histogram("end_to_end_latency_seconds", "Broker append time of the event to publication "
                                                                    "of its recommendation", buckets=LATENCY_BUCKETS),
        state_entries=_gauge("state_entries", "Users held in the active partitions of this worker's state table "
                                              "(exact: counted after each recovery, then kept up to date)"),
        state_evictions=_counter("state_evictions", "Idle users evicted from the state table (TTL)"),
        state_resets=_counter("state_resets", "Hidden states dropped because they were NaN or infinite (the user "
                                              "starts a new session), by reason: non_finite_step (made by a GRU "
                                              "step), non_finite_stored (read back from the state table)",
                                              ["reason"]),
        rocksdb_bytes=_gauge("rocksdb_bytes", "On-disk size of this worker's RocksDB state"),
        rocksdb_memory=_gauge("rocksdb_memory_bytes", "Memory of this worker's RocksDB state: memtables and block "
                                                      "caches of every open partition (GRUFLOW_ROCKSDB_* bound it)"),
        consumer_lag=_gauge("consumer_lag_messages", "Committed lag: input messages after the consumer group's "
                                                     "committed offset, summed over this worker's input partitions"),
        model_version=_gauge("model_version", "Version of the model currently served"),
        model_swaps=_counter("model_swaps", "Model versions swapped in"),
        model_refusals=_counter("model_refusals", "Model versions refused (corrupt, incompatible, non-finite or "
                                                  "absurd weights, not newer than the served one), by reason",
                                                  ["reason"]),
        prequential_events=_counter("prequential_events", "Events checked against the recommendations published "
                                                          "before them, by recommender (gru|popularity) and model "
                                                          "version", ["model", "version"]),
        prequential_hits=_counter("prequential_hits", "Events whose item was in the top-K published before them",
                                                      ["model", "version", "k"]),
        prequential_reciprocal_rank=_counter("prequential_reciprocal_rank", "Sum of 1/rank of the event's item in "
                                                                            "the top-K published before it (0 when "
                                                                            "absent)", ["model", "version", "k"]),
        forgotten_users=_counter("forgotten_users", "Users whose state was tombstoned on request (gruflow forget)"),
        worker_freezes=_counter("worker_freezes", "Times this worker stood still for more than half its group session "
                                                  "timeout (stream/worker/freeze_guard.py); the outputs it then had "
                                                  "were held until the group settled"),
        transactions_fenced=_counter("transactions_fenced", "exactly_once commits or batch sends refused because a "
                                                            "newer producer holds this worker's transactional ids "
                                                            "(its partitions moved, or a transaction timed out; the "
                                                            "open transactions were aborted)"),
        changelog_superseded=_counter("changelog_superseded", "State changelog records skipped by recovery or a "
                                                              "standby because the state already applied for "
                                                              "their user is newer (late writes of a worker that "
                                                              "had lost the partition; docs/takeover.md)"),
        ready=_gauge("ready", "1 once state recovery is done and the worker serves"),
        http_requests=_counter("http_requests", "Recommendation requests answered, by endpoint (user|anonymous) and "
                                                "HTTP status", ["endpoint", "status"]),
        http_latency=_histogram("http_request_duration_seconds", "Time to answer a recommendation request, by "
                                                                 "endpoint (routing to the owning worker included)",
                                                                 ["endpoint"], buckets=LATENCY_BUCKETS),
        http_routed=_counter("http_routed_requests", "User requests forwarded to the worker that owns the user's "
                                                     "partition"),
        http_cached_answers=_counter("http_cached_answers", "User requests answered with the list published after "
                                                            "the user's last event, without scoring "
                                                            "(docs/serving-cost.md)"),
        rule_masked=_counter("rule_masked_items", "Items a business rule kept out of a published list (they would "
                                                  "have been in it), by rule; exposure: items damped out by the "
                                                  "exposure cap", ["rule"]),
        item_rules=_gauge("item_rules_items", "Items with a rule from the item-rules topic"),
        item_rules_rejected=_counter("item_rules_rejected", "item-rules records that could not be read (logged with "
                                                            "the reason; the item's previous rule stays)"),
        state_record_bytes=_histogram("state_record_bytes", "Size of the user state records written",
                                                            buckets=STATE_RECORD_BUCKETS),
    )


def _trainer_families() -> dict[str, Any]:
    """The trainer's collectors (TRAINER_FAMILIES), by Metrics field."""
    return dict(
        finetune_rounds=_counter("finetune_rounds", "Fine-tune rounds run by the trainer"),
        finetune_duration=_histogram("finetune_duration_seconds", "Duration of a fine-tune round",
                                                                  buckets=FINETUNE_BUCKETS),
        finetune_loss=_gauge("finetune_loss", "Mean training loss of the last fine-tune round"),
        promotions=_counter("model_promotions", "Candidate models promoted"),
        rejections=_counter("model_rejections", "Candidate models rejected by the guardrail"),
        finetune_diverged=_counter("finetune_diverged", "Fine-tune rounds discarded because training diverged "
                                                        "(non-finite loss) or left non-finite or absurd weights"),
        buffer_events=_gauge("trainer_buffer_events", "Events held in the trainer's buffer"),
        buffer_bytes=_gauge("trainer_buffer_bytes", "Approximate memory of the trainer's buffer"),
        vocabulary_size=_gauge("vocabulary_items", "Items in the model vocabulary"),
        new_items=_counter("new_items", "Items added to the vocabulary from the stream"),
        retired_items=_counter("retired_items", "Items retired from the vocabulary"),
        training_filtered=_counter("training_filtered", "Input events the trainer did not learn from (the worker "
                                                        "still answered them), by reason "
                                                        "(stream/pipeline/training_filter.py)", ["reason"]),
        concentration_refusals=_counter("model_concentration_refusals", "Candidate models refused because their "
                                                                        "top-K lists concentrate on few items "
                                                                        "(model/exposure.py), by reason", ["reason"]),
    )


def families_of(role: Role) -> list[str]:
    """The Metrics fields a process of ``role`` exports."""
    names = [f.name for f in fields(Metrics) if f.name != "registry"]
    if role == "trainer":
        return [n for n in names if n in TRAINER_FAMILIES or n in SHARED_FAMILIES]
    return [n for n in names if n not in TRAINER_FAMILIES]


def init_label_values(m: Metrics) -> None:
    """Create every known label value at 0 (see the module docstring)."""
    for reason in DLQ_REASONS:
        m.dlq.labels(reason=reason)
    for reason in MODEL_REFUSAL_REASONS:
        m.model_refusals.labels(reason=reason)
    for reason in STATE_RESET_REASONS:
        m.state_resets.labels(reason=reason)
    for endpoint in HTTP_ENDPOINTS:
        m.http_latency.labels(endpoint=endpoint)
        for status in HTTP_STATUSES:
            m.http_requests.labels(endpoint=endpoint, status=status)
    for rule in RULES:
        m.rule_masked.labels(rule=rule)
    for reason in FILTER_REASONS:
        m.training_filtered.labels(reason=reason)
    for reason in CONCENTRATION_REASONS:
        m.concentration_refusals.labels(reason=reason)


class PrequentialVersions:
    """Writes the prequential counters and keeps their ``version`` label bounded: every promoted model
    adds a series per counter, so only the ``keep`` most recently served versions of each recommender
    keep theirs (a removed series goes stale in Prometheus; its history stays queryable)."""

    def __init__(self, metrics: Metrics, k: int, keep: int = PREQUENTIAL_VERSIONS_KEPT) -> None:
        self.metrics = metrics
        self.k = str(k)
        self.keep = keep
        self._served: dict[str, OrderedDict[str, None]] = {}  # model -> versions, least recent first

    def add(self, model: str, version: str, events: int, hits: int, reciprocal_rank: float) -> None:
        m, k = self.metrics, self.k
        m.prequential_events.labels(model=model, version=version).inc(events)
        m.prequential_hits.labels(model=model, version=version, k=k).inc(hits)
        m.prequential_reciprocal_rank.labels(model=model, version=version, k=k).inc(reciprocal_rank)
        served = self._served.setdefault(model, OrderedDict())
        served[version] = None
        served.move_to_end(version)
        while len(served) > self.keep:
            old, _ = served.popitem(last=False)
            m.prequential_events.remove(model, old)
            m.prequential_hits.remove(model, old, k)
            m.prequential_reciprocal_rank.remove(model, old, k)
