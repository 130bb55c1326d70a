"""Replay a recorded event table into the input topics, in event-time order, as a live shop would send it.

CLI (wired by stream/cli/commands.py with :func:`add_replay_args` and :func:`run_replay`)::

    gruflow replay DATA --format FMT [--rate N] [--speedup X] [--limit N] [--no-progress]

Reads ``args.bootstrap`` too when the caller's parser defines it. Views, clicks and carts go to the
``clicks`` topic, purchases to ``purchases``; each message is keyed by the user id, which is the session
id for session datasets (``user_id = str(SessionId)``). ``--rate`` caps events per second,
``--speedup`` keeps event-time gaps divided by X; with neither the replay runs as fast as it can.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import orjson

from model.events import EVENT_TYPE_NAMES, EventType
from stream.settings import Settings
from stream.tools.harness import cluster_settings


_POLL_EVERY = 1000


@dataclass
class ReplayStats:
    events: int = 0  # handed to the producer
    delivered: int = 0
    failed: int = 0
    by_topic: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)  # delivery error name -> count
    seconds: float = 0.0
    first_ts_ms: int | None = None
    last_ts_ms: int | None = None
    interrupted: bool = False

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"events": self.events, "delivered": self.delivered, "failed": self.failed,
                "by_topic": dict(self.by_topic), "errors": dict(self.errors),
                "seconds": round(self.seconds, 3), "events_per_s": round(self.events_per_s, 1)}

    def summary(self) -> str:
        text = (f"replayed {self.events} events in {self.seconds:.1f} s ({self.events_per_s:,.0f} ev/s): "
                f"{self.delivered} delivered, {self.failed} failed")
        if self.errors:
            text += " (" + ", ".join(f"{k}: {v}" for k, v in self.errors.most_common(5)) + ")"
        return text


def encode_event(user_id: str, item_id: str | int, event_type: str, ts_ms: int, **optional: Any) -> bytes:
    """One input event as the worker expects it (JSON object; optional fields only when given)."""
    event = {"user_id": user_id, "item_id": item_id, "event_type": event_type, "ts": ts_ms}
    event.update({k: v for k, v in optional.items() if v is not None})
    return orjson.dumps(event)


def time_order(df: Any, limit: int | None = None) -> np.ndarray:
    """Row positions of the event table in event-time order (stable: ties keep table order)."""
    order = np.argsort(df["Time"].to_numpy(dtype=np.float64), kind="stable")
    return order[:limit] if limit is not None else order


def iter_messages(settings: Settings, df: Any, limit: int | None = None) -> Iterator[tuple[str, bytes, bytes, int]]:
    """(topic, key, value, ts_ms) for every event, in event-time order."""
    clicks, purchases = settings.topic("clicks"), settings.topic("purchases")
    if settings.topics.topic_events:  # one topic for every event type
        clicks = purchases = settings.topics.topic_events
    order = time_order(df, limit)
    sessions = df["SessionId"].to_numpy()[order]
    items = df["ItemId"].to_numpy()[order]
    types = df["EventType"].to_numpy()[order]
    ts_ms = np.rint(df["Time"].to_numpy(dtype=np.float64)[order] * 1000.0).astype(np.int64)
    purchase = int(EventType.PURCHASE)
    categories, prices = _side_features(df, order)
    for j, (sid, item, etype, ts) in enumerate(zip(sessions.tolist(), items.tolist(), types.tolist(), ts_ms.tolist())):
        user = str(sid)
        name = EVENT_TYPE_NAMES.get(int(etype))
        if name is None:
            raise ValueError(f"event table has unknown EventType {etype!r}")
        item_id = item if isinstance(item, (str, int)) else str(item)
        value = encode_event(user, item_id, name, ts, category=categories[j], price=prices[j])
        yield (purchases if etype == purchase else clicks), user.encode(), value, ts


def _side_features(df: Any, order: np.ndarray) -> tuple[list, list]:
    """The optional ``category`` / ``price`` of each event (None where the table has none), so the
    worker's feature embeddings (model.features) see what offline training saw."""
    n = len(order)
    categories: list = [None] * n
    prices: list = [None] * n
    if "Category" in df.columns:
        c = df["Category"].to_numpy(dtype=object)[order]
        categories = [None if (x is None or x != x or x == "") else str(x) for x in c.tolist()]
    if "Price" in df.columns:
        p = df["Price"].to_numpy(dtype=np.float64)[order]
        prices = [float(x) if np.isfinite(x) and x >= 0 else None for x in p.tolist()]
    return categories, prices


