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
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stream.tools import harness
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


PREQUENTIAL = ("gruflow_prequential_events_total", "gruflow_prequential_hits_total",
               "gruflow_prequential_reciprocal_rank_total")


SCRAPE_TIMEOUT_S = 10.0  # the worker's /metrics shares its event loop with a replay at full speed


def scrape(url: str, totals: harness.RunningTotals | None = None) -> Snapshot | None:
    """The worker's counters now; the prequential ones summed over model versions through ``totals`` (the
    worker drops old versions' series). None when /metrics does not answer in time."""
    try:
        samples = harness.scrape(url, SCRAPE_TIMEOUT_S)
    except OSError:
        return None
    if totals is not None:
        totals.update(samples)
        samples = {**{key: v for key, v in samples.items() if key[0] not in PREQUENTIAL}, **totals.totals}
    val: dict[str, float] = {}
    buckets: list[tuple[float, float]] = []
    pq: dict[tuple[str, str], float] = {}
    for (name, labels), value in samples.items():
        lab = dict(labels)
        if name == "gruflow_end_to_end_latency_seconds_bucket":
            buckets.append((float(lab["le"]), value))
        elif name.startswith("gruflow_prequential_") and name.endswith("_total"):
            key = (name, lab.get("model", ""))
            pq[key] = pq.get(key, 0.0) + value
        elif name.endswith("_total") or name in ("gruflow_state_entries", "gruflow_model_version"):
            val[name] = val.get(name, 0.0) + value

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
    n_items, seconds = harness.train_quick_model(train, path, progress=True,
                                                 metadata={"version": 1, "source": "gruflow demo"})
    _say(f"model: {n_items:,} items, hidden 64, trained on {len(train):,} events in {seconds:.0f} s")


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
        parts, ends = [], {}
        for p in range(settings.topics.partitions):
            lo, hi = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            parts.append(TopicPartition(topic, p, max(lo, hi - 50)))
            if hi > lo:
                ends[p] = hi
        c.assign(parts)
        msgs = []
        # the first fetch after assign can take a while on a busy machine: poll until every partition's
        # tail is read, not until the first empty poll
        deadline = time.monotonic() + 15
        while ends and time.monotonic() < deadline:
            for m in c.consume(500, 0.5):
                if m.error() is None:
                    msgs.append(m)
                    if m.offset() + 1 >= ends.get(m.partition(), 0):
                        ends.pop(m.partition(), None)
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


def _demo_settings(base: Settings, work: Path) -> Settings:
    """The demo's own topics (created here), consumer group, state directory and web port on ``base``'s broker."""
    from stream.kafka.broker_setup import free_port
    from stream.kafka.topics import ensure_topics

    run_id = time.strftime("%H%M%S")
    settings = base.replace(topic_prefix=f"demo{run_id}.", app_id=f"gruflow-demo-{run_id}",
                            data_dir=work / "state", web_host="127.0.0.1", web_port=free_port(),
                            partitions=min(base.topics.partitions, 4), broker_session_timeout_s=6.0)
    ensure_topics(settings)
    _say(f"topics {settings.topic('clicks')}, {settings.topic('purchases')} -> "
         f"{settings.topic('recommendations')} / {settings.topic('dlq')} on {settings.connection.bootstrap_servers}")
    return settings


def _start_run(settings: Settings, model_path: Path, log: Path) -> harness.GruflowProcess:
    """`gruflow run`: the worker plus the online trainer in one process; the trainer publishes the quick
    model as version 1, fine-tunes on the replayed stream and the worker swaps new versions in."""
    from stream.kafka.broker_setup import free_port

    env = settings.subprocess_env(GRUFLOW_MODEL_PATH=str(model_path),
                                  GRUFLOW_FINETUNE_EVERY_EVENTS=str(FINETUNE_EVERY_EVENTS),
                                  GRUFLOW_FINETUNE_INTERVAL_S=str(FINETUNE_INTERVAL_S))
    run = harness.GruflowProcess(["run", "--trainer-port", str(free_port())], env, settings.process.web_port,
                                 log).start(wait=False)
    assert run.proc is not None
    _say(f"worker + trainer pid {run.proc.pid}: waiting for it to join the group and restore state "
         f"({run.url}/readyz) ...")
    run.wait_ready(120.0)
    return run


