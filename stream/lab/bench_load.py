"""The bench's load and its reader: stamped events offered at a fixed rate, a thread that counts the
recommendations and keeps each stamped event's latency, the latency window and its percentiles, and a
plain confluent-kafka consumer for the raw rate."""

from __future__ import annotations

import argparse
import threading
import time

import numpy as np

from stream.lab.bench_machine import StealMeter
from stream.settings import Settings
from stream.tools.harness import scrape, total


WARMUP_PREFIX = "warm-"  # users of the unmeasured warm-up load


def raw_consume(settings: Settings, n: int) -> float:
    from confluent_kafka import Consumer

    from stream.kafka.config import consumer_config

    c = Consumer(consumer_config(settings, group_id=f"bench-raw-{time.time_ns()}"))
    c.subscribe([settings.topic("clicks"), settings.topic("purchases")])
    got, t0 = 0, None
    deadline = time.monotonic() + 120
    while got < n and time.monotonic() < deadline:
        msgs = c.consume(10000, 0.5)
        if msgs and t0 is None:
            t0 = time.monotonic()
        got += sum(1 for m in msgs if m.error() is None)
    dt = time.monotonic() - (t0 or time.monotonic())
    c.close()
    return got / dt if dt > 0 else 0.0


class RecReader:
    """Counts recommendations (and keeps receive times of stamped latency events) in a thread."""

    def __init__(self, settings: Settings) -> None:
        from confluent_kafka import OFFSET_BEGINNING, Consumer

        from stream.kafka.config import assign_whole_topic, consumer_config

        self.c = Consumer(consumer_config(settings, group_id=None))
        assign_whole_topic(self.c, settings.topic("recommendations"), OFFSET_BEGINNING)
        self.count = 0
        self.published: list[int] = []
        self.latency_ms: list[float] = []
        self.to_publish_ms: list[float] = []  # send -> the worker's publication stamp (in-worker share)
        self.stamped_prefix = "lat-"
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import orjson

        stamped, warmup = self.stamped_prefix.encode(), WARMUP_PREFIX.encode()
        while not self._stop.is_set():
            # wait for ONE message, then take whatever else is queued without waiting: consume(n, t) returns
            # only once it has n messages or t has passed, so it would add up to t to each latency sample
            first = self.c.poll(0.05)
            if first is None:
                continue
            for m in [first, *self.c.consume(5000, 0)]:
                if m.error() is not None:
                    continue
                now = time.time() * 1000
                self.count += 1
                key, value = m.key() or b"", m.value()
                if key.startswith(stamped):
                    rec = orjson.loads(value)
                    self.latency_ms.append(now - rec["event_ts"])
                    self.to_publish_ms.append(rec["published_ts"] - rec["event_ts"])
                elif not key.startswith(warmup):
                    # the backlog's only field read is the last one: slicing it out costs a tenth of
                    # parsing the whole document (~5 us), CPU the reader would take from the worker
                    try:
                        self.published.append(int(value[value.rindex(b'"published_ts":') + 15:-1]))
                    except ValueError:
                        self.published.append(orjson.loads(value)["published_ts"])

    def wait_count(self, n: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.count < n and time.monotonic() < deadline:
            time.sleep(0.2)
        return self.count >= n

    def close(self) -> None:
        self._stop.set()
        self.thread.join(5)
        self.c.close()


def offer(settings: Settings, rate: float, seconds: float, n_items: int, seed: int = 3,
          prefix: str = "lat-") -> int:
    """Produce stamped events at ``rate``/s; ts = send time, so event_ts -> arrival is end-to-end latency.
    Users are named ``prefix<n>``: the reader measures "lat-" users and only counts "warm-" ones."""
    import orjson
    from confluent_kafka import Producer

    from stream.kafka.config import load_generator, producer_config

    p = Producer(producer_config(settings, **load_generator(settings)))
    rng = np.random.default_rng(seed)
    topic = settings.topic("clicks")
    n_total = int(rate * seconds)
    t0 = time.monotonic()
    for i in range(n_total):
        target = t0 + i / rate
        delay = target - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        user = f"{prefix}{int(rng.integers(0, 5000))}"
        value = orjson.dumps({"user_id": user, "item_id": f"i{int(rng.integers(0, n_items))}",
                              "event_type": "click", "ts": int(time.time() * 1000)})
        p.produce(topic, value, user.encode())
        p.poll(0)
    p.flush(30)
    return n_total


def warm_up(settings: Settings, reader: RecReader, args: argparse.Namespace, seconds: float) -> None:
    """Unmeasured load at the offered rate (its users are counted by the reader, not timed)."""
    before = reader.count
    warm = offer(settings, args.rate, seconds, args.items, seed=5, prefix=WARMUP_PREFIX)
    reader.wait_count(before + warm, 60)


def offer_measured(settings: Settings, reader: RecReader, args: argparse.Namespace,
                   seed: int = 3) -> tuple[tuple[int, int], float | None]:
    """The measured load, offered: where its answers end and start in the reader's counts, and the host's
    steal while it was offered."""
    start_count, start_lat = reader.count, len(reader.latency_ms)
    steal = StealMeter().start()
    offered = offer(settings, args.rate, args.latency_seconds, args.items, seed=seed)
    return (start_count + offered, start_lat), steal.stop()


def measured_latencies(reader: RecReader, window: tuple[int, int]) -> np.ndarray:
    """Each stamped event's latency (ms) of an offered window, once all its events are answered."""
    until_count, start_lat = window
    reader.wait_count(until_count, 60)
    return np.asarray(reader.latency_ms[start_lat:], dtype=np.float64)


def latency_window(settings: Settings, reader: RecReader,
                   args: argparse.Namespace) -> tuple[np.ndarray, float | None]:
    """The measured load: each stamped event's latency (ms), and the host's steal while it was offered."""
    window, stolen = offer_measured(settings, reader, args)
    return measured_latencies(reader, window), stolen


def percentiles(lat: np.ndarray) -> dict[str, float | None]:
    return {q: round(float(np.percentile(lat, p)), 2) if lat.size else None
            for q, p in (("p50", 50), ("p95", 95), ("p99", 99))}


def scrape_total(port: int, name: str) -> float | None:
    """The sum of a Prometheus counter/gauge's samples at a /metrics endpoint (None: not reachable)."""
    try:
        return total(scrape(f"http://127.0.0.1:{port}"), name)
    except OSError:
        return None
