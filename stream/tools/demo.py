"""``gruflow demo``: the whole pipeline on one machine, finishing by itself in a minute or two.

embedded Apache Kafka (unless GRUFLOW_BOOTSTRAP_SERVERS is set) -> topics -> a quick GRU4Rec model
trained on the first sessions of the data (synthetic unless --data) -> `gruflow run` in a subprocess (the
real worker plus the online trainer, which fine-tunes on the stream and hot-swaps new versions) -> replay of the later sessions (plus a few malformed messages for the DLQ) -> a live
summary every few seconds from the worker's /metrics (throughput, end-to-end latency p50/p99,
prequential HR@20 / MRR@20 of the GRU vs a popularity baseline counted on the same stream, DLQ) ->
sample recommendations -> clean shutdown of worker and broker.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stream.tools.processes import PROJECT_ROOT, stop_process
from stream.settings import Settings

TRAIN_SESSIONS = 5000  # synthetic sessions the quick model trains on (a few seconds per epoch)
FINETUNE_EVERY_EVENTS = 10_000  # the demo's trainer fine-tunes often, so a new version shows up live
FINETUNE_INTERVAL_S = 20.0


def _say(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------------------------- metrics
@dataclass
class Snapshot:
    at: float
    events: float
    recs: float
    dlq: float
    latency_buckets: list[tuple[float, float]]  # cumulative (upper bound, count)
    gru: tuple[float, float, float]  # events, hits, reciprocal rank sum
    pop: tuple[float, float, float]
    state: float
    unknown: float
    model_version: float


def scrape(url: str) -> Snapshot | None:
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(url + "/metrics", timeout=2) as r:
            text = r.read().decode()
    except (OSError, urllib.error.URLError):
        return None
    val: dict[str, float] = {}
    buckets: list[tuple[float, float]] = []
    pq: dict[tuple[str, str], float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "gruflow_end_to_end_latency_seconds_bucket":
                buckets.append((float(s.labels["le"]), s.value))
            elif s.name.startswith("gruflow_prequential_") and s.name.endswith("_total"):
                key = (s.name, s.labels.get("model", ""))
                pq[key] = pq.get(key, 0.0) + s.value
            elif s.name.endswith("_total") or s.name in ("gruflow_state_entries", "gruflow_model_version"):
                val[s.name] = val.get(s.name, 0.0) + s.value

    def prequential(model: str) -> tuple[float, float, float]:
        return (pq.get(("gruflow_prequential_events_total", model), 0.0),
                pq.get(("gruflow_prequential_hits_total", model), 0.0),
                pq.get(("gruflow_prequential_reciprocal_rank_total", model), 0.0))

    return Snapshot(time.time(), val.get("gruflow_events_in_total", 0.0), val.get("gruflow_recommendations_out_total", 0.0),
                    val.get("gruflow_dlq_total", 0.0), sorted(buckets), prequential("gru"), prequential("popularity"),
                    val.get("gruflow_state_entries", 0.0), val.get("gruflow_unknown_items_total", 0.0),
                    val.get("gruflow_model_version", 0.0))


def quantile(buckets: list[tuple[float, float]], q: float) -> float:
    """Quantile from cumulative histogram buckets, interpolated inside the bucket (as PromQL does)."""
    if not buckets or buckets[-1][1] <= 0:
        return float("nan")
    total = buckets[-1][1]
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return prev_bound
            width = count - prev_count
            return prev_bound + (bound - prev_bound) * ((rank - prev_count) / width if width else 1.0)
        prev_bound, prev_count = bound, count
    return prev_bound


def _delta(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> list[tuple[float, float]]:
    old = dict(a)
    return [(le, c - old.get(le, 0.0)) for le, c in b]


def summary_line(prev: Snapshot | None, cur: Snapshot) -> str:
    dt = (cur.at - prev.at) if prev else 0.0
    rate = (cur.recs - prev.recs) / dt if prev and dt > 0 else 0.0
    window = _delta(prev.latency_buckets, cur.latency_buckets) if prev else cur.latency_buckets
    if not window or window[-1][1] <= 0:
        window = cur.latency_buckets
    p50, p99 = quantile(window, 0.5) * 1000, quantile(window, 0.99) * 1000
    g, p = cur.gru, cur.pop
    hr_g = g[1] / g[0] if g[0] else 0.0
    hr_p = p[1] / p[0] if p[0] else 0.0
    return (f"  {cur.recs:>8,.0f} answered  {rate:>8,.0f} ev/s  latency p50 {p50:6.1f} ms  p99 {p99:6.1f} ms  "
            f"HR@20 gru {hr_g:.3f} vs popularity {hr_p:.3f}  MRR@20 gru {(g[2] / g[0] if g[0] else 0):.3f} "
            f"vs {(p[2] / p[0] if p[0] else 0):.3f}  dlq {cur.dlq:,.0f}  users {cur.state:,.0f}  "
            f"model v{cur.model_version:.0f}")


# ------------------------------------------------------------------------------------------- steps
def _data(args: argparse.Namespace) -> tuple[Any, Any]:
    """(training part, replay part): sessions split by start time."""
    import numpy as np

    if args.data:
        from model.data import load_events

        if not args.format:
            raise SystemExit("--data needs --format (e.g. --format session-rec)")
        df = load_events(args.data, args.format)
    else:
        from model.synthetic import generate

        df = generate(n_sessions=TRAIN_SESSIONS + max(2000, args.events // 5), n_items=2000, seed=7)
    starts = df.groupby("SessionId")["Time"].min().sort_values()
    n_train = min(TRAIN_SESSIONS, max(1, int(len(starts) * 0.5)))
    train_ids = set(starts.index[:n_train].tolist())
    is_train = df["SessionId"].isin(train_ids).to_numpy()
    train, rest = df[is_train], df[~is_train]
    rest = rest.iloc[np.argsort(rest["Time"].to_numpy(), kind="stable")].head(args.events)
    return train, rest


def _train(train: Any, path: Path) -> None:
    import torch

    from model.checkpoint import save_checkpoint
    import dataclasses

    from model.params import OFFICIAL
    from model.train import train_model

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    # a quick model: the official cross-entropy setup (faster per event than the BPR-max default), smaller
    params = dataclasses.replace(OFFICIAL, layers=(64,), n_epochs=2, batch_size=64, n_sample=512, learning_rate=0.08)
    t0 = time.monotonic()
    net, vocab, pop = train_model(train, params, progress=True)
    save_checkpoint(path, net, vocab, params, pop, {"version": 1, "source": "gruflow demo"})
    _say(f"model: {len(vocab):,} items, hidden {params.layers[0]}, trained on {len(train):,} events in "
         f"{time.monotonic() - t0:.0f} s")


def _wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the worker exited with {proc.returncode}; its log:\n{_tail(log)}")
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=1) as r:
                if r.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.3)
    raise RuntimeError(f"the worker was not ready after {timeout:.0f} s; its log:\n{_tail(log)}")


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _bad_messages(settings: Settings, t_ms: int) -> list[tuple[str, bytes | None, bytes]]:
    import orjson

    clicks, purchases = settings.topic("clicks"), settings.topic("purchases")
    return [(clicks, b"demo-bad", b"{not json"),
            (clicks, b"demo-bad", orjson.dumps({"user_id": "demo-bad", "item_id": "i1", "event_type": "like",
                                                 "ts": t_ms})),
            (clicks, b"demo-bad", orjson.dumps({"user_id": "demo-bad", "item_id": "i1", "event_type": "purchase",
                                                 "ts": t_ms})),
            (purchases, b"demo-bad", orjson.dumps({"user_id": "demo-bad", "event_type": "purchase", "ts": t_ms})),
            (clicks, b"demo-bad", orjson.dumps({"user_id": "demo-bad", "item_id": "i1", "event_type": "view",
                                                 "ts": 12345}))]


def _samples(settings: Settings, n: int = 4) -> list[str]:
    """A few recommendations from the end of the topic (users with longer sessions first)."""
    import orjson
    from confluent_kafka import Consumer, TopicPartition

    from stream.kafka.config import consumer_config

    topic = settings.topic("recommendations")
    c = Consumer(consumer_config(settings, group_id=None))
    try:
        parts = []
        for p in range(settings.topics.partitions):
            lo, hi = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            parts.append(TopicPartition(topic, p, max(lo, hi - 50)))
        c.assign(parts)
        msgs = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and len(msgs) < 50 * settings.topics.partitions:
            got = c.consume(500, 0.5)
            if not got:
                break
            msgs.extend(m for m in got if m.error() is None)
        users: dict[str, bytes] = {}
        for m in msgs:
            users[orjson.loads(m.value())["user_id"]] = m.value()
        lines = []
        for value in list(users.values())[-n:]:
            rec = orjson.loads(value)
            top = ", ".join(f"{i['item_id']} ({i['score']:.2f})" for i in rec["items"][:5])
            lines.append(f"user {rec['user_id']:>6} (model v{rec['model_version']}): {top}, ... "
                         f"[{len(rec['items'])} items]")
        return lines
    finally:
        c.close()


def run_demo(args: argparse.Namespace) -> int:
    from stream.kafka.broker import EmbeddedKafka, free_port
    from stream.tools.replay import replay
    from stream.kafka.topics import ensure_topics

    started = time.monotonic()
    base = Settings.from_env()
    work = Path(tempfile.mkdtemp(prefix="gruflow-demo-"))
    kafka: EmbeddedKafka | None = None
    worker: subprocess.Popen[bytes] | None = None
    try:
        if base.embedded:
            _say("starting the embedded Apache Kafka broker ...")
            kafka = EmbeddedKafka.from_settings(base, data_dir=args.broker_data_dir).start()
            base = kafka.settings(base)
        run_id = time.strftime("%H%M%S")
        settings = base.replace(topic_prefix=f"demo{run_id}.", app_id=f"gruflow-demo-{run_id}",
                                data_dir=work / "state", web_host="127.0.0.1", web_port=free_port(),
                                partitions=min(base.topics.partitions, 4), broker_session_timeout_s=6.0)
        ensure_topics(settings)
        _say(f"topics {settings.topic('clicks')}, {settings.topic('purchases')} -> "
             f"{settings.topic('recommendations')} / {settings.topic('dlq')} on {settings.connection.bootstrap_servers}")

        train, rest = _data(args)
        _say(f"data: {'synthetic sessions' if not args.data else args.data}; training on {len(train):,} events, "
             f"replaying the next {len(rest):,}")
        model_path = work / "demo-model.gfc"
        _train(train, model_path)

        log = work / "worker.log"
        url = f"http://127.0.0.1:{settings.process.web_port}"
        # `gruflow run`: the worker plus the online trainer in one process; the trainer publishes the quick
        # model as version 1, fine-tunes on the replayed stream and the worker swaps new versions in.
        with open(log, "wb") as logf:
            worker = subprocess.Popen(
                [sys.executable, "-m", "stream.cli", "run", "--trainer-port", str(free_port())],
                env=settings.subprocess_env(GRUFLOW_MODEL_PATH=str(model_path),
                                GRUFLOW_FINETUNE_EVERY_EVENTS=str(FINETUNE_EVERY_EVENTS),
                                GRUFLOW_FINETUNE_INTERVAL_S=str(FINETUNE_INTERVAL_S)),
                stdout=logf, stderr=subprocess.STDOUT, cwd=PROJECT_ROOT)
        _say(f"worker + trainer pid {worker.pid}: waiting for it to join the group and restore state "
             f"({url}/readyz) ...")
        _wait_ready(url, worker, log)

        rate = args.rate or 4000.0
        n_bad = len(_bad_messages(settings, 0))
        limit = min(len(rest), int(rate * args.seconds))
        _say(f"replaying {limit:,} events at up to {rate:,.0f}/s (+ {n_bad} malformed "
             "messages for the DLQ); live summary from the worker's /metrics:")
        stats: dict[str, Any] = {}

        def _replay() -> None:
            from confluent_kafka import Producer

            from stream.kafka.config import producer_config

            producer = Producer(producer_config(settings))
            for topic, key, value in _bad_messages(settings, int(time.time() * 1000)):
                producer.produce(topic, value, key)
            stats["r"] = replay(settings, rest, rate=rate, progress=False, limit=limit, producer=producer)

        thread = threading.Thread(target=_replay, name="demo-replay", daemon=True)
        thread.start()
        prev = scrape(url)
        deadline = time.monotonic() + args.seconds + 60
        expected = None
        while time.monotonic() < deadline:
            time.sleep(3.0)
            cur = scrape(url)
            if cur is None:
                continue
            _say(summary_line(prev, cur))
            prev = cur
            if not thread.is_alive():
                if expected is None:
                    r = stats.get("r")
                    expected = r.delivered if r else limit
                if cur.recs >= expected and cur.dlq >= n_bad:
                    break
        thread.join(timeout=5)
        final = scrape(url)
        if final is not None:
            g, p = final.gru, final.pop
            _say(f"done: {final.recs:,.0f} recommendations for {final.events:,.0f} valid events, {final.dlq:,.0f} in "
                 f"the DLQ, {final.unknown:,.0f} unknown items; prequential HR@20 gru "
                 f"{(g[1] / g[0] if g[0] else 0):.3f} vs popularity {(p[1] / p[0] if p[0] else 0):.3f} "
                 f"over {g[0]:,.0f} events; end-to-end latency p50 {quantile(final.latency_buckets, 0.5) * 1000:.1f}"
                 f" ms, p99 {quantile(final.latency_buckets, 0.99) * 1000:.1f} ms")
        _say("sample recommendations:")
        for line in _samples(settings):
            _say("  " + line)
        return 0
    except KeyboardInterrupt:
        _say("interrupted")
        return 130
    finally:
        stop_process(worker)
        if kafka is not None:
            kafka.stop()
        shutil.rmtree(work, ignore_errors=True)
        _say(f"demo finished in {time.monotonic() - started:.0f} s")
