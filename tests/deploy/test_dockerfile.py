"""The Dockerfile, read without a Docker engine: slim base, CPU torch, non-root user, one entrypoint
(`gruflow`), a healthcheck on /livez, and a build context holding only what the image needs."""

from __future__ import annotations

import json
import re
import tomllib

from deploykit import ROOT


def instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)  # join continuation lines
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def final_stage() -> list[tuple[str, str]]:
    ins = instructions()
    last_from = max(i for i, (op, _) in enumerate(ins) if op == "FROM")
    return ins[last_from:]


def args() -> dict[str, str]:
    return dict(rest.split("=", 1) for op, rest in instructions() if op == "ARG" and "=" in rest)


def test_slim_python_base() -> None:
    bases = [rest.split()[0] for op, rest in instructions() if op == "FROM"]
    bases = [args().get(b.strip("${}"), b) if b.startswith("$") else b for b in bases]
    assert bases and all(re.fullmatch(r"python:3\.1[1-9]+-slim(-\w+)?", b) for b in bases), bases
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert requires == ">=3.11"


def test_cpu_torch() -> None:
    run = " ".join(rest for op, rest in instructions() if op == "RUN")
    assert "torch" in run and "--index-url" in run
    assert args()["TORCH_INDEX_URL"].endswith("/whl/cpu")


def test_runs_as_non_root_with_one_entrypoint() -> None:
    stage = final_stage()
    users = [rest for op, rest in stage if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    (entrypoint,) = [json.loads(rest) for op, rest in stage if op == "ENTRYPOINT"]
    assert entrypoint == ["gruflow"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "gruflow" in scripts
    (cmd,) = [json.loads(rest) for op, rest in stage if op == "CMD"]
    assert cmd == ["worker"]


def test_healthcheck_hits_livez_on_the_web_port() -> None:
    (health,) = [rest for op, rest in final_stage() if op == "HEALTHCHECK"]
    assert "/livez" in health and "GRUFLOW_WEB_PORT" in health
    assert "/readyz" not in health, "a container healthcheck restarting on readiness would loop during recovery"
    env = " ".join(rest for op, rest in final_stage() if op == "ENV")
    assert "GRUFLOW_WEB_PORT=6066" in env and "EXPOSE" in [op for op, _ in final_stage()]


def test_dockerignore_keeps_the_context_small() -> None:
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines[0] == "**", "deny everything, then allow what the image needs"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    packages = {pattern.rstrip("*") for pattern in
                tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert set(packages) | {"pyproject.toml", "README.md"} <= allowed
    copied = " ".join(rest for op, rest in instructions() if op == "COPY" and "--from" not in rest)
    for package in packages:
        assert f"{package}/" in copied, f"the Dockerfile does not copy the {package} package"
