"""The faust app of the worker: input topics, the RocksDB-backed "user-state" table, and its wiring to
the batch path (stream/worker/pipeline.py).

faust provides group membership, co-partitioned assignment of the input topics with the table's
changelog, table recovery/standbys, offset commits and (exactly_once) transactions. The per-event
stream machinery is replaced by ``BatchConsumer`` (see there), which hands ``Pipeline.handle`` one
micro-batch at a time.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from stream.worker.batch_consumer import BatchConsumer, BatchTransport
from stream.worker.pipeline import Pipeline
from stream.observe.metrics import Metrics
from stream.worker.model_holder import ModelHolder
from stream.settings import Settings
from stream.worker.sinks import BatchSink, TransactionalSink
from stream.worker.table_store import StateTable, TableStore, install_changelog_guard
from stream.kafka.topics import DLQ_MESSAGE_MAX_BYTES, STATE_TABLE_NAME, TopicNames

log = logging.getLogger("gruflow.worker")


def table_dir(settings: Settings) -> Any:
    """Where this worker's RocksDB files live (delete it to force a rebuild from the changelog)."""
    return settings.process.data_dir / settings.process.app_id


@dataclass
class Runtime:
    """What the web endpoints and the worker process need to see of a running app."""

    app: Any
    pipeline: "Pipeline"
    holder: ModelHolder
    metrics: Metrics

    def ready(self) -> tuple[bool, str]:
        if self.holder.current is None:
            return False, "no model loaded"
        recovery = getattr(self.app.tables, "recovery", None)
        if recovery is None or not recovery.completed.is_set():
            return False, "table recovery not finished"
        if recovery.in_recovery:
            return False, "table recovery in progress (rebalance)"
        return True, "ready"


def rocksdb_options(settings: Settings) -> dict[str, int]:
    """faust's RocksDB options for the state table. faust opens one RocksDB per partition, each with
    its own memtables and block cache, so these bound the memory of each partition the worker holds:
    write_buffer_size * max_write_buffer_number + block_cache_size (faust's defaults allow 192 MB of
    memtables and a 2 GB cache per partition)."""
    return {"write_buffer_size": settings.store.rocksdb_write_buffer_bytes,
            "max_write_buffer_number": settings.store.rocksdb_max_write_buffers,
            "block_cache_size": settings.store.rocksdb_block_cache_bytes}


def rocksdb_budget_bytes(settings: Settings) -> int:
    """The RocksDB memory budget of one state partition (see ``rocksdb_options``)."""
    s = settings.store
    return s.rocksdb_write_buffer_bytes * s.rocksdb_max_write_buffers + s.rocksdb_block_cache_bytes


def _changelog_end_offsets(settings: Settings) -> Any:
    """The changelog guard's source of end offsets: the broker's, asked off the event loop."""
    from stream.kafka.config import end_offsets

    async def ask(tps: Any) -> dict[Any, int | None]:
        tps = list(tps)
        ends = await asyncio.to_thread(end_offsets, settings, [(tp.topic, tp.partition) for tp in tps])
        return {tp: ends.get((tp.topic, tp.partition)) for tp in tps}

    return ask


def build_app(settings: Settings, holder: ModelHolder, metrics: Metrics, dead_letter_bytes: int) -> Runtime:
    """The faust app with its table and batch path wired; start it with a faust Worker."""
    names = TopicNames.from_settings(settings)
    datadir = table_dir(settings)
    datadir.mkdir(parents=True, exist_ok=True)
    exactly_once = settings.worker.processing_guarantee == "exactly_once"
    app = _faust_app(settings, str(datadir))
    for name in (*names.inputs, names.control):
        app.topics.add(app.topic(name, key_type=bytes, value_type=bytes, partitions=settings.topics.partitions,
                                 key_serializer="raw", value_serializer="raw"))
    table = _state_table(app, settings, names)
    store = TableStore(table, settings.topics.partitions)
    table.keep_records = store.replay_filter
    store.on_superseded = metrics.changelog_superseded.inc
    install_changelog_guard(app, store, _changelog_end_offsets(settings))
    if exactly_once:
        sink: Any = TransactionalSink(app, names.clicks, names.recommendations, names.changelog, names.dlq)
    else:
        sink = BatchSink(settings, names.recommendations, names.changelog, names.dlq)
    pipeline = Pipeline(app, settings, names, store, holder, metrics, sink, exactly_once, dead_letter_bytes)

    consumer = app.consumer
    assert isinstance(consumer, BatchConsumer)
    consumer.batch_handler = pipeline.handle

    def on_fenced() -> None:
        metrics.transactions_fenced.inc()
        store.mark_uncommitted()  # the aborted transactions' writes are in the local store

    consumer.transactions.on_fenced = on_fenced
    consumer.transactions.fence_grace_s = 2 * settings.worker.broker_session_timeout_s
    consumer.batch_topics = frozenset((*names.inputs, names.control))
    consumer.batch_max_events = settings.worker.batch_max_events
    consumer.batch_max_s = settings.worker.batch_max_ms / 1000.0
    _add_timers(app, table, pipeline, settings)
    return Runtime(app, pipeline, holder, metrics)


