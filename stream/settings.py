"""One settings object for every gruflow process, read once from ``GRUFLOW_*`` environment variables.

The settings come in frozen sections (``settings.connection``, ``settings.topics``, ``settings.worker``, ...).
Every field maps to exactly one variable: ``GRUFLOW_`` + the field name in upper case
(``worker.top_k`` -> ``GRUFLOW_TOP_K``), so field names are unique across sections. docker-compose and k8s
use exactly these names; a test checks it. Each field carries a one-line description (``gruflow config``
prints them with the effective values and where each came from).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping, NamedTuple, get_args, get_type_hints

ENV_PREFIX = "GRUFLOW_"
# the input topics' max.message.bytes (stream/kafka/topics.py): far above any valid event, so an oversize one still
# reaches the worker and goes to the dlq with its reason, whose own limit leaves room for the headers
INPUT_MESSAGE_MAX_BYTES = 1024 * 1024

log = logging.getLogger("gruflow.settings")
# The kubelet injects Docker-link variables for every Service of the pod's namespace (unless the pod
# spec sets enableServiceLinks: false): a Service "gruflow-trainer" yields GRUFLOW_TRAINER_SERVICE_HOST,
# GRUFLOW_TRAINER_PORT, GRUFLOW_TRAINER_PORT_6066_TCP_ADDR, ... Their suffixes after the Service's prefix:
_LINK_SUFFIX = re.compile(r"SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?|PORT(_[0-9]+_(TCP|UDP|SCTP)(_(PROTO|PORT|ADDR))?)?")
_LINK_URL = re.compile(r"(tcp|udp|sctp)://\[?[0-9A-Fa-f.:]+\]?:[0-9]+")


class Secret(str):
    """A string that never shows its value in repr/str of the settings (passwords)."""

    def __repr__(self) -> str:
        return "Secret('***')" if self else "Secret('')"


class SettingsError(ValueError):
    """A setting has a value that cannot be used; the message names the variable."""


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
    because: bool = setting(False, "each recommended item names the 1-2 recent session items most similar to it "
                                   "(model/attribution.py); the state record then keeps the user's last items")
    because_history: int = setting(5, "recent items kept per user for \"because\" (4 bytes each in the state record)")


SECTIONS: dict[str, type] = {"connection": Connection, "topics": Topics, "process": Process, "worker": Worker,
                             "scoring": Scoring, "rules": Rules, "store": Store, "trainer": Trainer, "broker": Broker,
                             "serving": Serving}
# field name -> its section; names are unique across sections (one GRUFLOW_* variable each)
SECTION_OF: dict[str, str] = {f.name: section for section, cls in SECTIONS.items() for f in fields(cls)}


class SettingInfo(NamedTuple):
    """One row of ``gruflow config``."""

    section: str
    env_name: str
    value: str
    source: str  # "env" or "default"
    description: str


@dataclass(frozen=True)
class Settings:
    connection: Connection = field(default_factory=Connection)
    topics: Topics = field(default_factory=Topics)
    process: Process = field(default_factory=Process)
    worker: Worker = field(default_factory=Worker)
    scoring: Scoring = field(default_factory=Scoring)
    rules: Rules = field(default_factory=Rules)
    store: Store = field(default_factory=Store)
    trainer: Trainer = field(default_factory=Trainer)
    broker: Broker = field(default_factory=Broker)
    serving: Serving = field(default_factory=Serving)

    @classmethod
    def of(cls, **values: Any) -> "Settings":
        """Settings from field names (``Settings.of(top_k=5)``), each routed to its section."""
        return cls().replace(**values)

    @property
    def embedded(self) -> bool:
        return not self.connection.bootstrap_servers

    def web_url(self) -> str:
        """Where the other workers reach this one's web port (``advertised_url``, else by host name)."""
        if self.serving.advertised_url:
            return self.serving.advertised_url.rstrip("/")
        import socket

        return f"http://{socket.gethostname()}:{self.process.web_port}"

    def topic(self, name: str) -> str:
        """The topic gruflow calls ``name`` ("clicks", "item-rules", ...): its own setting, or prefix + name."""
        own = getattr(self.topics, "topic_" + name.replace("-", "_"), "") if name != "prefix" else ""
        return own or f"{self.topics.topic_prefix}{name}"

    def replace(self, **changes: Any) -> "Settings":
        """A copy with fields changed by name (``replace(top_k=5, partitions=2)``), whatever their section."""
        unknown = sorted(set(changes) - set(SECTION_OF))
        if unknown:
            raise TypeError(f"unknown setting(s): {', '.join(unknown)}")
        by_section: dict[str, dict[str, Any]] = {}
        for name, value in changes.items():
            by_section.setdefault(SECTION_OF[name], {})[name] = value
        return dataclasses.replace(self, **{s: dataclasses.replace(getattr(self, s), **v)
                                            for s, v in by_section.items()})

    def values(self) -> Iterator[tuple[str, str, Any]]:
        """(section, field name, value) for every field, in declaration order."""
        for section in SECTIONS:
            part = getattr(self, section)
            for f in fields(part):
                yield section, f.name, getattr(part, f.name)

    def subprocess_env(self, **extra: str) -> dict[str, str]:
        """os.environ without stray GRUFLOW_* variables, plus every field as GRUFLOW_*: the environment of a
        gruflow subprocess (worker, trainer) configured exactly like this object; ``extra`` wins."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
        env.update({ENV_PREFIX + name.upper(): str(value) for _, name, value in self.values()})
        env.update(extra)
        return env

    @classmethod
    def env_names(cls) -> set[str]:
        return {ENV_PREFIX + name.upper() for name in SECTION_OF}

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> "Settings":
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        links = service_link_names(environ, cls.env_names())
        if links:
            log.warning("ignoring %d Kubernetes service-link variable(s) %s (set enableServiceLinks: false in the "
                        "pod spec to keep them out)", len(links), ", ".join(sorted(links)))
        unknown = sorted(k for k in environ if k.startswith(ENV_PREFIX) and k not in cls.env_names()
                         and k not in links)
        if unknown:
            raise SettingsError(f"unknown setting(s): {', '.join(unknown)}; known: {sorted(cls.env_names())}")
        for section_cls in SECTIONS.values():
            hints = get_type_hints(section_cls)
            for f in fields(section_cls):
                name = ENV_PREFIX + f.name.upper()
                if name in environ:
                    values[f.name] = _parse(name, environ[name], hints[f.name])
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls.of(**values)
        settings.validate()
        return settings

    def describe(self, environ: Mapping[str, str] | None = None) -> list[SettingInfo]:
        """Every field with its effective value (secrets masked), its source and its description."""
        environ = os.environ if environ is None else environ
        descriptions = {f.name: f.metadata["description"] for cls in SECTIONS.values() for f in fields(cls)}
        rows = []
        for section, name, value in self.values():
            env_name = ENV_PREFIX + name.upper()
            shown = ("***" if value else "") if isinstance(value, Secret) else str(value)
            rows.append(SettingInfo(section, env_name, shown, "env" if env_name in environ else "default",
                                    descriptions[name]))
        return rows

    def validate(self) -> None:
        w, sc, st = self.worker, self.scoring, self.store
        checks = [
            (self.topics.partitions >= 1, "GRUFLOW_PARTITIONS must be >= 1"),
            (sc.top_k >= 1, "GRUFLOW_TOP_K must be >= 1"),
            (w.batch_max_events >= 1, "GRUFLOW_BATCH_MAX_EVENTS must be >= 1"),
            (w.batch_max_ms >= 0, "GRUFLOW_BATCH_MAX_MS must be >= 0"),
            (sc.torch_threads >= 1, "GRUFLOW_TORCH_THREADS must be >= 1"),
            (sc.scoring_threads >= 1, "GRUFLOW_SCORING_THREADS must be >= 1"),
            (sc.compiled_topk or sc.scorer_path != "compiled",
             "GRUFLOW_SCORER_PATH=compiled needs GRUFLOW_COMPILED_TOPK=true"),
            (sc.retrieval_target_events_per_s > 0, "GRUFLOW_RETRIEVAL_TARGET_EVENTS_PER_S must be > 0"),
            (sc.retrieval_nlist >= 0, "GRUFLOW_RETRIEVAL_NLIST must be >= 0 (0: from the catalogue size)"),
            (min(sc.retrieval_nprobe, sc.retrieval_candidates, sc.retrieval_rebuild_every,
                 sc.retrieval_build_threads) >= 1,
             "GRUFLOW_RETRIEVAL_NPROBE, _CANDIDATES, _REBUILD_EVERY and _BUILD_THREADS must be >= 1"),
            (0 < self.process.web_port < 65536, "GRUFLOW_WEB_PORT must be a TCP port"),
            (1 <= self.serving.serve_max_k <= 1000, "GRUFLOW_SERVE_MAX_K must be between 1 and 1000"),
            (self.serving.serve_max_items >= 1, "GRUFLOW_SERVE_MAX_ITEMS must be >= 1"),
            (self.serving.serve_max_body_bytes >= 256, "GRUFLOW_SERVE_MAX_BODY_BYTES must be >= 256"),
            (self.serving.serve_timeout_s > 0, "GRUFLOW_SERVE_TIMEOUT_S must be > 0"),
            (1 <= self.serving.because_history <= 16, "GRUFLOW_BECAUSE_HISTORY must be between 1 and 16 (it is kept "
             "in every user's state record)"),
            (not self.serving.advertised_url or self.serving.advertised_url.startswith(("http://", "https://")),
             "GRUFLOW_ADVERTISED_URL must be an http:// or https:// URL"),
            (w.session_gap_s > 0, "GRUFLOW_SESSION_GAP_S must be > 0"),
            (st.rocksdb_write_buffer_bytes >= 64 * 1024, "GRUFLOW_ROCKSDB_WRITE_BUFFER_BYTES must be >= 65536"),
            (st.rocksdb_max_write_buffers >= 2, "GRUFLOW_ROCKSDB_MAX_WRITE_BUFFERS must be >= 2 (one to fill while "
             "another is flushed; RocksDB raises smaller values to 2)"),
            (st.rocksdb_block_cache_bytes >= 0, "GRUFLOW_ROCKSDB_BLOCK_CACHE_BYTES must be >= 0"),
            (self.rules.rule_bought_days > 0, "GRUFLOW_RULE_BOUGHT_DAYS must be > 0"),
            (0 <= self.rules.rule_state_items <= 255, "GRUFLOW_RULE_STATE_ITEMS must be between 0 and 255"),
            (0 <= self.rules.rule_candidates <= 1000, "GRUFLOW_RULE_CANDIDATES must be between 0 and 1000"),
            (0.0 <= self.rules.exposure_cap <= 1.0, "GRUFLOW_EXPOSURE_CAP must be between 0 (off) and 1"),
            (self.rules.exposure_window_s > 0, "GRUFLOW_EXPOSURE_WINDOW_S must be > 0"),
            (self.rules.exposure_damping >= 1.0, "GRUFLOW_EXPOSURE_DAMPING must be >= 1"),
            (0 < w.max_message_bytes <= INPUT_MESSAGE_MAX_BYTES,
             f"GRUFLOW_MAX_MESSAGE_BYTES must be between 1 and {INPUT_MESSAGE_MAX_BYTES} (the input topics' "
             "max.message.bytes)"),
        ]
        for ok, message in checks:
            if not ok:
                raise SettingsError(message)
        from stream.pipeline.events import InputShape  # pure; imported here, where it is needed

        try:
            InputShape.parse(w.field_map, w.event_type_map)
        except ValueError as exc:
            raise SettingsError(str(exc)) from None


def service_link_names(environ: Mapping[str, str], known: set[str]) -> set[str]:
    """The ``GRUFLOW_*`` names in ``environ`` that the kubelet injected for a Service, not a setting.

    A name counts only when its Service's ``<PREFIX>_SERVICE_HOST`` holds an IP address (the kubelet always
    sets it) and its own value has the kubelet's shape, so a misspelt setting is still refused."""
    hosts = {k[:-len("SERVICE_HOST")] for k, v in environ.items()
             if k.startswith(ENV_PREFIX) and k.endswith("_SERVICE_HOST") and _is_ip(v)}
    links = set()
    for name, value in environ.items():
        if name in known or not name.startswith(ENV_PREFIX):
            continue
        for prefix in hosts:
            if name.startswith(prefix) and _LINK_SUFFIX.fullmatch(name[len(prefix):]) \
                    and _link_value_fits(name[len(prefix):], value):
                links.add(name)
                break
    return links


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _link_value_fits(suffix: str, value: str) -> bool:
    if suffix == "SERVICE_HOST" or suffix.endswith("_ADDR"):
        return _is_ip(value)
    if suffix.startswith("SERVICE_PORT") or suffix.endswith("_PORT"):
        return value.isdigit()
    if suffix.endswith("_PROTO"):
        return value in ("tcp", "udp", "sctp")
    return _LINK_URL.fullmatch(value) is not None  # <PREFIX>_PORT and <PREFIX>_PORT_<n>_<PROTO>


