"""The sections of gruflow's settings: one frozen dataclass per area, each field one ``GRUFLOW_*`` variable.

A field's name is unique across sections (``GRUFLOW_`` + the name in upper case is its variable) and its
metadata carries the one-line description that ``gruflow config`` and docs/settings.md show. Reading the
environment, validation and the ``Settings`` object that holds one of each section are in stream/settings.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal


class Secret(str):
    """A string that never shows its value in repr/str of the settings (passwords)."""

    def __repr__(self) -> str:
        return "Secret('***')" if self else "Secret('')"


def setting(default: Any, description: str) -> Any:
    """A settings field with its one-line description (shown by ``gruflow config``)."""
    return field(default=default, metadata={"description": description})


@dataclass(frozen=True)
class Connection:
    """How every process reaches the Kafka cluster."""

    bootstrap_servers: str = setting("", "Kafka bootstrap servers (host:port,...); empty = start the embedded "
                                         "Apache Kafka broker")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = setting(
        "PLAINTEXT", "Kafka security protocol")
    sasl_mechanism: str = setting("", "SASL mechanism: PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 or OAUTHBEARER (with the "
                                      "sasl.oauthbearer.* properties in GRUFLOW_LIBRDKAFKA_CONFIG)")
    sasl_username: str = setting("", "SASL user name")
    sasl_password: Secret = setting(Secret(""), "SASL password (never printed)")
    ssl_cafile: str = setting("", "CA bundle (PEM) that signs the brokers' certificates")
    ssl_certfile: str = setting("", "client certificate (PEM) for mutual TLS")
    ssl_keyfile: str = setting("", "client private key (PEM) for mutual TLS")
    librdkafka_config: str = setting("", "any other librdkafka property by its own name: name=value per line or "
                                         "';'-separated, or a JSON object; the ones aiokafka knows are translated "
                                         "(docs/kafka-setups.md)")
    aiokafka_config: str = setting("", "aiokafka keyword arguments by their own names, same syntax, for gruflow's "
                                       "aiokafka producer; win over translated ones")


@dataclass(frozen=True)
class Topics:
    """Names and layout of gruflow's topics."""

    topic_prefix: str = setting("gruflow.", "prefix of every topic name (clicks, purchases, recommendations, ...)")
    partitions: int = setting(8, "partitions of the keyed topics (input, state changelog, recommendations)")
    replication_factor: int = setting(1, "replication factor of the topics gruflow creates")
    topic_clicks: str = setting("", "name of the clicks topic (empty = prefix + clicks)")
    topic_purchases: str = setting("", "name of the purchases topic (empty = prefix + purchases)")
    topic_recommendations: str = setting("", "name of the recommendations topic (empty = prefix + recommendations)")
    topic_dlq: str = setting("", "name of the dead-letter topic (empty = prefix + dlq)")
    topic_models: str = setting("", "name of the models topic (empty = prefix + models)")
    topic_item_rules: str = setting("", "name of the catalogue rules topic (empty = prefix + item-rules)")
    topic_control: str = setting("", "name of the control topic: requests about one user such as gruflow forget "
                                     "(empty = prefix + control)")
    topic_flagged_users: str = setting("", "name of the topic that samples the user ids the training filter flagged "
                                           "(empty = prefix + flagged-users)")
    topic_events: str = setting("", "one input topic for every event type, routed by event_type, instead of "
                                    "clicks + purchases (empty = the split topics)")


@dataclass(frozen=True)
class Process:
    """What every gruflow process (worker, trainer) has: identity, local data, HTTP port, logging."""

    app_id: str = setting("gruflow", "consumer group and state-table name; workers with one app_id share the load")
    data_dir: Path = setting(Path("var"), "local data: RocksDB state, model store")
    web_host: str = setting("0.0.0.0", "address of the HTTP server (/metrics, /healthz, /readyz)")
    web_port: int = setting(6066, "port of the HTTP server")
    log_level: str = setting("INFO", "Python log level")


@dataclass(frozen=True)
class Worker:
    """The recommendation worker: batches, limits, per-user state."""

    processing_guarantee: Literal["at_least_once", "exactly_once"] = setting(
        "at_least_once", "at_least_once, or exactly_once (Kafka transactions)")
    batch_max_events: int = setting(2000, "most events in one batch")
    batch_max_ms: float = setting(20.0, "longest wait to fill a batch, in milliseconds")
    session_gap_s: float = setting(1800.0, "idle time after which a user's next event starts a new session")
    max_message_bytes: int = setting(65536, "largest accepted event; larger ones go to the dead-letter topic")
    max_id_bytes: int = setting(256, "longest accepted user or item id, in UTF-8 bytes")
    state_ttl_s: float = setting(0.0, "evict users idle this long (0 = never)")
    broker_session_timeout_s: float = setting(10.0, "consumer-group session timeout: how fast a killed worker's "
                                                    "partitions move (>= the broker's 6 s minimum)")
    field_map: str = setting("", "the shop's field names: gruflow's=theirs, comma-separated, e.g. "
                                 "user_id=visitorid,item_id=itemid,ts=timestamp,event_type=event")
    event_type_map: str = setting("", "the shop's event_type values: theirs=gruflow's, e.g. "
                                      "addtocart=cart,transaction=purchase")
    event_loop: Literal["uvloop", "asyncio"] = setting(
        "uvloop", "the worker's event loop: uvloop (libuv; cheaper sockets for Kafka and HTTP) or Python's asyncio")
    livez_stall_s: float = setting(60.0, "/livez fails once the stream's event loop has not turned for this long "
                                         "(0 = never; a broker outage does not stop it turning)")