def _replay_and_watch(args: argparse.Namespace, settings: Settings, rest: Any, url: str) -> Snapshot | None:
    """Replay ``rest`` (and the malformed messages) in a thread while printing a summary line from the worker's
    /metrics every few seconds, until every delivered event is answered or time is up; the last snapshot."""
    from stream.tools.replay import replay

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
    totals = harness.RunningTotals(PREQUENTIAL)
    prev = scrape(url, totals)
    deadline = time.monotonic() + args.seconds + 60
    expected = None
    while time.monotonic() < deadline:
        time.sleep(3.0)
        cur = scrape(url, totals)
        if cur is None:
            _say(f"  (the worker's /metrics did not answer within {SCRAPE_TIMEOUT_S:.0f} s: busy)")
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
    return scrape(url, totals)


def final_line(final: Snapshot) -> str:
    g, p = final.gru, final.pop
    return (f"done: {final.recs:,.0f} recommendations for {final.events:,.0f} valid events, {final.dlq:,.0f} in "
            f"the DLQ, {final.unknown:,.0f} unknown items; prequential HR@20 gru "
            f"{(g[1] / g[0] if g[0] else 0):.3f} vs popularity {(p[1] / p[0] if p[0] else 0):.3f} "
            f"over {g[0]:,.0f} events; end-to-end latency p50 {quantile(final.latency_buckets, 0.5) * 1000:.1f}"
            f" ms, p99 {quantile(final.latency_buckets, 0.99) * 1000:.1f} ms")


def _demo(args: argparse.Namespace, base: Settings) -> int:
    """The demo on ``base``'s broker, in a work directory of its own (removed at the end)."""
    work = Path(tempfile.mkdtemp(prefix="gruflow-demo-"))
    run: harness.GruflowProcess | None = None
    try:
        settings = _demo_settings(base, work)
        train, rest = _data(args)
        _say(f"data: {'synthetic sessions' if not args.data else args.data}; training on {len(train):,} events, "
             f"replaying the next {len(rest):,}")
        model_path = work / "demo-model.gfc"
        _train(train, model_path)
        run = _start_run(settings, model_path, work / "worker.log")
        final = _replay_and_watch(args, settings, rest, run.url)
        if final is not None:
            _say(final_line(final))
        _say("sample recommendations:")
        for line in _samples(settings):
            _say("  " + line)
        return 0
    except KeyboardInterrupt:
        _say("interrupted")
        return 130
    finally:
        if run is not None:
            run.stop()
        shutil.rmtree(work, ignore_errors=True)


def add_demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=None, help="event file to train on and replay (default: synthetic data)")
    p.add_argument("--format", "-f", dest="format", default=None, help="format of --data (see `gruflow train`)")
    p.add_argument("--events", type=int, default=60_000, help="events to replay (default 60,000)")
    p.add_argument("--seconds", type=float, default=90.0,
                   help="stop the replay after this long even if events remain (default 90)")
    p.add_argument("--rate", type=float, default=None, help="cap on replayed events per second")
    p.add_argument("--broker-data-dir", default=None,
                   help="the embedded broker keeps its data here across runs (see `gruflow broker --data-dir`)")


def run_demo(args: argparse.Namespace) -> int:
    started = time.monotonic()
    base = Settings.from_env()
    if base.embedded:
        _say("starting the embedded Apache Kafka broker ...")
    try:
        with harness.kafka_for(base, data_dir=args.broker_data_dir) as base:
            return _demo(args, base)
    finally:
        _say(f"demo finished in {time.monotonic() - started:.0f} s")
