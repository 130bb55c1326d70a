"""``gruflow train | evaluate | baseline`` and ``gruflow bench train``: the offline model commands
(``tune`` and ``split`` live in :mod:`model.tune_cli`).

Registered into the ``gruflow`` command by :mod:`stream.cli`; imports stay inside the handlers so
``gruflow --help`` does not load torch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _add_data_args(p: argparse.ArgumentParser) -> None:
    from model.data import FORMATS

    p.add_argument("--format", dest="fmt", default="session-rec", choices=FORMATS,
                   help="input format (default: session-rec TSV SessionId/ItemId/Time)")


def _add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1),
                   help="torch intra-op threads (default: min(2, CPUs))")


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cutoffs", default="1,5,10,20", help="comma-separated list lengths K (default 1,5,10,20)")
    p.add_argument("--tie", default="standard", choices=("standard", "conservative"),
                   help="standard: rank = #(score > target) + 1; conservative: rank = #(score >= target)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def register(sub, bench_sub) -> None:
    p = sub.add_parser("train", help="train a GRU4Rec model offline and write a checkpoint")
    p.add_argument("data", help="training data path (or synthetic[:N])")
    _add_data_args(p)
    p.add_argument("--params-file", default=None, help="hyperparameters from a file written by 'gruflow tune'")
    p.add_argument("--params", default="", help='hyperparameters in the official names, "name=value,..." '
                   "(on top of --params-file)")
    p.add_argument("--epochs", type=int, default=None, help="override n_epochs")
    p.add_argument("--out", required=True, help="checkpoint file to write")
    p.add_argument("--test", default=None, help="optional test data (same format) evaluated into the metadata")
    p.add_argument("--no-progress", action="store_true", help="no progress bar within an epoch (the line per epoch stays)")
    p.add_argument("--json", action="store_true", help="print one JSON object (the per-epoch lines go to stderr)")
    _add_threads(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="Recall@K and MRR@K of a checkpoint on test sessions")
    p.add_argument("checkpoint", help="a checkpoint written by 'gruflow train'")
    p.add_argument("test", help="test data path")
    _add_data_args(p)
    _add_eval_args(p)
    _add_threads(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("baseline", help="popularity / co-occurrence baseline under the same protocol")
    p.add_argument("name", choices=("popularity", "cooccurrence"), help="which baseline")
    p.add_argument("train", help="training data path")
    p.add_argument("test", help="test data path")
    _add_data_args(p)
    _add_eval_args(p)
    p.set_defaults(func=cmd_baseline)

    from model.tune_cli import register as register_tune

    register_tune(sub, _add_data_args, _add_threads)

    p = bench_sub.add_parser("train", help="training speed (events/s) and peak RSS, as JSON")
    p.add_argument("data", help="training data path (or synthetic[:N])")
    _add_data_args(p)
    p.add_argument("--params", default="", help='hyperparameters, "name=value,..."')
    p.add_argument("--epochs", type=int, default=None, help="override n_epochs")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _add_threads(p)
    p.set_defaults(func=cmd_bench_train)


def _cutoffs(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise SystemExit(f"--cutoffs {text!r}: expected comma-separated integers") from None
    if not values or min(values) < 1:
        raise SystemExit("--cutoffs: need at least one K >= 1")
    return values


def _threads(n: int) -> None:
    import torch

    torch.set_num_threads(max(1, n))


def _print(obj: dict, as_json: bool, human: str) -> None:
    if as_json:
        print(json.dumps(obj, sort_keys=False))
    else:
        print(human)


def _metrics_text(res: dict) -> str:
    lines = [f"n_events={res['n_events']} tie={res['tie']}"]
    for k in res["recall"]:
        lines.append(f"Recall@{k}: {res['recall'][k]:.4f}  MRR@{k}: {res['mrr'][k]:.4f}")
    return "\n".join(lines)


def cmd_train(args) -> int:
    from model.checkpoint import save_checkpoint
    from model.data import describe, load_events
    from model.params import GRU4RecParams, read_params_file
    from model.train import build_vocabulary, fit, item_counts, item_rows_for
    from model.network import GRU4RecNet

    _threads(args.threads)
    base = read_params_file(args.params_file) if args.params_file else None
    params = GRU4RecParams.parse(args.params, base)
    if args.epochs is not None:
        params = params.__class__.from_dict({**params.to_dict(), "n_epochs": args.epochs})
    data = load_events(args.data, args.fmt)
    vocab = build_vocabulary(data)
    net = GRU4RecNet(len(vocab), params)
    summary = fit(net, data, params, item_rows=vocab, progress=not args.no_progress,
                  report=lambda line: print(line, file=sys.stderr, flush=True))
    popularity = item_counts(item_rows_for(data, vocab), len(vocab))
    metadata = {"trained_at": time.time(), "data": {"path": str(args.data), "format": args.fmt, **describe(data)},
                "training": {k: summary[k] for k in ("epochs", "loss", "events", "seconds", "events_per_s")}}
    if args.test:
        from model.evaluate import evaluate

        metadata["metrics"] = evaluate(net, vocab, load_events(args.test, args.fmt))
    save_checkpoint(args.out, net, vocab, params, popularity, metadata)
    out = {"checkpoint": str(args.out), "params": params.to_dict(), **metadata}
    _print(out, args.json, f"wrote {args.out}: {len(vocab)} items, {summary['events']} training events in "
                           f"{summary['seconds']:.1f}s ({summary['events_per_s']:.0f} ev/s), loss {summary['loss']}")
    return 0


def cmd_evaluate(args) -> int:
    from model.checkpoint import load_checkpoint
    from model.data import load_events
    from model.evaluate import evaluate

    _threads(args.threads)
    ckpt = load_checkpoint(args.checkpoint)
    res = evaluate(ckpt.net, ckpt.vocab, load_events(args.test, args.fmt), cutoffs=_cutoffs(args.cutoffs), tie=args.tie)
    _print(res, args.json, _metrics_text(res))
    return 0


def cmd_baseline(args) -> int:
    from model.baselines import evaluate_baseline
    from model.data import load_events

    res = evaluate_baseline(args.name, load_events(args.train, args.fmt), load_events(args.test, args.fmt),
                            cutoffs=_cutoffs(args.cutoffs), tie=args.tie)
    _print(res, args.json, _metrics_text(res))
    return 0


def peak_rss_bytes() -> int:
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def cmd_bench_train(args) -> int:
    import torch

    from model.data import load_events
    from model.network import GRU4RecNet
    from model.params import GRU4RecParams
    from model.train import build_vocabulary, fit

    _threads(args.threads)
    params = GRU4RecParams.parse(args.params)
    data = load_events(args.data, args.fmt)
    vocab = build_vocabulary(data)
    net = GRU4RecNet(len(vocab), params)
    summary = fit(net, data, params, n_epochs=args.epochs, item_rows=vocab, progress=not args.json)
    out = {
        "bench": "train",
        "data": str(args.data),
        "format": args.fmt,
        "events": summary["events"],
        "seconds": round(summary["seconds"], 3),
        "events_per_s": round(summary["events_per_s"], 1),
        "epochs": summary["epochs"],
        "loss": summary["loss"],
        "peak_rss_bytes": peak_rss_bytes(),
        "threads": torch.get_num_threads(),
        "params": params.to_dict(),
    }
    _print(out, args.json, f"{out['events_per_s']:.0f} training events/s over {out['events']} events "
                           f"({out['seconds']}s), peak RSS {out['peak_rss_bytes'] / 2**20:.0f} MiB")
    return 0
