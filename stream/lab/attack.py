"""``gruflow experiment attack``: does a shilling attack on the live stream move what normal users see?

The machinery of ``experiment online`` (stream/experiment.py): a warm-up model, the embedded broker, a
real worker process per variant and a real trainer fine-tuning every ``--every`` events. Variants:

  organic     the stream as recorded, defences off (the reference; ``--repeat-organic`` runs it twice
              to show the run-to-run noise);
  undefended  the stream plus fake sessions, defences off;
  defended    the same attacked stream with the training-path input filter and the concentration
              guardrail on (docs/security.md).

Fake sessions (``--share`` of the stream's sessions, spread over its time span) follow the push-attack
shape of the literature: filler items, then a target. ``bot``: uniform random filler at one click a
second; ``human``: fillers drawn by popularity, session lengths and gaps like the recorded ones.
``--targets N`` > 1 is the category variant: N target items of one made-up group (the sample has no
category data), each fake session ending on one of them.

Measured from the recommendations topic, on normal users only: the share of their published lists
that contain a target (``target_exposure``), its mean rank when present, the same per time bin, and
their prequential HR@K (each event against the list published to the user before it).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from stream.lab.experiment import _log, _run_variant, prepare, read_recommendations, with_broker


@dataclass(frozen=True)
class AttackShape:
    name: str
    filler_min: int  # bot: filler count drawn uniformly in [min, max]; human: from recorded lengths
    filler_max: int
    gap_s: float  # bot: seconds between clicks; human: median of log-normal gaps
    gap_sigma: float  # 0 = a fixed timer
    popular_filler: bool


SHAPES = {"bot": AttackShape("bot", 5, 15, 1.0, 0.0, False),
          "human": AttackShape("human", 1, 30, 45.0, 1.2, True)}
# The per-round item-exposure check stays off: on the YooChoose sample organic rounds lift single items by
# factors of 12-17 (trending items), so any limit that stops a push also refuses organic rounds, and the
# refusals cost normal users' HR (docs/security.md has the measurements with it at 10).
DEFENCES = {"training_filter": True, "guardrail_max_item_exposure_factor": 0.0,
            "guardrail_max_gini_increase": 0.05, "guardrail_min_coverage_ratio": 0.7}


def defence_settings(changes: list[str]) -> dict[str, Any]:
    """The settings of the defended runs: ``DEFENCES`` with the command line's ``NAME=VALUE`` changes on top."""
    from stream.settings import Settings

    texts: dict[str, str] = {}
    for change in changes:
        name, sep, value = change.partition("=")
        if not sep or not name:
            raise SystemExit(f"--defence {change!r}: expected NAME=VALUE (a setting's field name)")
        texts[name.strip()] = value.strip()
    return {**DEFENCES, **Settings.parse_changes(texts)}


def pick_targets(rest: pd.DataFrame, known: list[str], n: int, seed: int) -> list[str]:
    """``n`` items the warm-up model knows that are neither head nor tail of the stream (40th-60th
    percentile of stream counts): an item an attacker would want to lift, with an organic exposure."""
    counts = rest["ItemId"].astype(str).value_counts()
    cand = counts[counts.index.isin(set(known))]
    lo, hi = cand.quantile(0.4), cand.quantile(0.6)
    pool = sorted(cand[(cand >= lo) & (cand <= hi)].index)
    rng = np.random.default_rng(seed)
    return [str(x) for x in rng.choice(pool, size=min(n, len(pool)), replace=False)]


def fake_sessions(rest: pd.DataFrame, share: float, shape: AttackShape, targets: list[str], filler_pool: list[str],
                  seed: int) -> pd.DataFrame:
    """Fake sessions (SessionId above every recorded one) for ``share`` of the stream's sessions."""
    rng = np.random.default_rng(seed)
    n_sessions = max(1, int(round(share * rest["SessionId"].nunique())))
    t0, t1 = float(rest["Time"].min()), float(rest["Time"].max())
    counts = rest["ItemId"].astype(str).value_counts()
    pool = np.array(filler_pool, dtype=object)
    weights = counts.reindex(pool).fillna(0).to_numpy(dtype=np.float64) + 1.0
    weights /= weights.sum()
    lengths = rest.groupby("SessionId").size().to_numpy()
    first = int(rest["SessionId"].max()) + 1
    rows: list[tuple[int, str, float]] = []
    for j in range(n_sessions):
        if shape.popular_filler:
            n_fill = int(np.clip(rng.choice(lengths) - 1, shape.filler_min, shape.filler_max))
            filler = rng.choice(pool, size=n_fill, p=weights)
        else:
            n_fill = int(rng.integers(shape.filler_min, shape.filler_max + 1))
            filler = rng.choice(pool, size=n_fill)
        items = [str(x) for x in filler] + [targets[j % len(targets)]]
        gaps = (np.full(len(items) - 1, shape.gap_s) if shape.gap_sigma == 0 else
                shape.gap_s * np.exp(shape.gap_sigma * rng.standard_normal(len(items) - 1)))
        times = np.concatenate([[0.0], np.cumsum(gaps)])
        start = rng.uniform(t0, max(t0, t1 - times[-1]))
        rows += [(first + j, item, start + t) for item, t in zip(items, times)]
    return pd.DataFrame({"SessionId": [r[0] for r in rows], "ItemId": pd.Series([r[1] for r in rows], dtype=object),
                         "Time": [r[2] for r in rows], "EventType": np.ones(len(rows), dtype=np.int8)})