@dataclass(frozen=True)
class Rules:
    """Business rules at scoring time (docs/rules.md): masked before the top-K, so K items remain."""

    rule_bought: Literal["off", "forever", "days"] = setting(
        "off", "items the user bought: off, never again (forever), or not for GRUFLOW_RULE_BOUGHT_DAYS (days)")
    rule_bought_days: float = setting(30.0, "days a bought item stays masked with GRUFLOW_RULE_BOUGHT=days")
    rule_session_viewed: bool = setting(False, "mask the items viewed or clicked in the current session")
    rule_session_cart: bool = setting(False, "mask the items put in the cart in the current session")
    rule_state_items: int = setting(32, "purchases, and session items, kept per user in the state record (each)")
    rule_exclude_categories: str = setting("", "comma-separated categories (item-rules topic) never shown")
    rule_include_categories: str = setting("", "comma-separated categories: only their items are shown")
    rule_candidates: int = setting(16, "extra items the top-K fetches to replace masked ones")
    exposure_cap: float = setting(0.0, "largest share of the lists of the window one item may take (0 = off); "
                                       "past it the item's score is damped")
    exposure_window_s: float = setting(300.0, "sliding window of the exposure cap, in seconds")
    exposure_damping: float = setting(100.0, "past the cap, the item's probability is divided by this (>= 1)")


@dataclass(frozen=True)
class Scoring:
    """How the worker's model scores: top-K size, threads, the top-K kernel, the served checkpoint."""

    top_k: int = setting(20, "recommendations per event")
    torch_threads: int = setting(1, "torch's own (OpenMP) threads in the worker")
    scoring_threads: int = setting(2, "threads that score the chunks of a batch's top-K at once")
    compiled_topk: bool = setting(True, "allow the compiled int8 top-K kernel where it runs (model/native.py)")
    compiled_topk_isa: Literal["auto", "avx512_vnni", "avx2"] = setting(
        "auto", "instruction set of the compiled top-K kernel: auto = AVX-512 VNNI where the CPU has it, else AVX2; "
                "avx2 also runs on an AVX-512 CPU (to measure what an AVX2-only machine gets)")
    scorer_path: Literal["auto", "float32", "int8", "compiled"] = setting(
        "auto", "top-K path: auto = time each path that runs here and keep the fastest exact one; a name "
                "forces that path")
    model_path: str = setting("", "checkpoint to serve when the models topic has none")
    retrieval: Literal["exact", "approximate", "auto"] = setting(
        "auto", "top-K from an index of the items (docs/retrieval.md): exact = never, approximate = always, auto = "
                "where the calibrated exact path is slower than the target rate (50,000 items or more)")
    retrieval_target_events_per_s: float = setting(10000.0, "the rate retrieval=auto compares the exact path with")
    retrieval_nlist: int = setting(0, "IVF lists of the item index (0 = the power of two nearest 2 sqrt(items))")
    retrieval_nprobe: int = setting(16, "index lists searched per event")
    retrieval_candidates: int = setting(100, "candidates per event from the index, re-scored exactly")
    retrieval_rebuild_every: int = setting(10, "model versions per full index build (incremental updates between)")
    retrieval_build_threads: int = setting(2, "OpenMP threads of the background index build")

    @property
    def compiled_kernel(self) -> bool | str:
        """``TopKScorer``'s ``compiled``: False (off), True (the best instruction set here) or the one named."""
        return self.compiled_topk and (True if self.compiled_topk_isa == "auto" else self.compiled_topk_isa)


@dataclass(frozen=True)
class Store:
    """RocksDB memory per state partition the worker holds (docs/operations.md)."""

    rocksdb_write_buffer_bytes: int = setting(8 * 1024 * 1024, "size of one RocksDB memtable")
    rocksdb_max_write_buffers: int = setting(2, "memtables per partition (>= 2: one fills while one flushes)")
    rocksdb_block_cache_bytes: int = setting(16 * 1024 * 1024, "RocksDB block cache per partition")


