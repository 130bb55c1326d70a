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
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pandas as pd


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


def _env(settings: Any) -> dict[str, str]:
    return settings.subprocess_env(PYTHONUNBUFFERED=os.environ.get("PYTHONUNBUFFERED", "1"))


def scrape(settings: Any, timeout: float = 5.0) -> dict[tuple[str, tuple], float]:
    """The worker's /metrics as {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    url = f"http://127.0.0.1:{settings.process.web_port}/metrics"
    with urllib.request.urlopen(url, timeout=timeout) as r:
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _sum(samples: dict, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= set(lab))


def prequential(samples: dict, model: str, k: int) -> dict:
    """HR@k and MRR@k of ``model`` from the worker's counters; ``k`` must be the worker's top_k (the only
    list length its counters are labelled with)."""
    n = _sum(samples, "gruflow_prequential_events_total", model=model)
    hits = _sum(samples, "gruflow_prequential_hits_total", model=model, k=str(k))
    rr = _sum(samples, "gruflow_prequential_reciprocal_rank_total", model=model, k=str(k))
    return {"hr": {str(k): hits / n if n else 0.0}, "mrr": {str(k): rr / n if n else 0.0}, "n": int(n)}


class WorkerProcess:
    """``gruflow worker`` as a subprocess configured by ``settings``; always stopped on exit."""

    def __init__(self, settings: Any, log_path: Path) -> None:
        self.settings = settings
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> "WorkerProcess":
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "stream.cli", "worker"], env=_env(self.settings),
                                     stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        url = f"http://127.0.0.1:{self.settings.process.web_port}/readyz"
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}; log {self.log_path}:\n"
                                   + self.log_path.read_text(errors="replace")[-3000:])
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker not ready after 180 s; log {self.log_path}")
            time.sleep(0.3)

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()

    def wait_processed(self, n: int, timeout: float = 600.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            samples = scrape(self.settings)
            if _sum(samples, "gruflow_events_in_total") + _sum(samples, "gruflow_dlq_total") >= n:
                return samples
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"worker died; log {self.log_path}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker processed fewer than {n} events within {timeout} s")
            time.sleep(0.2)

    def wait_version(self, version: int, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while _sum(scrape(self.settings), "gruflow_model_version") < version:
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
    from stream.kafka.broker import free_port
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
    with WorkerProcess(s, tmp / f"worker-{name}.log") as worker:
        _log(f"{name}: worker ready on :{s.process.web_port}")
        try:
            if online:
                trainer = Trainer(s, Metrics.create(role="trainer"), serve_http=False).start()
                if not trainer.ready.wait(120):
                    raise RuntimeError("trainer consumer not assigned within 120 s")
            sent = 0
            step = every if online else len(rest)
            for a in range(0, len(rest), step):
                stats = replay(s, rest.iloc[a:a + step], progress=False)
                if stats.failed:
                    raise RuntimeError(f"{stats.failed} events not delivered")
                sent += stats.delivered
                worker.wait_processed(sent)
                if trainer is not None:
                    if not trainer.wait_consumed(sent, 300):
                        raise RuntimeError(f"trainer consumed only {trainer.events_consumed} of {sent} events")
                    trainer.request_round()
                    if not trainer.wait_rounds(len(rounds) + 1, 1800):
                        raise RuntimeError(f"fine-tune round did not finish: {trainer.error}")
                    r = trainer.results[-1]
                    rounds.append(r.summary())
                    if r.promoted:
                        worker.wait_version(trainer.tuner.current.version)
                    _log(f"{name}: {sent}/{len(rest)} events, round {len(rounds)} {r.status} "
                         f"(+{len(r.new_items)} items, {r.duration_s:.1f} s)")
            samples = worker.wait_processed(sent)
        finally:
            if trainer is not None:
                trainer.stop()
    filtered = {} if trainer is None else {r: trainer.filtered(r) for r in trainer.filter_reasons()}
    k = s.scoring.top_k
    out = {"gru": prequential(samples, "gru", k), "popularity": prequential(samples, "popularity", k),
           "events": sent, "seconds": time.perf_counter() - t0}
    if online:
        out["rounds"] = rounds
        out["training_filtered"] = filtered
        out["versions"] = int(_sum(samples, "gruflow_model_version"))
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
    from model.params import OFFICIAL, GRU4RecParams
    from model.train import train_model
    from stream.settings import Settings

    settings = Settings.from_env()
    torch.set_num_threads(max(1, settings.trainer.trainer_torch_threads))
    df = load_data(args.data, args.format)
    warm, rest, cut = split_warmup(df, args.warmup_days)
    if args.limit:
        rest = rest.iloc[: args.limit]
    if warm.empty or rest.empty:
        raise SystemExit(f"--warmup-days {args.warmup_days} leaves {len(warm)} warm-up and {len(rest)} stream events")
    _log(f"warm-up: {len(warm)} events before {time.strftime('%Y-%m-%d %H:%M', time.gmtime(cut))} UTC; "
         f"stream: {len(rest)} events")
    params = GRU4RecParams.parse(args.params, base=OFFICIAL)  # the warm-up model: official config (measured so)
    net, vocab, pop = train_model(warm, params, progress=True)
    v1 = checkpoint_to_bytes(net, vocab, params, pop, {"version": 1, "parent_version": 0, "source": "warm-up"})
    return Prepared(settings, warm, rest, v1, vocab)


def with_broker(settings: Any, run: Callable[[Any, Path], Any]) -> Any:
    """``run(settings, tmpdir)`` against the embedded broker (started and stopped here) or the cluster
    GRUFLOW_BOOTSTRAP_SERVERS names."""
    broker = None
    with tempfile.TemporaryDirectory(prefix="gruflow-exp-") as tmpdir:
        try:
            if settings.embedded:
                from stream.kafka.broker import EmbeddedKafka

                broker = EmbeddedKafka.from_settings(settings).start()
                settings = broker.settings(settings)
            return run(settings, Path(tmpdir))
        finally:
            if broker is not None:
                broker.stop()


def run_online_experiment(args: argparse.Namespace) -> dict:
    prep = prepare(args)
    warm, rest, vocab, v1 = prep.warm, prep.rest, prep.vocab, prep.v1
    known = set(vocab.ids)
    frozen, online = with_broker(prep.settings, lambda settings, tmp: (
        _run_variant("frozen", settings, v1, rest, args.every, False, tmp, known),
        _run_variant("online", settings, v1, rest, args.every, True, tmp, known)))
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
