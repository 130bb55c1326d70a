"""What gruflow's product code touches below the public API of faust-streaming, aiokafka, mode and
prometheus_client, one entry per touch; docs/upgrading.md explains each. Every PRIVATE touch lives in
stream/compat.py (test_inventory checks it); HOOKS name the gruflow modules that override or mirror them.

``PRIVATE`` are names with a leading underscore (attributes read or written, methods called or overridden);
``HOOKS`` are public names gruflow overrides or mirrors, whose signature or value its code depends on.
Each entry says how to find the object (``owner``: "module:Class", or a sample key for instance attributes
that only exist once ``__init__`` ran) and, for callables, the parameter names gruflow passes or receives.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from stream.settings import Settings

PARTITIONS = 2
Kind = Literal["method", "coroutine", "attribute", "value"]

# where the objects live
CONSUMER = "faust.transport.drivers.aiokafka:Consumer"
CONSUMER_THREAD = "faust.transport.drivers.aiokafka:AIOKafkaConsumerThread"
FAUST_PRODUCER = "faust.transport.drivers.aiokafka:Producer"
FAUST_TRANSPORT = "faust.transport.drivers.aiokafka:Transport"
TRANSACTION_MANAGER = "faust.transport.consumer:TransactionManager"
ROCKSDB_STORE = "faust.stores.rocksdb:Store"
AIOKAFKA_CONSUMER = "aiokafka:AIOKafkaConsumer"
PARTITION_RECORDS = "aiokafka.consumer.fetcher:PartitionRecords"
RECOVERY = "faust.tables.recovery:Recovery"
TABLE_MANAGER = "faust.tables.manager:TableManager"
HISTOGRAM = "prometheus_client:Histogram"
SERVICE = "mode:Service"


@dataclass(frozen=True)
class Touch:
    owner: str  # "module:Class" (or "module:" for a module attribute)
    name: str
    kind: Kind  # method/coroutine: a function on the class; attribute: on an instance (see samples)
    params: tuple[str, ...] | None  # parameter names after self (callables), None: not checked
    used_in: str  # gruflow file and function

    @property
    def id(self) -> str:
        return f"{self.owner.split(':')[-1] or self.owner.rstrip(':')}.{self.name}"


PRIVATE: tuple[Touch, ...] = (
    # faust's consumer: the batch path replaces the drain loop and keeps faust's offset bookkeeping
    Touch(CONSUMER, "_drain_messages", "coroutine", ("fetcher",), "stream/compat.py ConsumerHooks._drain_messages -> drain (BatchConsumer.drain)"),
    Touch(CONSUMER, "_new_consumer_thread", "method", (), "stream/compat.py ConsumerHooks._new_consumer_thread (consumer_thread_class)"),
    Touch(CONSUMER, "_wait_next_records", "coroutine", ("timeout",), "stream/compat.py ConsumerHooks.wait_next_records"),
    Touch(CONSUMER, "_to_message", "method", ("tp", "record"), "stream/compat.py ConsumerHooks.to_message"),
    Touch(CONSUMER, "_add_gap", "coroutine", ("tp", "offset_from", "offset_to"),
          "stream/compat.py ConsumerHooks.add_gap"),
    Touch(CONSUMER, "_read_offset", "attribute", None,
          "stream/compat.py ConsumerHooks.read_offsets"),
    Touch(CONSUMER, "_committed_offset", "attribute", None, "stream/compat.py ConsumerHooks.committed_offsets, ack_offsets"),
    Touch(CONSUMER, "_acked_index", "attribute", None, "stream/compat.py ConsumerHooks.ack_offsets"),
    Touch(CONSUMER, "_acked", "attribute", None, "stream/compat.py ConsumerHooks.ack_offsets"),
    Touch(CONSUMER, "_n_acked", "attribute", None, "stream/compat.py ConsumerHooks.ack_offsets, commit_if_due"),
    Touch(CONSUMER, "_commit_every", "attribute", None, "stream/compat.py ConsumerHooks.commit_if_due"),
    Touch(CONSUMER, "_thread", "attribute", None,
          "stream/compat.py ConsumerHooks.consumer_thread"),
    Touch(CONSUMER, "_stopped", "attribute", None, "stream/compat.py ConsumerHooks.stop_checks"),
    Touch(CONSUMER_THREAD, "_create_worker_consumer", "method", ("transport",),
          "stream/compat.py ConsumerThreadHooks._create_worker_consumer -> before_consumer_created, consumer_created"),
    # faust's consumer thread: every fetch of the Fetcher service ends in _fetch_records on the thread's loop
    # (tagged with the seek count there); _highwaters is what faust's highwaters runs on the thread
    Touch(CONSUMER_THREAD, "_fetch_records", "coroutine", ("consumer", "active_partitions", "timeout", "max_records"),
          "stream/compat.py ConsumerThreadHooks._fetch_records -> tag_fetched"),
    Touch(CONSUMER_THREAD, "_highwaters", "coroutine", ("partitions",),
          "stream/compat.py ConsumerThreadHooks._highwaters -> log_end_offsets"),
    Touch(CONSUMER_THREAD, "_ensure_consumer", "method", (),
          "stream/compat.py ConsumerThreadHooks.kafka_consumer"),
    # aiokafka's consumer: read when start() builds the fetcher
    Touch(AIOKAFKA_CONSUMER, "_fetch_max_wait_ms", "attribute", None,
          "stream/compat.py set_fetch_bounds"),
    Touch(AIOKAFKA_CONSUMER, "_fetch_min_bytes", "attribute", None,
          "stream/compat.py set_fetch_bounds"),
    # aiokafka's fetcher turns each parsed record into a ConsumerRecord here; the guard's marker header must
    # survive it (test_record_guard pins that it copies the headers element by element)
    Touch(PARTITION_RECORDS, "_consumer_record", "method", ("tp", "record"),
          "stream/compat.py use_record_set_class (record_guard.GuardedRecords relies on it)"),
    # faust's transactional producers (exactly_once)
    Touch(FAUST_PRODUCER, "_transaction_producers", "attribute", None,
          "stream/compat.py transaction_producers"),
    Touch(FAUST_PRODUCER, "_trn_locks", "attribute", None, "stream/compat.py transaction_lock"),
    # faust's RocksDB store: bulk reads and writes per partition
    Touch(ROCKSDB_STORE, "_db_for_partition", "method", ("partition",), "stream/compat.py rocksdb_partition"),
    Touch(ROCKSDB_STORE, "_key_index", "attribute", None, "stream/compat.py rocksdb_key_index"),
    Touch(ROCKSDB_STORE, "_dbs", "attribute", None, "stream/compat.py rocksdb_open_partitions"),
    # faust's table recovery: the changelog guard checks the persisted offsets against the changelog's end
    # before faust's own check raises ConsistencyError, and is installed in place of faust's Recovery
    Touch(RECOVERY, "_build_offsets", "coroutine", ("consumer", "tps", "destination", "title"),
          "stream/compat.py RecoveryHooks._build_offsets -> check_offsets (ChangelogGuardRecovery)"),
    Touch(TABLE_MANAGER, "_recovery", "value", None, "stream/compat.py install_recovery"),
    # prometheus_client's histogram: many observations in one pass
    Touch(HISTOGRAM, "_upper_bounds", "attribute", None, "stream/compat.py observe_many"),
    Touch(HISTOGRAM, "_buckets", "attribute", None, "stream/compat.py observe_many"),
    Touch(HISTOGRAM, "_sum", "attribute", None, "stream/compat.py observe_many"),
    # mode's Service (faust's Fetcher is one)
    Touch(SERVICE, "_stopped", "attribute", None, "stream/compat.py ConsumerHooks.stop_checks"),
)

HOOKS: tuple[Touch, ...] = (
    Touch(CONSUMER, "seek_to_committed", "coroutine", (), "stream/worker/batch_consumer.py BatchConsumer (override)"),
    Touch(CONSUMER, "perform_seek", "coroutine", (), "stream/worker/batch_consumer.py BatchConsumer (override)"),
    Touch(CONSUMER, "force_commit", "coroutine", ("topics", "start_new_transaction"),
          "stream/worker/batch_consumer.py BatchConsumer (override)"),
    Touch(CONSUMER, "on_partitions_revoked", "coroutine", ("revoked",),
          "stream/worker/batch_consumer.py BatchConsumer (override)"),
    Touch(CONSUMER, "in_transaction", "attribute", None, "stream/worker/batch_consumer.py (set from app.in_worker)"),
    Touch(CONSUMER, "consumer_stopped_errors", "value", None, "stream/worker/batch_consumer.py _drain_messages"),
    Touch(CONSUMER_THREAD, "call_thread", "coroutine", ("fun", "args", "kwargs"),
          "stream/worker/batch_consumer.py BatchConsumerThread.seek_inputs_to_committed, resume_inputs"),
    # aiokafka's consumer, called on the consumer thread's loop: the takeover invariant rests on their semantics
    Touch(AIOKAFKA_CONSUMER, "seek_to_committed", "coroutine", ("partitions",),
          "stream/worker/batch_consumer.py BatchConsumerThread._seek_inputs"),
    Touch(AIOKAFKA_CONSUMER, "seek_to_beginning", "coroutine", ("partitions",),
          "stream/worker/batch_consumer.py BatchConsumerThread._seek_inputs"),
    Touch(AIOKAFKA_CONSUMER, "pause", "method", ("partitions",), "stream/worker/batch_consumer.py BatchConsumerThread._seek_inputs"),
    Touch(AIOKAFKA_CONSUMER, "resume", "method", ("partitions",),
          "stream/worker/batch_consumer.py BatchConsumerThread._resume_inputs"),
    Touch(AIOKAFKA_CONSUMER, "end_offsets", "coroutine", ("partitions",),
          "stream/worker/batch_consumer.py BatchConsumerThread._highwaters"),
    # faust's transactional producers, started afresh at every rebalance (exactly_once)
    Touch(TRANSACTION_MANAGER, "on_rebalance", "coroutine", ("assigned", "revoked", "newly_assigned"),
          "stream/worker/transactions.py FreshTransactionManager (override)"),
    Touch(FAUST_PRODUCER, "stop_transaction", "coroutine", ("transactional_id",),
          "stream/worker/transactions.py FreshTransactionManager.on_rebalance"),
    Touch(TRANSACTION_MANAGER, "commit", "coroutine", ("offsets", "start_new_transaction"),
          "stream/worker/transactions.py FreshTransactionManager.commit (override)"),
    Touch(FAUST_PRODUCER, "commit_transactions", "coroutine", ("tid_to_offset_map", "group_id", "start_new_transaction"),
          "stream/worker/transactions.py FreshTransactionManager.commit"),
    Touch(FAUST_TRANSPORT, "Consumer", "value", None, "stream/worker/batch_consumer.py BatchTransport"),
    Touch(FAUST_TRANSPORT, "TransactionManager", "value", None, "stream/worker/batch_consumer.py BatchTransport"),
    Touch("faust.types.tuples:", "ack_lock", "value", None, "stream/worker/batch_consumer.py ack_offsets"),
    Touch(TRANSACTION_MANAGER, "transactional_id_format", "value", None,
          "stream/worker/sinks.py TransactionalSink._transactional_id"),
    Touch("faust:App", "in_worker", "value", None, "stream/worker/app.py build_app"),
    Touch("faust:Worker", "on_execute", "coroutine", (), "stream/worker/main.py GruflowWorker (override)"),
    Touch("faust:Worker", "on_worker_shutdown", "method", (), "stream/worker/main.py GruflowWorker (override)"),
    Touch("faust:Worker", "on_stop", "coroutine", (), "stream/worker/main.py GruflowWorker (override)"),
    Touch("faust:Worker", "on_shutdown", "coroutine", (), "stream/worker/main.py GruflowWorker (override)"),
    Touch("aiokafka.partitioner:", "murmur2", "method", ("data",), "stream/worker/table_store.py TableStore.partition_for"),
    Touch("aiokafka:AIOKafkaProducer", "create_batch", "method", (), "stream/worker/sinks.py BatchSink._enqueue"),
    Touch("aiokafka:AIOKafkaProducer", "send_batch", "coroutine", ("batch", "topic", "partition"),
          "stream/worker/sinks.py BatchSink._enqueue"),
    Touch("aiokafka.producer.message_accumulator:BatchBuilder", "append", "method",
          ("timestamp", "key", "value", "headers"), "stream/worker/sinks.py BatchSink._enqueue"),
    Touch("aiokafka.producer.message_accumulator:BatchBuilder", "close", "method", (),
          "stream/worker/sinks.py BatchSink._enqueue"),
)


def resolve(owner: str) -> Any:
    """The class (or module, for "module:") an owner string names."""
    module, _, attr = owner.partition(":")
    obj = importlib.import_module(module)
    return getattr(obj, attr) if attr else obj


def param_names(fn: Any) -> tuple[str, ...]:
    """Parameter names after ``self`` (positional, keyword and *args names alike)."""
    names = tuple(inspect.signature(fn).parameters)
    return names[1:] if names[:1] == ("self",) else names


def missing_params(fn: Any, wanted: tuple[str, ...]) -> list[str]:
    """Names gruflow passes or receives that the signature lacks (extra optional parameters are fine)."""
    have = param_names(fn)
    return [n for n in wanted if n not in have]


def is_coroutine(fn: Any) -> bool:
    return inspect.iscoroutinefunction(inspect.unwrap(fn))


def worker_settings(data_dir: Path, guarantee: str) -> Settings:
    # nothing listens on port 9: building the app must not need a broker
    return Settings.of(bootstrap_servers="127.0.0.1:9", data_dir=data_dir, app_id=f"contract-{guarantee}",
                    partitions=PARTITIONS, processing_guarantee=guarantee)  # type: ignore[arg-type]


def run(runtime: Any, coro: Any) -> Any:
    """Run a coroutine on the app's loop (the one faust's services and aiokafka's clients bind to)."""
    return runtime.app.loop.run_until_complete(asyncio.wait_for(coro, 30.0))
