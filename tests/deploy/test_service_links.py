"""The kubelet's service-link variables do not stop a gruflow pod.

Unless a pod spec says ``enableServiceLinks: false``, the kubelet injects Docker-link variables for every
Service of the namespace with a cluster IP: ``gruflow-trainer`` becomes GRUFLOW_TRAINER_SERVICE_HOST,
GRUFLOW_TRAINER_PORT_6066_TCP_ADDR, ... — names under the settings' prefix. The pods switch them off, and
the settings loader still starts (with a warning) if a cluster injects them anyway. The variables are
derived from the rendered Services the way the kubelet derives them (pkg/kubelet/envvars).
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

from deploykit import all_of, pod_env
from stream.settings import Settings, SettingsError


def env_name(name: str) -> str:
    return name.upper().replace("-", "_")


def kubelet_service_env(services: list[dict[str, Any]], ip_of: Any) -> dict[str, str]:
    """The service-link variables the kubelet puts into a pod of the Services' namespace."""
    env: dict[str, str] = {}
    for i, svc in enumerate(services):
        spec = svc["spec"]
        if spec.get("clusterIP") == "None":
            continue  # headless: the kubelet links only Services that have a cluster IP
        ip = ip_of(i)
        host = f"[{ip}]" if ":" in ip else ip
        prefix = env_name(svc["metadata"]["name"])
        ports = spec["ports"]
        env[f"{prefix}_SERVICE_HOST"] = ip
        env[f"{prefix}_SERVICE_PORT"] = str(ports[0]["port"])
        for port in ports:
            if port.get("name"):
                env[f"{prefix}_SERVICE_PORT_{env_name(port['name'])}"] = str(port["port"])
        for j, port in enumerate(ports):
            proto = port.get("protocol", "TCP")
            url = f"{proto.lower()}://{host}:{port['port']}"
            if j == 0:
                env[f"{prefix}_PORT"] = url
            port_prefix = f"{prefix}_PORT_{port['port']}_{proto.upper()}"
            env[port_prefix] = url
            env[f"{port_prefix}_PROTO"] = proto.lower()
            env[f"{port_prefix}_PORT"] = str(port["port"])
            env[f"{port_prefix}_ADDR"] = ip
    return env


IP_FAMILIES = {"ipv4": lambda i: f"10.96.0.{10 + i}", "ipv6": lambda i: f"fd00:10:96::{10 + i:x}"}


@pytest.mark.parametrize("family", sorted(IP_FAMILIES))
def test_pods_start_with_the_kubelets_service_links(rendered: tuple[str, list[dict[str, Any]]], family: str,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    name, objects = rendered
    links = kubelet_service_env(all_of(objects, "Service"), IP_FAMILIES[family])
    gruflow_links = sorted(k for k in links if k.startswith("GRUFLOW_"))
    assert "GRUFLOW_TRAINER_PORT_6066_TCP_ADDR" in gruflow_links, f"{name}: derivation found {gruflow_links}"
    workloads = all_of(objects, "StatefulSet") + all_of(objects, "Deployment")
    assert len(workloads) == 2
    for workload in workloads:
        env = {**links, **pod_env(objects, workload)}
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="gruflow.settings"):
            settings = Settings.from_env(env)
        assert settings.process.web_port == int(env.get("GRUFLOW_WEB_PORT", 6066))
        warned = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
        for link in gruflow_links:
            assert link in warned, f"{name}: {workload['metadata']['name']}: no warning names {link}"


def test_pod_specs_switch_service_links_off(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    name, objects = rendered
    for workload in all_of(objects, "StatefulSet") + all_of(objects, "Deployment"):
        assert workload["spec"]["template"]["spec"].get("enableServiceLinks") is False, \
            f"{name}: {workload['metadata']['name']} gets the kubelet's service-link variables"


def test_a_misspelt_setting_next_to_service_links_is_still_refused(base_objects: list[dict[str, Any]]) -> None:
    links = kubelet_service_env(all_of(base_objects, "Service"), IP_FAMILIES["ipv4"])
    for name, value in (("GRUFLOW_PARTITION", "8"),
                        ("GRUFLOW_TRAINER_PORT", "6066"),  # a link's name, but not a link's value
                        ("GRUFLOW_WORKER_SERVICE_PORT", "6066")):  # no GRUFLOW_WORKER_SERVICE_HOST: no link
        with pytest.raises(SettingsError, match=name):
            Settings.from_env({**links, name: value})
