"""The ``gruflow`` command. Each area registers its own subcommands; imports stay lazy so that
``gruflow --help`` answers at once and model-only commands never import Kafka clients."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

# (module, function) pairs; each function takes the subparsers object and adds its commands,
# setting ``func`` on each subparser to a callable(args) -> int.
REGISTRARS: list[tuple[str, str]] = [
    ("model.cli", "register"),          # train, evaluate, baseline, bench train
    ("stream.commands", "register"),    # worker, replay, tail, demo, bench stream, broker
    ("stream.online_commands", "register"),  # run, trainer, model list/rollback, experiment online
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gruflow", description="Streaming, online-learning GRU4Rec recommender")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    bench = sub.add_parser("bench", help="benchmarks that print JSON")
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="WHAT")
    parser.set_defaults(bench_subparsers=bench_sub)
    for module_name, func_name in REGISTRARS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue  # area not built yet
            raise
        getattr(module, func_name)(sub, bench_sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    from stream.settings import SettingsError

    try:
        return int(func(args) or 0)
    except SettingsError as exc:
        print(f"gruflow: bad setting: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
