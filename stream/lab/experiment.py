"""``gruflow experiment online``: does online fine-tuning pay off on a real stream?

1. Train a model offline on the first ``--warmup-days`` (sessions that start before the cut).
2. Start the embedded Apache Kafka broker (or use GRUFLOW_BOOTSTRAP_SERVERS) and run two variants
   on their own topics, each with a real worker process (``gruflow worker``) serving the warm-up
   model published as version 1 on its models topic:
     frozen  the remaining events replayed in event-time order, the model never changes;
     online  the same replay with a real trainer (in this process) fine-tuning every ``--every``
             events; the replay waits at each slice boundary until the worker has processed the
             slice, the trainer has run its round on it, and a promoted version has been swapped
             into the worker, i.e. a trainer that keeps up with the stream. Within a slice the
             events go as fast as the stack takes them.
3. Prequential HR@K / MRR@K (K = GRUFLOW_TOP_K, the worker's list length) come from the worker's own
   counters (``gruflow_prequential_*``: each event scored against the top-K published to its user
   before it; an item the model does not know is a miss). The popularity baseline is the worker's running popularity on the same stream
   (reported from the online run, where it may recommend items the grown vocabulary added).
4. ``new_items_recommended``: distinct items first seen after the warm-up that appear in published
   recommendations of the online run (read back from its recommendations topic).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pandas as pd

from stream.tools.harness import GruflowProcess, RunningTotals, Samples, kafka_for, total


def _log(msg: str) -> None:
    print(f"[experiment] {msg}", file=sys.stderr, flush=True)


def load_data(path: str, fmt: str) -> pd.DataFrame:
    """A directory in session-rec format means the whole sample: ``*_train_full.txt`` + ``*_test.txt``."""
    from model.data import load_events

    p = Path(path)
    if p.is_dir() and fmt == "session-rec":
        parts = sorted(p.glob("*_train_full.txt")) + sorted(p.glob("*_test.txt"))
        if not parts:
            raise FileNotFoundError(f"{p}: no *_train_full.txt / *_test.txt files (session-rec format)")
        df = pd.concat([load_events(f, fmt) for f in parts], ignore_index=True)
        return df.sort_values(["SessionId", "Time"], kind="stable").reset_index(drop=True)
    return load_events(p, fmt)


def split_warmup(df: pd.DataFrame, days: float) -> tuple[pd.DataFrame, pd.DataFrame, float]:
    """Sessions starting before midnight (UTC) of the first day + ``days`` -> warm-up, the rest -> stream."""
    day0 = math.floor(float(df["Time"].min()) / 86400.0) * 86400.0
    cut = day0 + days * 86400.0
    start = df.groupby("SessionId")["Time"].transform("min")
    warm = df[start < cut].reset_index(drop=True)
    rest = df[start >= cut].sort_values("Time", kind="stable").reset_index(drop=True)
    return warm, rest, cut


PREQUENTIAL = ("gruflow_prequential_events_total", "gruflow_prequential_hits_total",
               "gruflow_prequential_reciprocal_rank_total")


def prequential(samples: Samples | RunningTotals, model: str, k: int) -> dict:
    """HR@k and MRR@k of ``model`` from the worker's counters (summed over model versions); ``k`` must be
    the worker's top_k (the only list length its counters are labelled with)."""
    if isinstance(samples, RunningTotals):
        samples = samples.totals
    n = total(samples, "gruflow_prequential_events_total", model=model)
    hits = total(samples, "gruflow_prequential_hits_total", model=model, k=str(k))
    rr = total(samples, "gruflow_prequential_reciprocal_rank_total", model=model, k=str(k))
    return {"hr": {str(k): hits / n if n else 0.0}, "mrr": {str(k): rr / n if n else 0.0}, "n": int(n)}


def _counts(totals: RunningTotals, model: str, k: int) -> tuple[float, float]:
    """(events scored, hits at ``k``) of ``model`` so far."""
    return (totals.total("gruflow_prequential_events_total", model=model),
            totals.total("gruflow_prequential_hits_total", model=model, k=str(k)))