@dataclass(frozen=True)
class Trainer:
    """Online learning: when the trainer fine-tunes, what it keeps, when it publishes."""

    finetune_interval_s: float = setting(60.0, "fine-tune at least this often, in seconds (with new events)")
    finetune_every_events: int = setting(20000, "fine-tune after this many new events")
    buffer_max_events: int = setting(200000, "most events kept in the training buffer")
    buffer_max_age_s: float = setting(6 * 3600.0, "oldest event kept in the training buffer, in seconds")
    reservoir_sessions: int = setting(2000, "older sessions kept in a reservoir against forgetting")
    guardrail_tolerance: float = setting(0.02, "largest accepted drop of recall@K or MRR@K on held-out events")
    new_item_min_count: int = setting(3, "events an unseen item needs before it joins the vocabulary")
    item_retire_after_s: float = setting(0.0, "retire items unseen this long (0 = never)")
    models_keep: int = setting(5, "model versions kept in the local model store")
    trainer_torch_threads: int = setting(1, "torch threads of the trainer")
    finetune_learning_rate: float = setting(0.03, "fine-tuning learning rate (0 = the model's own)")
    # training-path defences (docs/security.md): what the trainer learns from, what it may promote
    training_filter: bool = setting(False, "per-user anomaly checks on the training path: flagged users are answered "
                                           "but not learned from (stream/pipeline/training_filter.py)")
    training_sources: str = setting("", "comma-separated allow-list of event sources (the events' JSON field "
                                        "event_source) that train (empty = all)")
    filter_min_events: int = setting(6, "events a session needs before the filter judges it")
    filter_max_events_per_s: float = setting(0.5, "flag a session faster than this mean rate (events/s)")
    filter_max_session_events: int = setting(60, "flag a session longer than this")
    filter_min_gap_cv: float = setting(0.08, "flag a session whose inter-event gaps vary less (coefficient of "
                                             "variation)")
    filter_min_item_diversity: float = setting(0.1, "flag a session with fewer distinct items per event")
    flagged_sample_rate: float = setting(1.0, "share of newly flagged users whose id goes to the flagged-users topic")
    guardrail_max_gini_increase: float = setting(0.0, "refuse a candidate whose exposure Gini rises more (0 = off)")
    guardrail_min_coverage_ratio: float = setting(0.0, "refuse a candidate whose catalogue coverage falls below this "
                                                       "share of the current one (0 = off)")
    guardrail_max_item_exposure_factor: float = setting(0.0, "refuse a candidate that lifts one item's share of top-K "
                                                             "lists by more than this factor (0 = off)")
    guardrail_hold_back_items: int = setting(3, "with the item-exposure check on: before refusing, give up to this "
                                                "many of the items that rise most their current output rows back")


@dataclass(frozen=True)
class Broker:
    """The embedded Apache Kafka broker used when no bootstrap servers are set."""

    kafka_cache_dir: str = setting("", "where the Apache Kafka jars are cached (empty = "
                                       "~/.cache/gruflow/kafka-<version>)")


@dataclass(frozen=True)
class Serving:
    """Recommendations on request (docs/http-api.md) and "because" attributions."""

    advertised_url: str = setting("", "this worker's web address as the other workers reach it, exchanged in faust's "
                                      "group assignment so requests for users it owns are forwarded to it (empty = "
                                      "http://<hostname>:<web_port>)")
    serve_max_k: int = setting(100, "largest k a request may ask for")
    serve_max_items: int = setting(50, "most items of an anonymous session (POST /recommendations)")
    serve_max_body_bytes: int = setting(16384, "largest request body")
    serve_timeout_s: float = setting(2.0, "a request not answered by then gets 504 (forwarding and waiting included)")
    serve_cache_users: int = setting(50000, "users whose last published list is kept in memory to answer their "
                                            "requests without scoring (about 0.6 KB each; 0 = score every request)")
    serve_cache_max_age_s: float = setting(60.0, "a kept list answers requests for at most this long after it was "
                                                 "ranked: how far an answer may lag rules that change with time "
                                                 "alone (exposure damping, purchase windows)")
    because: bool = setting(False, "each recommended item names the 1-2 recent session items most similar to it "
                                   "(model/attribution.py); the state record then keeps the user's last items")
    because_history: int = setting(5, "recent items kept per user for \"because\" (4 bytes each in the state record)")


SECTIONS: dict[str, type] = {"connection": Connection, "topics": Topics, "process": Process, "worker": Worker,
                             "scoring": Scoring, "rules": Rules, "store": Store, "trainer": Trainer, "broker": Broker,
                             "serving": Serving}
# field name -> its section; names are unique across sections (one GRUFLOW_* variable each)
SECTION_OF: dict[str, str] = {f.name: section for section, cls in SECTIONS.items() for f in fields(cls)}
