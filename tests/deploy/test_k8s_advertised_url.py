"""Every worker pod advertises an address the other workers can reach (GRUFLOW_ADVERTISED_URL): requests for
a user whose state partition another worker owns are forwarded there (docs/http-api.md). The pod's host name
does not resolve in a StatefulSet pod, so the manifests build the URL from the pod IP (downward API); the
rendered env is expanded as the kubelet expands it and fed to the real settings loader."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import pytest

from deploykit import kubelet_expand, one, pod_env
from stream.settings import Settings, SettingsError


def worker_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return one(objects, "StatefulSet", "gruflow-worker")["spec"]["template"]["spec"]["containers"][0]


def test_each_worker_pod_advertises_its_pod_ip_and_web_port(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    name, objects = rendered
    sts = one(objects, "StatefulSet", "gruflow-worker")
    container = worker_container(objects)
    names = [e["name"] for e in container["env"]]
    assert "GRUFLOW_ADVERTISED_URL" in names, f"{name}: the worker pods do not set GRUFLOW_ADVERTISED_URL"
    env = {e["name"]: e for e in container["env"]}
    pod_ip = env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert pod_ip == "status.podIP"
    # the kubelet expands $(NAME) only from variables defined before it
    assert names.index("POD_IP") < names.index("GRUFLOW_ADVERTISED_URL")
    for ip in ("10.244.3.17", "172.16.0.5"):  # two pods: two addresses
        values = pod_env(objects, sts, fields={"status.podIP": ip})
        settings = Settings.from_env(values)  # the settings' own check of the URL (http:// or https://)
        url = settings.web_url()
        assert "$(" not in url, f"{name}: a reference the kubelet cannot expand is left in {url}"
        parts = urlsplit(url)
        assert (parts.scheme, parts.hostname, parts.port) == ("http", ip, settings.process.web_port), url
        web = next(p for p in container["ports"] if p["name"] == "web")
        assert parts.port == web["containerPort"], "the advertised port is the container's web port"


def test_an_unexpandable_reference_is_caught(base_objects: list[dict[str, Any]]) -> None:
    """The expansion above is the kubelet's: an undefined reference stays in the value, and the settings refuse
    a URL that is not http(s)."""
    assert kubelet_expand("http://$(POD_IP):$(GRUFLOW_WEB_PORT)", {"GRUFLOW_WEB_PORT": "6066"}) == \
        "http://$(POD_IP):6066"
    assert kubelet_expand("$$(POD_IP)", {"POD_IP": "10.0.0.1"}) == "$(POD_IP)"
    with pytest.raises(SettingsError, match="GRUFLOW_ADVERTISED_URL"):
        Settings.from_env({"GRUFLOW_ADVERTISED_URL": kubelet_expand("$(SCHEME)://$(POD_IP):6066", {})})