def windowed_hit_rate(curve: list[dict], model: str) -> tuple[list[float], list[float]]:
    """(events replayed, HR in the slice that ended there) from cumulative counts; slices where nothing
    was scored are left out."""
    xs, ys = [], []
    prev_n = prev_h = 0.0
    for point in curve:
        n, h = point[model]
        if n > prev_n:
            xs.append(point["events"])
            ys.append((h - prev_h) / (n - prev_n))
        prev_n, prev_h = n, h
    return xs, ys


def plot_hit_rates(frozen: dict, online: dict, k: int, path: str) -> None:
    """The prequential HR@k of the online and the frozen model and of popularity, slice by slice."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=110)
    for label, run, model, style in (("online fine-tuning", online, "gru", "-"), ("frozen day-1 model", frozen, "gru", "--"),
                                     ("popularity", online, "popularity", ":")):
        xs, ys = windowed_hit_rate(run["curve"], model)
        ax.plot(xs, ys, style, marker="o", markersize=3, label=f"{label} (HR@{k} {run[model]['hr'][str(k)]:.3f})")
    ax.set_xlabel("events replayed")
    ax.set_ylabel(f"HR@{k} per slice")
    ax.set_ylim(bottom=0)
    ax.set_title(f"prequential HR@{k} over the replayed stream (test-then-train)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def wait_processed(worker: GruflowProcess, n: int, timeout: float = 600.0) -> Samples:
    """The worker's samples once it has taken ``n`` events (processed or dead-lettered)."""
    deadline = time.monotonic() + timeout
    while True:
        samples = worker.scrape()
        if total(samples, "gruflow_events_in_total") + total(samples, "gruflow_dlq_total") >= n:
            return samples
        if worker.exited() is not None:
            raise RuntimeError(f"worker died; log {worker.log_path}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"worker processed fewer than {n} events within {timeout} s")
        time.sleep(0.2)


def wait_version(worker: GruflowProcess, version: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while total(worker.scrape(), "gruflow_model_version") < version:
        if time.monotonic() > deadline:
            raise TimeoutError(f"worker did not swap in model version {version} within {timeout} s")
        time.sleep(0.1)


def read_recommendations(settings: Any, timeout: float = 120.0) -> Iterator[tuple[Any, dict]]:
    """Every message of the recommendations topic up to its end at the call: (message, decoded JSON)."""
    import orjson
    from confluent_kafka import Consumer, TopicPartition

    from stream.kafka.config import consumer_config
    from stream.kafka.topics import TopicNames

    topic = TopicNames.from_settings(settings).recommendations
    consumer = Consumer(consumer_config(settings, None))
    try:
        md = consumer.list_topics(topic, timeout=30).topics[topic]
        parts = [TopicPartition(topic, p, 0) for p in md.partitions]
        ends = {p.partition: consumer.get_watermark_offsets(p, timeout=30)[1] for p in parts}
        consumer.assign(parts)
        done: dict[int, bool] = {p: ends[p] == 0 for p in ends}
        deadline = time.monotonic() + timeout
        while not all(done.values()) and time.monotonic() < deadline:
            for m in consumer.consume(5000, 1.0):
                if m.error() is not None:
                    continue
                if m.offset() >= ends[m.partition()] - 1:
                    done[m.partition()] = True
                yield m, orjson.loads(m.value())
    finally:
        consumer.close()


def new_items_recommended(settings: Any, known: set[str], rest: pd.DataFrame, n_expected: int,
                          timeout: float = 120.0) -> dict:
    """Read the recommendations topic back: which post-warm-up items were recommended, and how many
    stream events after their first appearance."""
    first_rec: dict[str, float] = {}
    seen = 0
    for _, rec in read_recommendations(settings, timeout):
        seen += 1
        ts = float(rec.get("event_ts", 0)) / 1000.0
        for it in rec.get("items", ()):
            item = str(it["item_id"])
            if item not in known and ts < first_rec.get(item, math.inf):
                first_rec[item] = ts
    times = rest["Time"].to_numpy()
    first_seen = rest.groupby("ItemId", sort=False)["Time"].min()
    lags = []
    for item, ts in first_rec.items():
        if item in first_seen.index:
            a = int(np.searchsorted(times, first_seen[item], side="left"))
            b = int(np.searchsorted(times, ts, side="left"))
            lags.append(max(0, b - a))
    return {"new_items_recommended": len(first_rec), "mean_events_to_first_recommendation":
            float(np.mean(lags)) if lags else None, "recommendation_messages": seen,
            "new_items_in_stream": int(sum(1 for i in first_seen.index if i not in known))}


def _run_variant(name: str, base: Any, v1: bytes, rest: pd.DataFrame, every: int, online: bool, tmp: Path,
                 known: set[str], readback: Callable[[Any], dict] | None = None) -> dict:
    """One variant on its own topics; ``readback(settings)`` runs after the replay, while the broker is up
    (e.g. to read the recommendations topic), and its result is merged into the returned dict."""
    from stream.online import model_sync
    from stream.kafka.broker_setup import free_port
    from stream.observe.metrics import Metrics
    from stream.tools.replay import replay
    from stream.kafka.topics import ensure_topics
    from stream.online.trainer import Trainer

    pid = os.getpid()
    s = base.replace(topic_prefix=f"exp{pid}-{name}.", app_id=f"gruflow-exp{pid}-{name}", data_dir=tmp / name,
                     web_host="127.0.0.1", web_port=free_port(), finetune_every_events=10**9,
                     finetune_interval_s=0.0, model_path="")
    Path(s.process.data_dir).mkdir(parents=True, exist_ok=True)
    ensure_topics(s)
    model_sync.publish_version(s, v1, 1, 0, {"version": 1, "source": "warm-up"})
    t0 = time.perf_counter()
    rounds: list[dict] = []
    trainer = None
    with GruflowProcess.worker(s, tmp / f"worker-{name}.log") as worker:
        _log(f"{name}: worker ready on :{s.process.web_port}")
        try:
            if online:
                trainer = Trainer(s, Metrics.create(role="trainer"), serve_http=False).start()
                if not trainer.ready.wait(120):
                    raise RuntimeError("trainer consumer not assigned within 120 s")
            sent = 0
            curve: list[dict] = []  # cumulative prequential counts after each slice (test-then-train)
            totals = RunningTotals(PREQUENTIAL)  # old versions' series disappear from /metrics
            k = s.scoring.top_k
            for a in range(0, len(rest), every):
                stats = replay(s, rest.iloc[a:a + every], progress=False)
                if stats.failed:
                    raise RuntimeError(f"{stats.failed} events not delivered")
                sent += stats.delivered
                totals.update(wait_processed(worker, sent))
                curve.append({"events": sent, **{m: _counts(totals, m, k) for m in ("gru", "popularity")}})
                if trainer is not None:
                    if not trainer.wait_consumed(sent, 300):
                        raise RuntimeError(f"trainer consumed only {trainer.events_consumed} of {sent} events")
                    trainer.request_round()
                    if not trainer.wait_rounds(len(rounds) + 1, 1800):
                        raise RuntimeError(f"fine-tune round did not finish: {trainer.error}")
                    r = trainer.results[-1]
                    rounds.append(r.summary())
                    if r.promoted:
                        wait_version(worker, trainer.tuner.current.version)
                    _log(f"{name}: {sent}/{len(rest)} events, round {len(rounds)} {r.status} "
                         f"(+{len(r.new_items)} items, {r.duration_s:.1f} s)")
            samples = wait_processed(worker, sent)
            totals.update(samples)
        finally:
            if trainer is not None:
                trainer.stop()
    filtered = {} if trainer is None else {r: trainer.filtered(r) for r in trainer.filter_reasons()}
    out = {"gru": prequential(totals, "gru", k), "popularity": prequential(totals, "popularity", k),
           "events": sent, "seconds": time.perf_counter() - t0, "curve": curve}
    if online:
        out["rounds"] = rounds
        out["training_filtered"] = filtered
        out["versions"] = int(total(samples, "gruflow_model_version"))
        out.update(new_items_recommended(s, known, rest, sent))
    if readback is not None:
        out.update(readback(s))
    _log(f"{name}: HR@{k} {out['gru']['hr'][str(k)]:.4f} MRR@{k} {out['gru']['mrr'][str(k)]:.4f} "
         f"(popularity {out['popularity']['hr'][str(k)]:.4f}/{out['popularity']['mrr'][str(k)]:.4f}) "
         f"in {out['seconds']:.0f} s")
    return out


@dataclass(frozen=True)
class Prepared:
    """The replayed stream and the warm-up model every variant starts from."""

    settings: Any
    warm: pd.DataFrame
    rest: pd.DataFrame
    v1: bytes
    vocab: Any


def prepare(args: argparse.Namespace) -> Prepared:
    """Load DATA, split off the warm-up days, train the warm-up model (``--params`` over OFFICIAL)."""
    import torch

    from model.checkpoint import checkpoint_to_bytes
    from model.params import OFFICIAL, GRU4RecParams, read_params_file
    from model.train import train_model
    from stream.settings import Settings

    settings = Settings.from_env()
    if getattr(args, "plot", None) and importlib.util.find_spec("matplotlib") is None:  # before the long run
        raise ValueError("--plot needs matplotlib: pip install 'gruflow[plot]'")
    torch.set_num_threads(max(1, settings.trainer.trainer_torch_threads))
    df = load_data(args.data, args.format)
    warm, rest, cut = split_warmup(df, args.warmup_days)
    if args.limit:
        rest = rest.iloc[: args.limit]
    if warm.empty or rest.empty:
        raise SystemExit(f"--warmup-days {args.warmup_days} leaves {len(warm)} warm-up and {len(rest)} stream events")
    _log(f"warm-up: {len(warm)} events before {time.strftime('%Y-%m-%d %H:%M', time.gmtime(cut))} UTC; "
         f"stream: {len(rest)} events")
    # the warm-up model: the official configuration (measured so), or a params file (`gruflow tune`), and
    # --params on top
    base = read_params_file(args.params_file) if getattr(args, "params_file", None) else OFFICIAL
    params = GRU4RecParams.parse(args.params, base=base)
    net, vocab, pop = train_model(warm, params, progress=True)
    v1 = checkpoint_to_bytes(net, vocab, params, pop, {"version": 1, "parent_version": 0, "source": "warm-up"})
    return Prepared(settings, warm, rest, v1, vocab)


def with_broker(settings: Any, run: Callable[[Any, Path], Any]) -> Any:
    """``run(settings, tmpdir)`` against the embedded broker (started and stopped here) or the cluster
    GRUFLOW_BOOTSTRAP_SERVERS names."""
    with kafka_for(settings) as settings, tempfile.TemporaryDirectory(prefix="gruflow-exp-") as tmpdir:
        return run(settings, Path(tmpdir))


def run_online_experiment(args: argparse.Namespace) -> dict:
    prep = prepare(args)
    warm, rest, vocab, v1 = prep.warm, prep.rest, prep.vocab, prep.v1
    known = set(vocab.ids)
    frozen, online = with_broker(prep.settings, lambda settings, tmp: (
        _run_variant("frozen", settings, v1, rest, args.every, False, tmp, known),
        _run_variant("online", settings, v1, rest, args.every, True, tmp, known)))
    if getattr(args, "plot", None):
        plot_hit_rates(frozen, online, prep.settings.scoring.top_k, args.plot)
        _log(f"plot: {args.plot}")
    details = {"frozen": frozen, "online": {k: v for k, v in online.items() if k != "rounds"},
               "rounds": online["rounds"], "warmup_events": len(warm), "warmup_items": len(vocab)}
    _log("details: " + __import__("json").dumps(details, default=str))
    return {
        "frozen": {"hr": frozen["gru"]["hr"], "mrr": frozen["gru"]["mrr"]},
        "online": {"hr": online["gru"]["hr"], "mrr": online["gru"]["mrr"]},
        "popularity": {"hr": online["popularity"]["hr"], "mrr": online["popularity"]["mrr"]},
        "new_items_recommended": online["new_items_recommended"],
        "events": len(rest),
    }
