"""One settings object for every gruflow process, read once from ``GRUFLOW_*`` environment variables.

Every field maps to exactly one variable: ``GRUFLOW_`` + the field name in upper case
(``top_k`` -> ``GRUFLOW_TOP_K``). docker-compose and k8s use exactly these names; a test checks it.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, Mapping, get_args, get_type_hints

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


@dataclass(frozen=True)
class Settings:
    # --- Kafka connection: empty bootstrap_servers means "start the embedded Apache Kafka broker"
    bootstrap_servers: str = ""
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: str = ""  # PLAIN, SCRAM-SHA-256, SCRAM-SHA-512
    sasl_username: str = ""
    sasl_password: Secret = Secret("")
    ssl_cafile: str = ""
    ssl_certfile: str = ""
    ssl_keyfile: str = ""

    # --- topics
    topic_prefix: str = "gruflow."
    partitions: int = 8
    replication_factor: int = 1

    # --- worker
    app_id: str = "gruflow"
    data_dir: Path = Path("var")
    web_host: str = "0.0.0.0"
    web_port: int = 6066
    processing_guarantee: Literal["at_least_once", "exactly_once"] = "at_least_once"
    batch_max_events: int = 2000
    batch_max_ms: float = 20.0
    session_gap_s: float = 1800.0
    top_k: int = 20
    torch_threads: int = 1  # torch's own (OpenMP) threads in the worker
    scoring_threads: int = 2  # threads that score the chunks of a batch's top-K at once
    compiled_topk: bool = True  # the compiled int8 top-K kernel where it runs (model/native.py); else torch
    # top-K path: "auto" times each path that can run here on the served model and keeps the fastest exact
    # one (model/topk_calibration.py); a path name forces that path where it can run
    scorer_path: Literal["auto", "float32", "int8", "compiled"] = "auto"
    # top-K from an index of the items (docs/retrieval.md): "exact" never, "approximate" always, "auto" where
    # the calibrated exact path is slower than the target rate (catalogues of 50,000 items or more)
    retrieval: Literal["exact", "approximate", "auto"] = "auto"
    retrieval_target_events_per_s: float = 10000.0
    retrieval_nlist: int = 0  # IVF lists; 0 = the power of two nearest 2 sqrt(items)
    retrieval_nprobe: int = 16  # lists searched per event
    retrieval_candidates: int = 100  # candidates per event from the index, re-scored exactly
    retrieval_rebuild_every: int = 10  # model versions per full index build (incremental updates between)
    retrieval_build_threads: int = 2  # OpenMP threads of the background index build
    model_path: str = ""  # checkpoint to serve when the models topic has none
    max_message_bytes: int = 65536
    max_id_bytes: int = 256
    state_ttl_s: float = 0.0  # 0 = never evict idle users
    # RocksDB memory per state partition the worker holds (docs/operations.md): memtables + block cache
    rocksdb_write_buffer_bytes: int = 8 * 1024 * 1024
    rocksdb_max_write_buffers: int = 2
    rocksdb_block_cache_bytes: int = 16 * 1024 * 1024
    log_level: str = "INFO"

    # --- online learning (trainer)
    finetune_interval_s: float = 60.0
    finetune_every_events: int = 20000
    buffer_max_events: int = 200000
    buffer_max_age_s: float = 6 * 3600.0
    reservoir_sessions: int = 2000
    guardrail_tolerance: float = 0.02
    new_item_min_count: int = 3
    item_retire_after_s: float = 0.0  # 0 = never retire
    models_keep: int = 5
    trainer_torch_threads: int = 1
    finetune_learning_rate: float = 0.03  # 0 = the model's own learning rate

    # --- embedded broker: where the Apache Kafka jars are cached ("" = ~/.cache/gruflow/kafka-<version>)
    kafka_cache_dir: str = ""

    # --- worker group membership: how fast a killed worker's partitions move (>= the broker's 6 s minimum)
    broker_session_timeout_s: float = 10.0

    @property
    def embedded(self) -> bool:
        return not self.bootstrap_servers

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"

    def replace(self, **changes: Any) -> "Settings":
        return dataclasses.replace(self, **changes)

    def subprocess_env(self, **extra: str) -> dict[str, str]:
        """os.environ without stray GRUFLOW_* variables, plus every field as GRUFLOW_*: the environment of a
        gruflow subprocess (worker, trainer) configured exactly like this object; ``extra`` wins."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
        env.update({ENV_PREFIX + f.name.upper(): str(getattr(self, f.name)) for f in fields(self)})
        env.update(extra)
        return env

    @classmethod
    def env_names(cls) -> set[str]:
        return {ENV_PREFIX + f.name.upper() for f in fields(cls)}

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> "Settings":
        environ = os.environ if environ is None else environ
        hints = get_type_hints(cls)
        values: dict[str, Any] = {}
        links = service_link_names(environ, cls.env_names())
        if links:
            log.warning("ignoring %d Kubernetes service-link variable(s) %s (set enableServiceLinks: false in the "
                        "pod spec to keep them out)", len(links), ", ".join(sorted(links)))
        unknown = sorted(k for k in environ if k.startswith(ENV_PREFIX) and k not in cls.env_names()
                         and k not in links)
        if unknown:
            raise SettingsError(f"unknown setting(s): {', '.join(unknown)}; known: {sorted(cls.env_names())}")
        for f in fields(cls):
            name = ENV_PREFIX + f.name.upper()
            if name in environ:
                values[f.name] = _parse(name, environ[name], hints[f.name])
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        checks = [
            (self.partitions >= 1, "GRUFLOW_PARTITIONS must be >= 1"),
            (self.top_k >= 1, "GRUFLOW_TOP_K must be >= 1"),
            (self.batch_max_events >= 1, "GRUFLOW_BATCH_MAX_EVENTS must be >= 1"),
            (self.batch_max_ms >= 0, "GRUFLOW_BATCH_MAX_MS must be >= 0"),
            (self.torch_threads >= 1, "GRUFLOW_TORCH_THREADS must be >= 1"),
            (self.scoring_threads >= 1, "GRUFLOW_SCORING_THREADS must be >= 1"),
            (self.compiled_topk or self.scorer_path != "compiled",
             "GRUFLOW_SCORER_PATH=compiled needs GRUFLOW_COMPILED_TOPK=true"),
            (self.retrieval_target_events_per_s > 0, "GRUFLOW_RETRIEVAL_TARGET_EVENTS_PER_S must be > 0"),
            (self.retrieval_nlist >= 0, "GRUFLOW_RETRIEVAL_NLIST must be >= 0 (0: from the catalogue size)"),
            (min(self.retrieval_nprobe, self.retrieval_candidates, self.retrieval_rebuild_every,
                 self.retrieval_build_threads) >= 1,
             "GRUFLOW_RETRIEVAL_NPROBE, _CANDIDATES, _REBUILD_EVERY and _BUILD_THREADS must be >= 1"),
            (0 < self.web_port < 65536, "GRUFLOW_WEB_PORT must be a TCP port"),
            (self.session_gap_s > 0, "GRUFLOW_SESSION_GAP_S must be > 0"),
            (self.rocksdb_write_buffer_bytes >= 64 * 1024, "GRUFLOW_ROCKSDB_WRITE_BUFFER_BYTES must be >= 65536"),
            (self.rocksdb_max_write_buffers >= 2, "GRUFLOW_ROCKSDB_MAX_WRITE_BUFFERS must be >= 2 (one to fill while "
             "another is flushed; RocksDB raises smaller values to 2)"),
            (self.rocksdb_block_cache_bytes >= 0, "GRUFLOW_ROCKSDB_BLOCK_CACHE_BYTES must be >= 0"),
            (0 < self.max_message_bytes <= INPUT_MESSAGE_MAX_BYTES,
             f"GRUFLOW_MAX_MESSAGE_BYTES must be between 1 and {INPUT_MESSAGE_MAX_BYTES} (the input topics' "
             "max.message.bytes)"),
        ]
        for ok, message in checks:
            if not ok:
                raise SettingsError(message)


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
