"""``gruflow tune`` and ``gruflow split``: a per-dataset search for GRU4Rec's hyperparameters, and the
time-based train/test split it is meant to be used with (tune reads the train part only)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable


def register(sub, add_data_args: Callable, add_threads: Callable) -> None:
    p = sub.add_parser("tune", help="search GRU4Rec hyperparameters (Optuna) on a validation split of DATA")
    p.add_argument("data", help="TRAINING data only (or synthetic[:N]); validation is carved from its "
                   "latest sessions")
    add_data_args(p)
    p.add_argument("--budget-minutes", type=float, required=True, help="wall-time budget of the search")
    p.add_argument("--trials", type=int, default=None, help="at most this many trials (default: until the budget ends)")
    p.add_argument("--seed", type=int, default=42, help="seed of the sampler and of every trial's training (default 42)")
    p.add_argument("--valid-fraction", type=float, default=0.1,
                   help="share of the latest-ending sessions held out for validation (default 0.1)")
    p.add_argument("--max-layers", type=int, default=512,
                   help="largest GRU size tried (default 512, the official space)")
    p.add_argument("--max-epochs", type=int, default=10, help="most epochs tried (default 10)")
    p.add_argument("--out", required=True, help="params file to write (read by 'gruflow train --params-file')")
    p.add_argument("--table", default=None, help="validation table of all trials: .csv for CSV, else markdown")
    p.add_argument("--json", action="store_true", help="print one JSON summary at the end")
    add_threads(p)
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("split", help="time-based train/test split of a dataset into two session-rec TSV files")
    p.add_argument("data", help="data path (or synthetic[:N])")
    add_data_args(p)
    p.add_argument("--test-fraction", type=float, default=0.1,
                   help="share of the latest-ending sessions that become test (default 0.1)")
    p.add_argument("--train-out", required=True, help="training TSV to write")
    p.add_argument("--test-out", required=True, help="test TSV to write")
    p.set_defaults(func=cmd_split)


def cmd_tune(args) -> int:
    import torch

    from model.data import describe, load_events
    from model.params import write_params_file
    from model.tune import TuneError, TuneSettings, tune, validation_table

    torch.set_num_threads(max(1, args.threads))
    try:
        settings = TuneSettings(budget_s=args.budget_minutes * 60.0, n_trials=args.trials, seed=args.seed,
                                valid_fraction=args.valid_fraction, max_layers=args.max_layers,
                                max_epochs=args.max_epochs)
        data = load_events(args.data, args.fmt)
        result = tune(data, settings, report=lambda line: print(line, file=sys.stderr, flush=True))
    except TuneError as exc:
        raise SystemExit(str(exc)) from None
    about = {"tuned_on": {"path": str(args.data), "format": args.fmt, **describe(data)}, **result.about}
    write_params_file(args.out, result.best, about)
    if args.table:
        fmt = "csv" if str(args.table).endswith(".csv") else "markdown"
        Path(args.table).write_text(validation_table(result.rows, result.best_trial, fmt))
    best = result.about["best"]
    if args.json:
        print(json.dumps({"params_file": str(args.out), "params": result.best.to_dict(), **about}))
    else:
        print(f"wrote {args.out}: trial {result.best_trial} of {len(result.rows)}, validation MRR@20 "
              f"{best['mrr']:.4f} Recall@20 {best['recall']:.4f}" + _vs_official(result.about.get("official")))
    return 0


def _vs_official(official: dict | None) -> str:
    if not official or official.get("state") != "complete":
        return ""
    return f" (official configuration: MRR@20 {official['mrr']:.4f} Recall@20 {official['recall']:.4f})"


def cmd_split(args) -> int:
    from model.data import describe, load_events, split_latest_sessions

    if not 0.0 < args.test_fraction < 1.0:
        raise SystemExit(f"--test-fraction must be in (0, 1), got {args.test_fraction}")
    train, test = split_latest_sessions(load_events(args.data, args.fmt), args.test_fraction)
    for df, path in ((train, args.train_out), (test, args.test_out)):
        df.to_csv(path, sep="\t", index=False)
    print(f"wrote {args.train_out} ({describe(train)['events']} events) and {args.test_out} "
          f"({describe(test)['events']} events, {test['SessionId'].nunique()} sessions)")
    return 0