def _faust_app(settings: Settings, datadir: str) -> Any:
    """The faust app with the batching transport; its topics and table are added by ``build_app``."""
    import faust

    from stream.kafka.config import faust_broker_kwargs

    session_ms = int(settings.worker.broker_session_timeout_s * 1000)
    app = faust.App(
        settings.process.app_id,
        **faust_broker_kwargs(settings),
        store="rocksdb://",
        Table=StateTable,  # the changelog is replayed newest-state-wins (stream/worker/table_store.py)
        datadir=datadir,
        web_enabled=False,  # stream/observe/web.py serves /metrics, /livez, /readyz and requests from process start
        canonical_url=settings.web_url(),  # the address faust's assignment gives the other workers (routing)
        processing_guarantee=settings.worker.processing_guarantee,
        topic_partitions=settings.topics.partitions,
        topic_replication_factor=settings.topics.replication_factor,
        topic_allow_declare=False,  # stream.kafka.topics.ensure_topics creates every topic explicitly
        topic_disable_leader=True,
        broker_session_timeout=settings.worker.broker_session_timeout_s,
        broker_heartbeat_interval=max(0.5, settings.worker.broker_session_timeout_s / 5),
        broker_rebalance_timeout=max(10.0, 3 * settings.worker.broker_session_timeout_s),
        broker_request_timeout=max(30.0, session_ms / 1000 + 5),
        broker_max_poll_records=settings.worker.batch_max_events,
        consumer_auto_offset_reset="earliest",
        stream_wait_empty=False,
        producer_linger=0.002,
        # exactly_once sends dead letters one by one through faust's producers, which refuse a record
        # bigger than this before it reaches the broker
        producer_max_request_size=DLQ_MESSAGE_MAX_BYTES + 64 * 1024,
    )
    app.transport = BatchTransport(app.conf.broker_consumer, app)
    # faust caches app.in_transaction (exactly_once) on first use, and only counts it inside a worker:
    # say so now, before anything reads the consumer (``build_app`` does)
    app.in_worker = True
    return app


def _state_table(app: Any, settings: Settings, names: TopicNames) -> Any:
    """The "user-state" table: RocksDB per partition, with its compacted changelog."""
    # acks=False as faust gives its own changelog topics: nothing consumes the changelog as a stream (recovery
    # reads it), and an acking topic is checked by faust's livelock detector, which took every active
    # changelog partition for a stalled stream (an ERROR per partition every few seconds)
    changelog = app.topic(names.changelog, key_type=bytes, value_type=bytes, partitions=settings.topics.partitions,
                          key_serializer="raw", value_serializer="raw", compacting=True, deleting=False, acks=False)
    return app.Table(STATE_TABLE_NAME, key_type=bytes, value_type=bytes, partitions=settings.topics.partitions,
                     default=None, changelog_topic=changelog, options=rocksdb_options(settings))


def _add_timers(app: Any, table: Any, pipeline: Pipeline, settings: Settings) -> None:
    """The upkeep around the batch path: user count after recovery, gauges, freeze ticks, the TTL scan."""
    @table.on_recover
    async def _count_users() -> None:
        pipeline.upkeep.count_users()

    @app.timer(2.0)
    async def _gauges() -> None:
        pipeline.upkeep.update_gauges()

    @app.timer(pipeline.freeze.tick_interval_s)
    async def _freeze_tick() -> None:
        pipeline.freeze.tick()

    if settings.worker.state_ttl_s > 0:
        @app.timer(max(1.0, min(60.0, settings.worker.state_ttl_s / 10)))
        async def _ttl_scan() -> None:
            await pipeline.scan_for_evictions()