def _parse(name: str, raw: str, hint: Any) -> Any:
    try:
        if hint is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if hint in (int, float, str, Path, Secret):
            return hint(raw)
        allowed = get_args(hint)
        if allowed:
            if raw not in allowed:
                raise ValueError(f"{raw!r} is not one of {allowed}")
            return raw
    except ValueError as exc:
        raise SettingsError(f"{name}={raw!r}: {exc}") from None
    return raw


def settings_markdown() -> str:
    """docs/settings.md: one table per section (``python -m stream.settings > docs/settings.md``)."""
    out = ["# Settings", "", "Every gruflow process reads these `GRUFLOW_*` environment variables once at start-up; "
           "an unknown `GRUFLOW_*` name is refused. `gruflow config` prints the effective values, where each came "
           "from (env or default) and these descriptions, with secrets masked. This file is generated by "
           "`python -m stream.settings > docs/settings.md`.", ""]
    descriptions = Settings().describe({})
    for section, cls in SECTIONS.items():
        out += [f"## {section}", "", (cls.__doc__ or "").strip(), "", "| variable | default | meaning |",
                "|---|---|---|"]
        out += [f"| `{r.env_name}` | {_cell(r.value)} | {r.description} |"
                for r in descriptions if r.section == section]
        out.append("")
    return "\n".join(out)


def _cell(value: str) -> str:
    return f"`{value}`" if value else "(empty)"


if __name__ == "__main__":
    print(settings_markdown(), end="")
