"""One settings object for every gruflow process, read once from ``GRUFLOW_*`` environment variables.

The settings come in frozen sections (``settings.connection``, ``settings.topics``, ``settings.worker``, ...).
Every field maps to exactly one variable: ``GRUFLOW_`` + the field name in upper case
(``worker.top_k`` -> ``GRUFLOW_TOP_K``), so field names are unique across sections. docker-compose and k8s
use exactly these names; a test checks it. Each field carries a one-line description (``gruflow config``
prints them with the effective values and where each came from). The sections themselves are declared in
stream/settings_sections.py.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator, Mapping, NamedTuple, get_args, get_type_hints

# the sections are declared in their own module; their names stay importable from here
from stream.settings_sections import (SECTION_OF, SECTIONS, Broker, Connection, Process, Rules, Scoring, Secret,
                                      Serving, Store, Topics, Trainer, Worker)

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


class SettingsError(ValueError):
    """A setting has a value that cannot be used; the message names the variable."""


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

    @staticmethod
    def parse_changes(texts: Mapping[str, str]) -> dict[str, Any]:
        """Field values from text by field name (``{"top_k": "5"}`` -> ``{"top_k": 5}``), parsed as the
        environment's are: for ``replace`` from a command line."""
        out: dict[str, Any] = {}
        for name, raw in texts.items():
            if name not in SECTION_OF:
                raise SettingsError(f"unknown setting {name!r}")
            hint = get_type_hints(SECTIONS[SECTION_OF[name]])[name]
            out[name] = _parse(name, raw, hint)
        return out

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