def read_lists(settings: Any, timeout: float = 120.0) -> pd.DataFrame:
    """Every published recommendation: user, event time (s), list of item ids, partition, offset."""
    rows = [(str(rec["user_id"]), float(rec.get("event_ts", 0)) / 1000.0,
             [str(i["item_id"]) for i in rec.get("items", ())], m.partition(), m.offset())
            for m, rec in read_recommendations(settings, timeout)]
    return pd.DataFrame(rows, columns=["user", "ts", "items", "partition", "offset"])


def exposure_report(lists: pd.DataFrame, fake: set[str], targets: set[str], bins: int, t0: float,
                    t1: float) -> dict:
    """Target exposure among normal users' lists: share containing a target, mean 1-based rank when
    present, and the share per event-time bin."""
    normal = lists[~lists["user"].isin(fake)]
    ranks = np.array([next((r + 1 for r, it in enumerate(items) if it in targets), 0) for items in normal["items"]])
    has = ranks > 0
    edges = np.linspace(t0, t1, bins + 1)
    which = np.clip(np.searchsorted(edges, normal["ts"].to_numpy(), side="right") - 1, 0, bins - 1)
    over_time = [float(has[which == b].mean()) if (which == b).any() else 0.0 for b in range(bins)]
    return {"share": float(has.mean()) if len(has) else 0.0, "mean_rank": float(ranks[has].mean()) if has.any()
            else None, "lists": int(len(has)), "over_time": over_time,
            "bin_start_ts": [float(x) for x in edges[:-1]]}


def normal_hr(lists: pd.DataFrame, stream: pd.DataFrame, fake: set[str], k: int) -> dict:
    """Prequential HR@k of normal users: their i-th event against the list published after their
    (i-1)-th. A user's lists are in offset order (one partition per user) and one per event."""
    order = np.argsort(stream["Time"].to_numpy(dtype=np.float64), kind="stable")  # the replay's order
    s = stream.iloc[order]
    events = s.assign(user=s["SessionId"].astype(str), item=s["ItemId"].astype(str))
    events = events[~events["user"].isin(fake)]
    seq = events.groupby("user", sort=False)["item"].agg(list)
    pub = lists[~lists["user"].isin(fake)].sort_values(["partition", "offset"]).groupby("user", sort=False)["items"]
    pub = pub.agg(list)
    hits = n = mismatched = 0
    for user, items in seq.items():
        got = pub.get(user)
        if got is None or len(got) != len(items):
            mismatched += 1
            continue
        for j in range(1, len(items)):
            n += 1
            hits += items[j] in got[j - 1][:k]
    return {"hr": {str(k): hits / n if n else 0.0}, "n": n, "users_skipped": mismatched}


def _summary(out: dict, organic_share: float | None) -> dict:
    res = {"target_exposure": out["exposure"]["share"], "target_mean_rank": out["exposure"]["mean_rank"],
           "exposure_over_time": out["exposure"]["over_time"], "hr": out["normal"]["hr"],
           "scored_events": out["normal"]["n"], "users_skipped": out["normal"]["users_skipped"],
           "events": out["events"],
           "seconds": round(out["seconds"], 1), "rounds": _rounds(out.get("rounds", [])),
           "training_filtered": {k: v for k, v in out.get("training_filtered", {}).items() if v},
           "max_item_factor": [r["candidate"].get("exposure", {}).get("max_item_factor") for r in out.get("rounds", [])
                               if r["status"] != "skipped"]}
    if organic_share is not None:
        res["exposure_ratio_to_organic"] = out["exposure"]["share"] / organic_share if organic_share > 0 else math.inf
    return res


