"""Prometheus metrics of every gruflow process: base units, prefix ``gruflow_``, no user or item ids
in labels. One ``Metrics`` object per process (tests build their own on a private registry)."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

# from 0.1 ms: a micro-batch GRU step is sub-millisecond per event
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


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
    rocksdb_bytes: Gauge
    consumer_lag: Gauge
    model_version: Gauge
    model_swaps: Counter
    model_refusals: Counter
    prequential_events: Counter
    prequential_hits: Counter
    prequential_reciprocal_rank: Counter
    ready: Gauge
    # trainer
    finetune_rounds: Counter
    finetune_duration: Histogram
    finetune_loss: Gauge
    promotions: Counter
    rejections: Counter
    buffer_events: Gauge
    buffer_bytes: Gauge
    vocabulary_size: Gauge
    new_items: Counter
    retired_items: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry | None = None) -> "Metrics":
        r = registry if registry is not None else CollectorRegistry()
        p = "gruflow_"
        return cls(
            registry=r,
            events_in=Counter(p + "events_in", "Input events decoded, by topic and event type",
                              ["topic", "event_type"], registry=r),
            dlq=Counter(p + "dlq", "Messages sent to the dead-letter topic, by reason", ["reason"], registry=r),
            recommendations_out=Counter(p + "recommendations_out", "Recommendation messages published", registry=r),
            unknown_items=Counter(p + "unknown_items", "Events whose item is not in the model's vocabulary",
                                  registry=r),
            topk_rows=Counter(p + "topk_rows", "Events scored against the whole catalogue, by path: int8 (answered "
                              "from the int8 pre-filter's proven candidates) or float32", ["path"], registry=r),
            scorer=Info(p + "scorer", "Top-K path of the model served (label path: float32, int8 or compiled), "
                        "chosen by timing each on this machine unless GRUFLOW_SCORER_PATH forces one", registry=r),
            batch_size=Histogram(p + "batch_size_events", "Events per processed micro-batch",
                                 buckets=BATCH_BUCKETS, registry=r),
            step_latency=Histogram(p + "step_latency_seconds", "GRU step + top-K scoring time per micro-batch",
                                   buckets=LATENCY_BUCKETS, registry=r),
            end_to_end_latency=Histogram(p + "end_to_end_latency_seconds",
                                         "Broker append time of the event to publication of its recommendation",
                                         buckets=LATENCY_BUCKETS, registry=r),
            state_entries=Gauge(p + "state_entries", "Users held in this worker's state table", registry=r),
            state_evictions=Counter(p + "state_evictions", "Idle users evicted from the state table (TTL)",
                                    registry=r),
            rocksdb_bytes=Gauge(p + "rocksdb_bytes", "On-disk size of this worker's RocksDB state", registry=r),
            consumer_lag=Gauge(p + "consumer_lag_messages", "Messages behind the log end, summed over assigned"
                               " input partitions", registry=r),
            model_version=Gauge(p + "model_version", "Version of the model currently served", registry=r),
            model_swaps=Counter(p + "model_swaps", "Model versions swapped in", registry=r),
            model_refusals=Counter(p + "model_refusals", "Model versions refused (corrupt or incompatible)",
                                   ["reason"], registry=r),
            prequential_events=Counter(p + "prequential_events", "Events checked against the recommendations"
                                       " published before them, by recommender (gru|popularity) and model version", ["model", "version"], registry=r),
            prequential_hits=Counter(p + "prequential_hits", "Events whose item was in the top-K published before"
                                     " them", ["model", "version", "k"], registry=r),
            prequential_reciprocal_rank=Counter(p + "prequential_reciprocal_rank", "Sum of 1/rank of the event's"
                                                " item in the top-K published before it (0 when absent)",
                                                ["model", "version", "k"], registry=r),
            ready=Gauge(p + "ready", "1 once state recovery is done and the worker serves", registry=r),
            finetune_rounds=Counter(p + "finetune_rounds", "Fine-tune rounds run by the trainer", registry=r),
            finetune_duration=Histogram(p + "finetune_duration_seconds", "Duration of a fine-tune round",
                                        buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600), registry=r),
            finetune_loss=Gauge(p + "finetune_loss", "Mean training loss of the last fine-tune round", registry=r),
            promotions=Counter(p + "model_promotions", "Candidate models promoted", registry=r),
            rejections=Counter(p + "model_rejections", "Candidate models rejected by the guardrail", registry=r),
            buffer_events=Gauge(p + "trainer_buffer_events", "Events held in the trainer's buffer", registry=r),
            buffer_bytes=Gauge(p + "trainer_buffer_bytes", "Approximate memory of the trainer's buffer", registry=r),
            vocabulary_size=Gauge(p + "vocabulary_items", "Items in the model vocabulary", registry=r),
            new_items=Counter(p + "new_items", "Items added to the vocabulary from the stream", registry=r),
            retired_items=Counter(p + "retired_items", "Items retired from the vocabulary", registry=r),
        )
