"""``python -m model.features_bench DATA --format F``: GRU4Rec with and without side features, several seeds.

Splits by time (test = sessions whose last view/click is within ``--days`` of the last one, so late
purchase rows do not move the cut), trains each variant with each seed on the training part and ranks
every test target against all training items (Recall@K / MRR@K, model.evaluate). Prints one JSON
object: per variant the per-seed figures, their mean and sample standard deviation.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import pandas as pd

from model.data import FORMATS, describe, load_events, split_by_time
from model.events import EventType
from model.evaluate import evaluate
from model.params import OFFICIAL, GRU4RecParams
from model.train import train_model

FEATURES_ALL = "category_feature=1,price_feature=1,time_feature=1"


def time_split(df: pd.DataFrame, days: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``split_by_time`` with the end at the last non-purchase event."""
    browse = df["EventType"].to_numpy() != int(EventType.PURCHASE)
    end = float(df["Time"].to_numpy()[browse].max()) if browse.any() else None
    return split_by_time(df, days, end=end)


def run_variant(train: pd.DataFrame, test: pd.DataFrame, params: GRU4RecParams, seeds: list[int],
                cutoff: int) -> dict:
    runs = []
    for seed in seeds:
        p = GRU4RecParams.from_dict({**params.to_dict(), "seed": seed})
        t0 = time.perf_counter()
        net, vocab, _ = train_model(train, p, progress=False)
        res = evaluate(net, vocab, test, cutoffs=(cutoff,))
        runs.append({"seed": seed, "recall": res["recall"][str(cutoff)], "mrr": res["mrr"][str(cutoff)],
                     "n_events": res["n_events"], "seconds": round(time.perf_counter() - t0, 1)})
        print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    out = {"params": params.to_dict(), "runs": runs}
    for m in ("recall", "mrr"):
        values = [r[m] for r in runs]
        out[f"{m}_mean"] = statistics.fmean(values)
        out[f"{m}_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m model.features_bench", description=__doc__.splitlines()[0])
    ap.add_argument("data")
    ap.add_argument("--format", dest="fmt", default="session-rec", choices=FORMATS)
    ap.add_argument("--days", type=float, default=14.0, help="test period at the end (default 14 days)")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--base", choices=("official", "default"), default="official",
                    help="base configuration: the official GRU4Rec one or gruflow's shipped default")
    ap.add_argument("--params", default="", help="extra name=value,... applied to every variant")
    ap.add_argument("--variants", default=f"baseline=;features={FEATURES_ALL}",
                    help='";"-separated name=params pairs, e.g. "baseline=;cat=category_feature=1"')
    ap.add_argument("--cutoff", type=int, default=20)
    args = ap.parse_args(argv)
    base = GRU4RecParams.parse(args.params, OFFICIAL if args.base == "official" else GRU4RecParams())
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    df = load_events(args.data, args.fmt)
    train, test = time_split(df, args.days)
    result = {"data": str(args.data), "format": args.fmt, "days": args.days, "base": args.base,
              "train": describe(train), "test": describe(test), "cutoff": args.cutoff, "variants": {}}
    for spec in args.variants.split(";"):
        name, _, text = spec.partition("=")
        params = GRU4RecParams.parse(text, base)
        result["variants"][name.strip()] = run_variant(train, test, params, seeds, args.cutoff)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
