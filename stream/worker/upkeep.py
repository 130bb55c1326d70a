"""The worker's bookkeeping around the batch path: metrics of each batch, where a batch's time goes and
the periodic gauges (users, RocksDB, committed lag). ``Pipeline`` (stream/worker/pipeline.py) holds one
``Upkeep`` and reports each batch to it; what it observes it is handed at construction, so the batch path
reads on its own."""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any

import numpy as np

from model.events import EVENT_TYPE_NAMES, EventType
from stream.compat import observe_many
from stream.observe.metrics import Metrics, PrequentialVersions
from stream.pipeline.events import CLICKS, PURCHASES, Event
from stream.pipeline.rules import RULES

log = logging.getLogger("gruflow.worker")
PHASE_LOG_S = 30.0  # seconds between the batch-phase log lines


def new_phases() -> list:
    """Batch-phase accumulator: [batches, events, 4 phase sums (s), 4 phase maxima (s)]."""
    return [0, 0] + [0.0] * 8


def committed_lag(ends: dict[Any, int | None], committed: dict[Any, int | None]) -> int:
    """Records after the group's committed offset, summed over partitions: what KEDA and the lag alert
    act on, and what a restart would process again. A partition whose end is not known yet counts 0;
    one without a committed offset counts from offset 0."""
    return sum(max(0, end - (committed.get(tp) or 0)) for tp, end in ends.items() if end is not None)


def active_partitions(app: Any, changelog: str) -> list[int]:
    """The state partitions this worker holds as active now (none while it is not assigned yet)."""
    try:
        actives = app.assignor.assigned_actives()
    except Exception:  # noqa: BLE001 - not assigned yet
        return []
    return sorted(tp.partition for tp in actives if tp.topic == changelog)


class Upkeep:
    """What the worker observes rather than processes: per-batch metrics, batch phases, periodic gauges.
    ``app``: the faust app (assignment, consumer positions); ``store``: the state table adapter;
    ``kinds``: the input topics (topic -> kind); ``changelog``: the state table's changelog topic."""

    def __init__(self, app: Any, store: Any, metrics: Metrics, kinds: dict[str, str], changelog: str,
                 top_k: int) -> None:
        self.app, self.store, self.metrics, self.kinds, self.changelog = app, store, metrics, kinds, changelog
        self.batches = 0
        self.events = 0
        self._phases = new_phases()
        self._phases_logged = time.monotonic()
        self._events_in = {(k, t): metrics.events_in.labels(topic=k, event_type=n)
                           for k in (CLICKS, PURCHASES) for t, n in EVENT_TYPE_NAMES.items()}
        self._prequential = PrequentialVersions(metrics, top_k)
        self._rule_masked = {rule: metrics.rule_masked.labels(rule=rule) for rule in RULES}

    def phase(self, n: int, *seconds: float) -> None:
        """Where a batch's time goes (oldest event's age when the batch starts, decode+read, compute,
        produce), mean and max per batch, logged every 30 s."""
        acc = self._phases
        acc[0] += 1
        acc[1] += n
        for i, s in enumerate(seconds):
            acc[2 + i] += s
            acc[6 + i] = max(acc[6 + i], s)
        now = time.monotonic()
        if now - self._phases_logged >= PHASE_LOG_S and acc[0]:
            b = acc[0]
            log.info("%d batches, %.0f events/batch; ms per batch (mean/max): oldest event's age %.1f/%.0f, "
                     "decode+read %.1f/%.0f, compute %.1f/%.0f, produce %.1f/%.0f", b, acc[1] / b,
                     *(x for i in range(4) for x in (1000 * acc[2 + i] / b, 1000 * acc[6 + i])))
            self._phases = new_phases()
            self._phases_logged = now

    def observe(self, events: list[Event], result: Any, dead: Counter[str], evicted: int, published_s: float) -> None:
        """One finished batch's counters: dead letters, evictions, events in, answers out, latencies."""
        m = self.metrics
        for reason, n in dead.items():
            m.dlq.labels(reason=reason).inc(n)
        if evicted:
            m.state_evictions.inc(evicted)
        self.batches += 1
        if not events:
            return
        counts = Counter(e.event_type for e in events)
        for etype, n in counts.items():  # labelled by the topic the type has when split (one events topic too)
            self._events_in[(PURCHASES if etype == EventType.PURCHASE else CLICKS, etype)].inc(n)
        m.recommendations_out.inc(len(events))
        for rule, n in result.rule_counts.items():
            self._rule_masked[rule].inc(n)
        m.batch_size.observe(len(events))
        m.step_latency.observe(result.step_seconds)
        if result.unknown_items:
            m.unknown_items.inc(result.unknown_items)
        if result.state_resets:
            # a model with finite, bounded weights keeps a GRU state finite, so these come from elsewhere:
            # states written under an unchecked model, or a corrupt record
            log.warning("dropped non-finite hidden states (new sessions started): %s", result.state_resets)
            for reason, n in result.state_resets.items():
                m.state_resets.labels(reason=reason).inc(n)
        for (model, version), pq in result.prequential.items():
            if pq.events:
                self._prequential.add(model, version, pq.events, pq.hits, pq.reciprocal_rank)
        observe_many(m.end_to_end_latency,
                     published_s - np.fromiter((e.append_ts_ms for e in events), dtype=np.float64,
                                               count=len(events)) / 1000.0)
        self.events += len(events)

    def active_partitions(self) -> list[int]:
        return active_partitions(self.app, self.changelog)

    def count_users(self) -> None:
        """After a recovery (faust's changelog replay bypasses the store's counts): count the active partitions."""
        self.store.count_partitions(self.active_partitions())
        self.metrics.state_entries.set(self.store.users(self.active_partitions()))

    def update_gauges(self) -> None:
        m = self.metrics
        m.state_entries.set(self.store.users(self.active_partitions()))
        try:
            m.rocksdb_bytes.set(self.store.disk_bytes())
        except OSError:
            pass
        m.rocksdb_memory.set(self.store.memory_bytes())
        consumer = self.app.consumer
        try:
            ends = {tp: consumer.highwater(tp) for tp in consumer.assignment() if tp.topic in self.kinds}
            lag = committed_lag(ends, {tp: consumer.committed_offsets.get(tp) for tp in ends})
        except Exception:  # noqa: BLE001 - a gauge: skip this round while the consumer is rebalancing
            return
        m.consumer_lag.set(lag)