def _rounds(rounds: list[dict]) -> dict:
    status = pd.Series([r["status"] for r in rounds], dtype=object).value_counts().to_dict()
    conc = pd.Series([r.get("concentration", "") for r in rounds], dtype=object)
    return {"n": len(rounds), **{str(k): int(v) for k, v in status.items()},
            "concentration_refusals": {str(k): int(v) for k, v in conc[conc != ""].value_counts().items()},
            "held_back_items": int(sum(r["candidate"].get("exposure", {}).get("held_back_items", 0) or 0
                                       for r in rounds if r.get("candidate")))}


def run_attack_experiment(args: argparse.Namespace) -> dict:
    prep = prepare(args)
    rest, known = prep.rest, list(prep.vocab.ids)
    targets = pick_targets(rest, known, args.targets, args.seed) if not args.target else [args.target]
    shapes = [SHAPES[name] for name in args.shapes.split(",")]
    t0, t1 = float(rest["Time"].min()), float(rest["Time"].max())
    k = prep.settings.scoring.top_k
    defences = defence_settings(args.defence)
    _log(f"defended runs: {', '.join(f'{n}={v}' for n, v in defences.items())}")
    _log(f"targets: {len(targets)} item(s); shapes: {[s.name for s in shapes]}; share {args.share}")

    def one(name: str, base: Any, stream: pd.DataFrame, fake: set[str], tmp: Any) -> dict:
        def readback(s: Any) -> dict:
            lists = read_lists(s)
            return {"exposure": exposure_report(lists, fake, set(targets), args.bins, t0, t1),
                    "normal": normal_hr(lists, stream, fake, k)}
        return _run_variant(name, base, prep.v1, stream, args.every, True, tmp, set(known), readback)

    def run(settings: Any, tmp: Any) -> dict:
        organic = [one(f"organic{i}", settings, rest, set(), tmp) for i in range(1 + int(args.repeat_organic))]
        ref = organic[0]["exposure"]["share"]
        result: dict[str, Any] = {"organic": _summary(organic[0], None), "targets": len(targets),
                                  "share": args.share, "k": k, "defences": defences, "shapes": {}}
        if len(organic) > 1:
            result["organic_repeat"] = _summary(organic[1], None)
        for shape in shapes:
            fakes = fake_sessions(rest, args.share, shape, targets, known, args.seed)
            fake_ids = set(fakes["SessionId"].astype(str))
            # in event-time order: the replay goes slice by slice in row order
            stream = pd.concat([rest, fakes], ignore_index=True).sort_values("Time", kind="stable")
            stream = stream.reset_index(drop=True)
            und = one(f"{shape.name}-undefended", settings, stream, fake_ids, tmp)
            dfd = one(f"{shape.name}-defended", settings.replace(**defences), stream, fake_ids, tmp)
            result["shapes"][shape.name] = {"fake_sessions": len(fake_ids), "fake_events": len(fakes),
                                            "undefended": _summary(und, ref), "defended": _summary(dfd, ref)}
        first = result["shapes"][shapes[0].name]
        result["undefended"], result["defended"] = first["undefended"], first["defended"]
        return result

    return with_broker(prep.settings, run)


def add_attack_parser(exp_sub: Any, handler: Any) -> None:
    p = exp_sub.add_parser("attack", help="target exposure and HR of normal users under a shilling attack, "
                           "defences off and on")
    p.add_argument("data", help="event file or directory (session-rec: *_train_full.txt + *_test.txt)")
    p.add_argument("--format", default="session-rec", help="data format (see `gruflow train --help`)")
    p.add_argument("--share", type=float, default=0.01, help="fake sessions as a share of the stream's sessions")
    p.add_argument("--shapes", default="bot", help="attack shapes, comma-separated: bot, human (the first one "
                   "fills the top-level undefended/defended)")
    p.add_argument("--targets", type=int, default=1, help="target items (>1: the category variant)")
    p.add_argument("--target", default="", help="push this item id instead of a picked one")
    p.add_argument("--warmup-days", type=float, default=1.0, help="days trained offline before the replay")
    p.add_argument("--params", default="", help="GRU4Rec parameters of the warm-up model, name=value,...")
    p.add_argument("--every", type=int, default=4000, help="events per fine-tune round")
    p.add_argument("--bins", type=int, default=8, help="event-time bins of exposure_over_time")
    p.add_argument("--defence", action="append", default=[], metavar="NAME=VALUE",
                   help="change a setting of the defended runs (a settings field name, e.g. "
                   "guardrail_max_item_exposure_factor=0); repeatable")
    p.add_argument("--repeat-organic", action="store_true", help="run the organic reference twice (noise)")
    p.add_argument("--seed", type=int, default=0, help="seed of target choice and fake sessions")
    p.add_argument("--limit", type=int, default=None, help="replay at most N recorded events (smoke runs)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.set_defaults(func=handler)
