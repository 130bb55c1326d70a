"""Every GRUFLOW_* variable that docker-compose, the manifests or the Dockerfile set is a real setting
(Settings.from_env refuses unknown ones at start-up, so a typo would crash-loop a pod), and the values
they set parse."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from deploykit import COMPOSE_FILE, GRUFLOW_NAME, K8S, ROOT, all_of, compose_config, pod_env
from stream.settings import Settings

SOURCES = [COMPOSE_FILE, ROOT / "Dockerfile", *sorted(K8S.rglob("*.yaml"))]


def names_in(path: Path) -> set[str]:
    return set(GRUFLOW_NAME.findall(path.read_text()))


def unknown_names(paths: list[Path]) -> dict[str, list[str]]:
    known = Settings.env_names()
    found = {str(p.relative_to(ROOT)): sorted(names_in(p) - known) for p in paths}
    return {k: v for k, v in found.items() if v}


def test_every_gruflow_variable_is_a_setting() -> None:
    used = set().union(*(names_in(p) for p in SOURCES))
    assert len(used) >= 10, f"too few GRUFLOW_* names found ({sorted(used)}): is the collector broken?"
    assert unknown_names(SOURCES) == {}, f"not in stream/settings.py (Settings.env_names()): {unknown_names(SOURCES)}"


def test_checker_catches_a_typo(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("env:\n  GRUFLOW_PARTITION: '8'\n  GRUFLOW_TOP_K: '20'\n")
    assert names_in(bad) - Settings.env_names() == {"GRUFLOW_PARTITION"}


def gruflow_services(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in config["services"].items()
            if any(k.startswith("GRUFLOW_") for k in (svc.get("environment") or {}))}


@pytest.mark.parametrize("profiles", [(), ("demo",)], ids=["default", "demo"])
def test_compose_environments_parse(profiles: tuple[str, ...]) -> None:
    services = gruflow_services(compose_config(*profiles))
    assert {"worker", "trainer", "kafka-init", "model-init"} <= set(services)
    for name, svc in services.items():
        env = {k: str(v) for k, v in svc["environment"].items() if k.startswith("GRUFLOW_")}
        settings = Settings.from_env(env)  # raises SettingsError naming the variable
        if name in ("worker", "trainer", "replay"):
            assert settings.connection.bootstrap_servers == "kafka:9092", f"{name} must talk to the compose broker"


def pod_settings(objects: list[dict[str, Any]], workload: dict[str, Any]) -> Settings:
    """The Settings a pod of ``workload`` would build from its ConfigMap(s) and env."""
    return Settings.from_env(pod_env(objects, workload))


def test_k8s_environments_parse(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    from stream.kafka.config import confluent_config

    name, objects = rendered
    workloads = all_of(objects, "StatefulSet") + all_of(objects, "Deployment")
    assert len(workloads) == 2
    for workload in workloads:
        settings = pod_settings(objects, workload)
        assert settings.connection.bootstrap_servers, f"{name}: {workload['metadata']['name']} has no GRUFLOW_BOOTSTRAP_SERVERS"
        # the connection settings must make a client config (SASL needs mechanism + username, ...)
        config = confluent_config(settings)
        assert config["security.protocol"] == settings.connection.security_protocol
        if settings.connection.security_protocol.startswith("SASL"):
            assert config["sasl.username"] == "secret-username"
