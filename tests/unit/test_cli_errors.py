"""A user's mistake ends ``gruflow`` with one line, ``gruflow: error: …`` (a hint where one exists) and
exit status 2: the real command in a subprocess, so that a traceback or a stray line would show."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def gruflow(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("GRUFLOW_")}
    environ.update(env or {})
    return subprocess.run([sys.executable, "-m", "stream.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          env=environ, timeout=timeout)


def error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("gruflow")]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("gruflow: error: ")
    return lines[0]


def test_missing_file_says_so_and_hints_at_the_synthetic_format(tmp_path: Path) -> None:
    line = error_line(gruflow("train", "synthetic:40", "--out", str(tmp_path / "m.ckpt")))
    assert "not found: synthetic:40" in line and "add --format synthetic" in line


def test_missing_file(tmp_path: Path) -> None:
    line = error_line(gruflow("evaluate", str(tmp_path / "none.ckpt"), str(tmp_path / "none.tsv")))
    assert "none" in line


def test_wrong_format(tmp_path: Path) -> None:
    data = tmp_path / "u.data"
    data.write_text("196\t242\t3\t881250949\n186\t302\t3\t891717742\n")
    line = error_line(gruflow("train", str(data), "--out", str(tmp_path / "m.ckpt")))
    assert "not a session-rec" in line and "--format" in line


def test_bad_parameter(tmp_path: Path) -> None:
    line = error_line(gruflow("train", "synthetic:40", "--format", "synthetic", "--params", "leaning_rate=0.1",
                              "--out", str(tmp_path / "m.ckpt")))
    assert "unknown parameter 'leaning_rate'" in line


def test_bad_option_value_is_one_line() -> None:
    line = error_line(gruflow("evaluate", "a", "b", "--tie", "sideways"))
    assert "--tie" in line and "gruflow evaluate --help" in line


def test_unreadable_checkpoint(tmp_path: Path) -> None:
    ckpt = tmp_path / "broken.ckpt"
    ckpt.write_bytes(b"GRUF" + os.urandom(200))
    line = error_line(gruflow("evaluate", str(ckpt), "synthetic:20", "--format", "synthetic"))
    assert "unreadable checkpoint" in line


def test_bad_setting() -> None:
    line = error_line(gruflow("worker", env={"GRUFLOW_TOP_K": "many"}))
    assert "GRUFLOW_TOP_K" in line


def test_unreachable_cluster() -> None:
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = gruflow("tail", env={"GRUFLOW_BOOTSTRAP_SERVERS": f"127.0.0.1:{port}"})
    line = error_line(proc)
    assert "cannot reach the Kafka cluster" in line and "GRUFLOW_BOOTSTRAP_SERVERS" in line
    assert "%3|" not in proc.stderr  # librdkafka's own lines go through Python logging


def test_version() -> None:
    proc = gruflow("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("gruflow ")


def test_every_option_has_help() -> None:
    import argparse

    from stream.cli import build_parser

    missing = []

    def walk(parser: argparse.ArgumentParser, path: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{path} {name}")
            elif action.help is None:
                missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")

    walk(build_parser(), "gruflow")
    assert not missing, missing


def test_train_prints_the_loss_of_each_epoch_as_plain_lines(tmp_path: Path) -> None:
    proc = gruflow("train", "synthetic:300", "--format", "synthetic", "--epochs", "2", "--params", "n_sample=64",
                   "--out", str(tmp_path / "m.ckpt"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    epochs = [line for line in proc.stderr.splitlines() if line.startswith("epoch ") and " loss " in line]
    assert [line.split(":")[0] for line in epochs] == ["epoch 1/2", "epoch 2/2"], proc.stderr
    assert "\r" not in proc.stderr  # no bar frames without a terminal


def test_a_reader_that_leaves_early_is_not_an_error() -> None:
    """`gruflow config | head`: the pipe's reader is gone before gruflow writes; no traceback, status 0."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("GRUFLOW_")}
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader left before the first byte
    try:
        proc = subprocess.run([sys.executable, "-m", "stream.cli", "config"], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, cwd=ROOT, env=environ, timeout=120)
    finally:
        os.close(write_end)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr
