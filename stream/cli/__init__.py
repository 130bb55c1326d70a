"""The ``gruflow`` command. Each area registers its own subcommands; imports stay lazy so that
``gruflow --help`` answers at once and model-only commands never import Kafka clients.

A user's mistake (a missing file, a wrong format, a bad parameter or setting, an unreadable checkpoint,
an unreachable cluster) ends the command with one line, ``gruflow: error: …`` and a hint where one
exists, and exit status 2; a traceback means a bug in gruflow.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from typing import NoReturn, Sequence

# (module, function) pairs; each function takes the subparsers object and adds its commands,
# setting ``func`` on each subparser to a callable(args) -> int.
REGISTRARS: list[tuple[str, str]] = [
    ("model.cli", "register"),          # train, evaluate, baseline, bench train
    ("stream.cli.commands", "register"),    # worker, replay, tail, demo, bench stream, broker
    ("stream.cli.online_commands", "register"),  # run, trainer, model list/rollback, experiment online
]
USAGE_STATUS = 2


class Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (argparse prints the usage block first) and a pointer to
    the command's help."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_STATUS, f"gruflow: error: {message} (see '{self.prog} --help')\n")


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        return package_version("gruflow")
    except PackageNotFoundError:  # running from a checkout that was never installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="gruflow", description="Streaming, online-learning GRU4Rec recommender")
    parser.add_argument("--version", action="version", version=f"gruflow {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    bench = sub.add_parser("bench", help="benchmarks that print JSON")
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="WHAT", parser_class=Parser)
    parser.set_defaults(bench_subparsers=bench_sub)
    for module_name, func_name in REGISTRARS:
        getattr(importlib.import_module(module_name), func_name)(sub, bench_sub)
    return parser


def _hint_for_missing(exc: FileNotFoundError) -> str | None:
    name = Path(str(exc.filename or "")).name or str(exc)
    if "synthetic" in name:
        return "the synthetic generator is a format: add --format synthetic"
    return None


def user_error(exc: BaseException) -> tuple[str, str | None] | None:
    """(message, hint) when ``exc`` is a user's mistake, None when it is a bug. Only the modules that
    were imported are asked about, so the check loads nothing."""
    loaded = sys.modules
    if isinstance(exc, FileNotFoundError):
        return str(exc), _hint_for_missing(exc)
    if isinstance(exc, (IsADirectoryError, NotADirectoryError, PermissionError)):
        return str(exc), None
    if "model.data" in loaded and isinstance(exc, loaded["model.data"].DataFormatError):
        formats = ", ".join(loaded["model.data"].FORMATS)
        return str(exc), f"is --format right? formats: {formats}"
    if "model.params" in loaded and isinstance(exc, loaded["model.params"].ParamsError):
        return str(exc), 'parameters go as --params "name=value,name=value" in the official GRU4Rec names'
    if "model.checkpoint" in loaded and isinstance(exc, loaded["model.checkpoint"].CheckpointError):
        return f"unreadable checkpoint: {exc}", "write one with 'gruflow train DATA --out FILE'"
    if "stream.settings" in loaded and isinstance(exc, loaded["stream.settings"].SettingsError):
        return f"bad setting: {exc}", "the settings table in README.md lists every GRUFLOW_* name"
    if "stream.kafka.config" in loaded and isinstance(exc, loaded["stream.kafka.config"].ClusterUnreachable):
        return str(exc), "is GRUFLOW_BOOTSTRAP_SERVERS right and the cluster up?"
    if "stream.kafka.topics" in loaded and isinstance(exc, loaded["stream.kafka.topics"].TopicError):
        return str(exc), None
    if "confluent_kafka" in loaded and isinstance(exc, loaded["confluent_kafka"].KafkaException):
        return f"Kafka: {exc}", "is GRUFLOW_BOOTSTRAP_SERVERS right and the cluster up?"
    return None


def fail(message: str, hint: str | None = None) -> int:
    line = f"gruflow: error: {message}"
    if hint:
        line += f" (hint: {hint})"
    print(line.replace("\n", " "), file=sys.stderr)
    return USAGE_STATUS


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return USAGE_STATUS
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `gruflow config | head`: the reader left; nothing is wrong with the command
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 0
    except SystemExit as exc:
        if isinstance(exc.code, str):  # raise SystemExit("message"): a command refusing its arguments
            return fail(exc.code)
        raise
    except Exception as exc:
        known = user_error(exc)
        if known is None:
            raise
        return fail(*known)

