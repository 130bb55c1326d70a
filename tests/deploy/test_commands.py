"""The gruflow command lines in docker-compose.yml and the manifests are ones `gruflow` accepts: each is
parsed by the real CLI parser (stream/cli/__init__.py), so a renamed subcommand or flag fails here, not in a pod."""

from __future__ import annotations

import re
import shlex
from typing import Any

import pytest

from deploykit import all_of, compose_config
from stream.cli import build_parser


def parse(argv: list[str]) -> Any:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on an unknown command or flag
        pytest.fail(f"gruflow rejects {argv}: exit {exc.code}")
    assert getattr(args, "func", None) is not None, f"{argv} names no runnable command"
    return args


def gruflow_lines(script: str, env: dict[str, str]) -> list[list[str]]:
    """The `gruflow ...` commands of a shell script, continuation lines joined and variables expanded."""
    script = script.replace("$$", "$").replace("\\\n", " ")
    expand = lambda text: re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), m.group(0)), text)  # noqa: E731
    return [shlex.split(expand(line))[1:] for line in script.splitlines() if line.strip().startswith("gruflow ")]


def test_compose_commands_parse() -> None:
    services = compose_config("demo")["services"]
    for name in ("worker", "trainer", "replay"):
        parse(services[name]["command"])
    init = services["model-init"]
    (train,) = gruflow_lines(init["command"][0], {k: str(v) for k, v in init["environment"].items()})
    args = parse(train)
    assert train[0] == "train" and args.out.startswith(str(init["environment"]["GRUFLOW_MODEL_PATH"]))


def test_k8s_commands_parse(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, objects = rendered
    seen = set()
    for workload in all_of(objects, "StatefulSet") + all_of(objects, "Deployment"):
        spec = workload["spec"]["template"]["spec"]
        for container in spec["containers"]:
            parse(container["args"])
            seen.add(container["args"][0])
        for container in spec.get("initContainers", []):
            env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
            lines = gruflow_lines(container["args"][0], env)
            assert lines, f"init container {container['name']} runs no gruflow command"
            for argv in lines:
                parse(argv)
            main = {e["name"]: e.get("value") for e in spec["containers"][0].get("env", [])}
            assert main.get("GRUFLOW_MODEL_PATH") == env["GRUFLOW_MODEL_PATH"], \
                "the trainer must read what the init container writes"
    assert seen == {"worker", "trainer"}
