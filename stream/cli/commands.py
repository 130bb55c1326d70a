"""CLI commands of the stream area: worker, replay, tail, demo, broker, ``bench stream`` and ``lab faults``.

Every command reads its settings from GRUFLOW_* variables; ``--bootstrap`` overrides
GRUFLOW_BOOTSTRAP_SERVERS. Imports stay inside the handlers so ``gruflow --help`` is instant.
"""

from __future__ import annotations

import argparse
from typing import Any


def _add_bootstrap(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--bootstrap", default=None, help="Kafka bootstrap servers (overrides GRUFLOW_BOOTSTRAP_SERVERS)")
    return p


def _settings(args: argparse.Namespace, **overrides: Any) -> Any:
    from stream.settings import Settings

    return Settings.from_env(bootstrap_servers=getattr(args, "bootstrap", None), **overrides)


def _worker(args: argparse.Namespace) -> int:
    from stream.worker.main import run_worker

    return run_worker(_settings(args))


def _replay(args: argparse.Namespace) -> int:
    from stream.tools.replay import run_replay

    return run_replay(args)


def _tail(args: argparse.Namespace) -> int:
    from stream.tools.tail import run_tail

    return run_tail(args)


def _broker(args: argparse.Namespace) -> int:
    from stream.kafka.broker import run_forever

    return run_forever(_settings(args), port=args.port, create_topics=not args.no_topics, data_dir=args.data_dir)


def format_settings(rows: list[Any], sections: dict[str, type]) -> str:
    """``gruflow config``'s text: one ``NAME=value  # source: description`` line per setting, under a header
    per section, so that the output can be pasted into an env file."""
    lines = ["# effective gruflow settings; source: env = set in the environment, default = gruflow's default",
             "# secrets are masked; see docs/settings.md"]
    section = None
    for row in rows:
        if row.section != section:
            section = row.section
            lines += ["", f"## {section}: {(sections[section].__doc__ or '').strip()}"]
        lines.append(f"{row.env_name}={row.value}  # {row.source}: {row.description}")
    return "\n".join(lines)


def _config(args: argparse.Namespace) -> int:
    from stream.settings import SECTIONS, Settings

    print(format_settings(Settings.from_env().describe(), SECTIONS))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from stream.tools.demo import run_demo

    return run_demo(args)


def _bench(args: argparse.Namespace) -> int:
    from stream.lab.bench import run_bench

    return run_bench(args)


def _bench_serve(args: argparse.Namespace) -> int:
    from stream.lab.bench_serve import run_bench_serve

    return run_bench_serve(args)


def _faults(args: argparse.Namespace) -> int:
    from stream.lab.faults import run_faults

    return run_faults(args)


SETTINGS_EPILOG = ("Configured by GRUFLOW_* environment variables: `gruflow config` prints each with its "
                   "effective value, source and meaning.")


def register(sub: Any, bench_sub: Any) -> None:
    from stream.tools.replay import add_replay_args
    from stream.tools.tail import add_tail_args

    p = sub.add_parser("config", help="print the effective settings (GRUFLOW_* variables), their sources and "
                                      "what each means; secrets masked")
    p.set_defaults(func=_config)

    p = _add_bootstrap(sub.add_parser("worker", help="run a stream worker (needs a Kafka cluster)",
                                      epilog=SETTINGS_EPILOG))
    p.set_defaults(func=_worker)

    p = _add_bootstrap(sub.add_parser("replay", help="replay an event file into the input topics"))
    add_replay_args(p)
    p.set_defaults(func=_replay)

    p = _add_bootstrap(sub.add_parser("tail", help="print recommendations as they arrive"))
    add_tail_args(p)
    p.set_defaults(func=_tail)

    p = sub.add_parser("broker", help="run the embedded Apache Kafka broker until Ctrl-C")
    p.add_argument("--port", type=int, default=None, help="listener port (default: a free one)")
    p.add_argument("--no-topics", action="store_true", help="do not create gruflow's topics")
    p.add_argument("--data-dir", default=None,
                   help="keep the broker's data (and its ports) here and come back on them at the next start, "
                        "also after a kill -9 (default: a temporary directory, removed on stop)")
    p.set_defaults(func=_broker)

    p = sub.add_parser("demo", help="embedded broker + quick model + worker + replay, with a live summary")
    from stream.tools.demo import add_demo_args

    add_demo_args(p)
    p.set_defaults(func=_demo)

    lab = sub.add_parser("lab", help="experiments on the running system that print JSON")
    lab_sub = lab.add_subparsers(dest="lab_command", metavar="WHAT")
    p = lab_sub.add_parser("faults", help="worker SIGKILL, broker pause, broker kill -9 + restart under load: "
                                          "events sent, answered, duplicated, missing")
    from stream.lab.faults import add_faults_args

    add_faults_args(p)
    p.set_defaults(func=_faults)

    p = bench_sub.add_parser("serve", help="recommendation requests while the stream runs: requests/s, p50/p99, "
                                           "the stream's p99 with and without requests, the cost of 'because'")
    from stream.lab.bench_serve import add_serve_args

    add_serve_args(p)
    p.set_defaults(func=_bench_serve)

    p = bench_sub.add_parser("stream", help="end-to-end worker throughput and latency on the embedded broker")
    from stream.lab.bench import add_bench_args

    add_bench_args(p)
    p.set_defaults(func=_bench)
