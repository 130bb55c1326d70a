"""CLI of the online-learning area: ``run``, ``trainer``, ``model list``, ``model rollback`` and
``experiment online``. Settings come from GRUFLOW_* variables; ``--bootstrap`` overrides
GRUFLOW_BOOTSTRAP_SERVERS. Imports stay inside the handlers so ``gruflow --help`` is instant."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from datetime import datetime, timezone
from typing import Any


def _settings(args: argparse.Namespace, **overrides: Any) -> Any:
    from stream.settings import Settings

    return Settings.from_env(bootstrap_servers=getattr(args, "bootstrap", None), **overrides)


def _bootstrap_arg(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--bootstrap", default=None, help="Kafka bootstrap servers (overrides GRUFLOW_BOOTSTRAP_SERVERS)")
    return p


def _logging(settings: Any) -> None:
    logging.basicConfig(level=settings.process.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _need_cluster(settings: Any, what: str) -> bool:
    if settings.embedded:
        print(f"gruflow {what} needs a Kafka cluster: set GRUFLOW_BOOTSTRAP_SERVERS (or --bootstrap); "
              "`gruflow run` starts an embedded broker with worker and trainer in one process.", file=sys.stderr)
        return False
    return True


# ----------------------------------------------------------------------------- trainer / run

def _trainer(args: argparse.Namespace) -> int:
    import signal
    import threading

    import torch

    from stream.kafka.topics import ensure_topics
    from stream.online.trainer import Trainer, TrainerError

    settings = _settings(args)
    if not _need_cluster(settings, "trainer"):
        return 2
    _logging(settings)
    torch.set_num_threads(settings.trainer.trainer_torch_threads)
    ensure_topics(settings)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        trainer = Trainer(settings).start()
    except TrainerError as exc:
        print(f"gruflow trainer: {exc}", file=sys.stderr)
        return 2
    p = settings.process
    print(f"trainer up: /metrics /livez /readyz on http://{p.web_host}:{p.web_port}", file=sys.stderr)
    try:
        while not stop.wait(1.0):
            if trainer.error is not None:
                print(f"gruflow trainer failed: {trainer.error}", file=sys.stderr)
                return 1
    finally:
        trainer.stop()
    return 0


def _bootstrap_model(settings: Any) -> Any:
    """`gruflow run` with no model anywhere: a quick model on synthetic data, like the demo."""
    from pathlib import Path

    from model.params import OFFICIAL
    from model.synthetic import generate
    from stream.tools.harness import train_quick_model

    print("no model on the models topic and GRUFLOW_MODEL_PATH unset: training a quick synthetic model...",
          file=sys.stderr)
    df = generate(n_sessions=3000, n_items=500, seed=0)
    path = Path(settings.process.data_dir) / "models" / "bootstrap.ckpt"
    train_quick_model(df, path, n_sample=256, batch_size=OFFICIAL.batch_size, learning_rate=OFFICIAL.learning_rate,
                      progress=True, metadata={"source": "synthetic bootstrap"})
    return settings.replace(model_path=str(path))


def _run(args: argparse.Namespace) -> int:
    """Worker + trainer in one process (the trainer in background threads), embedded broker by default."""
    import os

    from stream.online import model_sync
    from stream.kafka.topics import ensure_topics
    from stream.online.trainer import Trainer

    settings = _settings(args)
    _logging(settings)
    broker = None
    try:
        if settings.embedded:
            from stream.kafka.broker import EmbeddedKafka

            broker = EmbeddedKafka.from_settings(settings, data_dir=args.broker_data_dir).start()
            settings = broker.settings(settings)
            os.environ["GRUFLOW_BOOTSTRAP_SERVERS"] = settings.connection.bootstrap_servers
        ensure_topics(settings)
        if not settings.scoring.model_path and model_sync.load_latest(settings) is None:
            settings = _bootstrap_model(settings)
        trainer_port = args.trainer_port or settings.process.web_port + 1
        trainer = Trainer(settings.replace(web_port=trainer_port)).start()
        print(f"trainer metrics on http://{settings.process.web_host}:{trainer_port}/metrics", file=sys.stderr)
        try:
            from stream.worker.main import run_worker

            return run_worker(settings)
        finally:
            trainer.stop()
    finally:
        if broker is not None:
            broker.stop()


# ----------------------------------------------------------------------------- model list / rollback

def _model_list(args: argparse.Namespace) -> int:
    from stream.online import model_sync
    from stream.online.model_store import ModelStore

    settings = _settings(args)
    if not _need_cluster(settings, "model list"):
        return 2
    infos = model_sync.list_versions(settings)
    local = {s.version: s for s in ModelStore.from_settings(settings).list()}
    rows = []
    for i in infos:
        rows.append({"version": i.version, "parent": i.parent, "bytes": i.size, "chunks": i.chunks,
                     "complete": i.complete, "on_disk": i.version in local,
                     "published": datetime.fromtimestamp(i.timestamp_ms / 1000, timezone.utc).isoformat(),
                     **{k: v for k, v in (i.meta or {}).items() if k not in ("version",)}})
    for v, s in sorted(local.items()):
        if v not in {i.version for i in infos}:
            rows.append({"version": v, "bytes": s.size, "complete": True, "on_disk": True, "on_topic": False,
                         **{k: x for k, x in s.meta.items() if k not in ("version", "size")}})
    rows.sort(key=lambda r: r["version"])
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    if not rows:
        print(f"no model versions on {settings.topic('models')}")
        return 0
    print(f"{'version':>7} {'parent':>6} {'items':>7} {'bytes':>10}  {'published':<25} note")
    for r in rows:
        note = []
        if r.get("rollback_of") is not None:
            note.append(f"rollback of {r['rollback_of']}")
        if r.get("guardrail"):
            g = r["guardrail"]
            note.append(f"recall@20 {g['current']['recall']:.4f} -> {g['candidate']['recall']:.4f}")
        if not r.get("complete", True):
            note.append("INCOMPLETE")
        if r.get("on_topic") is False:
            note.append("disk only")
        print(f"{r['version']:>7} {r.get('parent', ''):>6} {r.get('n_items', ''):>7} {r['bytes']:>10}  "
              f"{r.get('published', ''):<25} {'; '.join(note)}")
    return 0


def _model_rollback(args: argparse.Namespace) -> int:
    from stream.online import model_protocol, model_rollback
    from stream.online.model_store import ModelStore

    settings = _settings(args)
    if not _need_cluster(settings, "model rollback"):
        return 2
    try:
        new = model_rollback.rollback(settings, args.version, ModelStore.from_settings(settings))
    except (LookupError, model_protocol.ModelSyncError) as exc:
        print(f"gruflow model rollback: {exc}", file=sys.stderr)
        return 1
    print(f"published version {new} = the weights of version {args.version}; workers swap it in at their next "
          "micro-batch and the trainer continues from it")
    return 0


# ----------------------------------------------------------------------------- experiment

def _print_result(result: dict, one_line: bool) -> int:
    print(json.dumps(result) if one_line else json.dumps(result, indent=2))
    return 0


def _experiment(args: argparse.Namespace) -> int:
    from stream.lab.experiment import run_online_experiment

    return _print_result(run_online_experiment(args), args.json)


def _forget(args: argparse.Namespace) -> int:
    from stream.online.training_guard import send_forget

    settings = _settings(args)
    if not _need_cluster(settings, "forget"):
        return 2
    if not args.user_id or len(args.user_id.encode("utf-8")) > settings.worker.max_id_bytes:
        print(f"gruflow forget: a user id has 1..{settings.worker.max_id_bytes} bytes", file=sys.stderr)
        return 2
    topic, partition = send_forget(settings, args.user_id)
    print(f"forget request written to {topic} (partition {partition}): the worker owning the user tombstones "
          "its state (state table and changelog) and the trainer drops its buffered sessions at their next poll")
    return 0


def _attack(args: argparse.Namespace) -> int:
    from stream.lab.attack import run_attack_experiment

    return _print_result(run_attack_experiment(args), args.json)


def _because(args: argparse.Namespace) -> int:
    from stream.lab.because import run

    result = run(args)
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0


def register(sub: Any, bench_sub: Any) -> None:
    p = _bootstrap_arg(sub.add_parser("run", help="worker + trainer in one process (embedded broker by default)"))
    p.add_argument("--trainer-port", type=int, default=0, help="trainer /metrics port (default: web port + 1)")
    p.add_argument("--broker-data-dir", default=None,
                   help="the embedded broker (no cluster set) keeps its data here across runs, so that it comes "
                        "back with the worker's state (see `gruflow broker --data-dir`)")
    p.set_defaults(func=_run)

    from stream.cli.commands import SETTINGS_EPILOG

    p = _bootstrap_arg(sub.add_parser("trainer", help="run the online fine-tuning trainer (needs a Kafka cluster)",
                                      epilog=SETTINGS_EPILOG))
    p.set_defaults(func=_trainer)

    model = sub.add_parser("model", help="model versions on the models topic")
    model_sub = model.add_subparsers(dest="model_command", metavar="ACTION")
    p = _bootstrap_arg(model_sub.add_parser("list", help="list the versions on the models topic (and on disk)"))
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_model_list)
    p = _bootstrap_arg(model_sub.add_parser("rollback", help="republish an old version as the newest"))
    p.add_argument("version", type=int, help="the version to serve again (see 'gruflow model list')")
    p.set_defaults(func=_model_rollback)

    p = _bootstrap_arg(sub.add_parser("forget", help="right to erasure: tombstone a user's state in every store"))
    p.add_argument("user_id", help="the user id (the input events' user_id)")
    p.set_defaults(func=_forget)

    exp = sub.add_parser("experiment", help="experiments that print JSON")
    exp_sub = exp.add_subparsers(dest="experiment_command", metavar="WHICH")
    p = exp_sub.add_parser("online", help="prequential HR/MRR: frozen vs online fine-tuning vs popularity")
    p.add_argument("data", help="event file or directory (session-rec: *_train_full.txt + *_test.txt)")
    p.add_argument("--format", default="session-rec", help="data format (see `gruflow train --help`)")
    p.add_argument("--warmup-days", type=float, default=1.0, help="days trained offline before the replay")
    p.add_argument("--params", default="", help="GRU4Rec parameters of the warm-up model, name=value,... (over the "
                                                "official configuration, or over --params-file)")
    p.add_argument("--params-file", default=None, help="the warm-up model's parameters from a file written by "
                                                       "'gruflow tune' (instead of the official configuration)")
    p.add_argument("--every", type=int, default=4000,
                   help="events per fine-tune round (the replay waits for each round's version)")
    p.add_argument("--limit", type=int, default=None, help="replay at most N events (smoke runs)")
    p.add_argument("--plot", metavar="FILE", default=None,
                   help="draw the prequential HR@K of online vs frozen vs popularity, slice by slice, into FILE "
                        "(PNG; matplotlib)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.set_defaults(func=_experiment)

    p = exp_sub.add_parser("because", help='"because" attribution checked by leave-one-out scores on held-out '
                                           "sessions")
    p.add_argument("data", help="session-rec directory (*_train_full.txt + *_test.txt), or a training file")
    p.add_argument("--test", default=None, help="held-out file when DATA is a file")
    p.add_argument("--format", default="session-rec", help="data format (see `gruflow train --help`)")
    p.add_argument("--model", default=None, help="checkpoint to check (default: train one on the training file)")
    p.add_argument("--params", default="", help="GRU4Rec parameters when training, name=value,...")
    p.add_argument("--sessions", type=int, default=2000, help="held-out sessions to check (default 2,000)")
    p.add_argument("--k", type=int, default=20, help="recommendations per session (default 20)")
    p.add_argument("--history", type=int, default=5, help="recent items the attribution looks at (default 5, "
                                                          "as GRUFLOW_BECAUSE_HISTORY)")
    p.add_argument("--seed", type=int, default=1, help="seed of the cut points and random items (default 1)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.set_defaults(func=_because)

    from stream.lab.attack import add_attack_parser

    add_attack_parser(exp_sub, _attack)