class _Pacer:
    """Sleeps so that event i goes out no earlier than both the rate cap and the sped-up event time allow."""

    def __init__(self, rate: float | None, speedup: float | None,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
        if rate is not None and rate <= 0:
            raise ValueError("--rate must be > 0 events/s")
        if speedup is not None and speedup <= 0:
            raise ValueError("--speedup must be > 0")
        self.rate, self.speedup = rate, speedup
        self.clock, self.sleep = clock, sleep
        self.start = clock()
        self.first_ts: int | None = None

    @property
    def active(self) -> bool:
        return self.rate is not None or self.speedup is not None

    def wait(self, i: int, ts_ms: int) -> None:
        target = 0.0
        if self.rate is not None:
            target = i / self.rate
        if self.speedup is not None:
            if self.first_ts is None:
                self.first_ts = ts_ms
            target = max(target, (ts_ms - self.first_ts) / 1000.0 / self.speedup)
        delay = self.start + target - self.clock()
        if delay > 0.0005:
            self.sleep(delay)


def replay(settings: Settings, df: Any, rate: float | None = None, speedup: float | None = None,
           progress: bool = True, limit: int | None = None, producer: Any = None,
           flush_timeout: float = 60.0) -> ReplayStats:
    """Produce the event table ``df`` (model.data format) to the input topics; returns delivery counts.

    Waits for every delivery report (or ``flush_timeout``) before it returns; messages still queued
    then count as failed. On Ctrl-C it flushes what was sent, prints the counts and re-raises.
    """
    from confluent_kafka import KafkaError, KafkaException, Producer

    from model.progress import progress as progress_bar

    from stream.kafka.config import producer_config

    pacer = _Pacer(rate, speedup)
    if producer is None:
        # log_level 3: librdkafka's transient warnings (e.g. "coordinator load in progress" on a fresh
        # broker) would cut through the progress bar; failures still show in the delivery counts.
        producer = Producer(producer_config(settings, log_level=3))
    _check_topics(producer, [settings.topics.topic_events] if settings.topics.topic_events
                  else [settings.topic("clicks"), settings.topic("purchases")])
    stats = ReplayStats()

    def on_delivery(err: KafkaError | None, msg: Any) -> None:
        if err is None:
            stats.delivered += 1
        else:
            stats.failed += 1
            stats.errors[err.name()] += 1

    total = len(df) if limit is None else min(limit, len(df))
    bar = progress_bar(total, "replay", "ev", enabled=progress)
    started = time.monotonic()
    pending_bar = 0
    try:
        for i, (topic, key, value, ts) in enumerate(iter_messages(settings, df, limit)):
            if pacer.active:
                pacer.wait(i, ts)
            while True:
                try:
                    producer.produce(topic, value=value, key=key, on_delivery=on_delivery)
                    break
                except BufferError:  # local queue full: let deliveries drain
                    producer.poll(0.05)
                except KafkaException as exc:
                    stats.failed += 1
                    stats.errors[str(exc.args[0].name())] += 1
                    break
            stats.events += 1
            stats.by_topic[topic] += 1
            if stats.first_ts_ms is None:
                stats.first_ts_ms = ts
            stats.last_ts_ms = ts
            pending_bar += 1
            if pending_bar >= _POLL_EVERY or pacer.active and pending_bar >= 50:
                producer.poll(0)
                bar.update(pending_bar)
                pending_bar = 0
    except KeyboardInterrupt:
        stats.interrupted = True
        print("\nreplay interrupted; flushing what was sent", file=sys.stderr)
        raise
    finally:
        bar.update(pending_bar)
        bar.close()
        remaining = producer.flush(flush_timeout)
        stats.seconds = time.monotonic() - started
        if remaining:
            stats.failed += remaining
            stats.errors["not_delivered_before_timeout"] += remaining
        if stats.interrupted:
            print(stats.summary(), file=sys.stderr)
    return stats


def _check_topics(producer: Any, topics: list[str]) -> None:
    """Fail early and clearly instead of timing out on every message of a missing topic."""
    from confluent_kafka import KafkaException

    from stream.kafka.config import ClusterUnreachable

    try:
        metadata = producer.list_topics(timeout=15)
    except KafkaException as exc:
        raise ClusterUnreachable(f"cannot reach the Kafka cluster: {exc}") from None
    missing = [t for t in topics if t not in metadata.topics or metadata.topics[t].error is not None]
    if missing:
        raise RuntimeError(f"topic(s) {', '.join(missing)} do not exist: create them first "
                           "(stream.kafka.topics.ensure_topics; `gruflow replay` does it for you)")


# --------------------------------------------------------------------------- CLI


def add_replay_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from model.data import FORMATS

    parser.add_argument("data", help="event file (or 'synthetic[:N_SESSIONS]' with --format synthetic)")
    parser.add_argument("--format", "-f", dest="format", required=True, choices=FORMATS, help="data format")
    parser.add_argument("--rate", type=float, default=None, help="cap on events per second")
    parser.add_argument("--speedup", type=float, default=None,
                        help="replay event-time gaps divided by X (e.g. 60: an hour of data in a minute)")
    parser.add_argument("--limit", type=int, default=None, help="replay only the first N events (time order)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return parser


def run_replay(args: argparse.Namespace, settings: Settings | None = None) -> int:
    from model.data import load_events
    from stream.kafka.topics import ensure_topics

    settings = cluster_settings(args, settings, "replay", ", or use `gruflow demo`")
    df = load_events(args.data, args.format)
    ensure_topics(settings)
    print(f"replaying {min(len(df), args.limit or len(df)):,} events from {args.data} to "
          f"{settings.topic('clicks')} / {settings.topic('purchases')} on {settings.connection.bootstrap_servers}",
          file=sys.stderr)
    stats = replay(settings, df, rate=args.rate, speedup=args.speedup, progress=args.progress, limit=args.limit)
    print(stats.summary(), file=sys.stderr)
    return 0 if stats.failed == 0 else 1
