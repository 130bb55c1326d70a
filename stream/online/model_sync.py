"""Model distribution over the compacted ``models`` topic: publish, load at startup, hot swap.

Protocol (version 2). A model version is one checkpoint (``model.checkpoint.checkpoint_to_bytes``:
weights, vocabulary, metadata with version and parent version, its own sha256) sent as ``count``
chunks on partition 0 of the models topic, each under ``MODEL_CHUNK_BYTES`` so any broker's default
message size limit (1 MB) holds them. Every chunk has

    key      b"<version:012d>/<index:06d>"  (distinct per chunk, so compaction keeps every chunk;
             an old version is deleted by tombstoning its keys)
    value    an envelope (``stream.online.model_envelope``): a descriptor with version, parent, chunk
             (index), chunks (count), sha256 (hex digest of the whole checkpoint), size (bytes of
             the whole checkpoint), and on chunk 0 meta (a JSON summary for ``gruflow model list``);
             then the chunk's bytes.
    headers  none; readers never read them (a header name that is not UTF-8 can crash
             confluent-kafka, the topic's reader), so a record is judged by its value alone.

A reader groups chunks by version, and once all ``count`` chunks are there concatenates them,
checks size and sha256, parses the checkpoint and checks that it fits the model being served (same
hidden-state layout, a vocabulary that extends the served one, since rows are append-only) and that
its weights are finite and of a sane size (``model.weight_check``). A version not newer than the one
served is refused too, once the reader has caught up with the topic (older versions kept on the topic
are history, not news). Anything else is refused (``gruflow_model_refusals_total{reason}``, and a
warning in the log) and the current model stays.
Rollback (stream/online/model_rollback.py) republishes an old version's weights as a new, higher version
with ``rollback_of`` set.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from stream.online.model_protocol import (MAX_PENDING_VERSIONS, R_LOWER, R_SAME, Assembled, Assembler,
                                          ModelSyncError, check_compatible, chunk_key, encode_chunks,
                                          message_chunk, to_recommender)

log = logging.getLogger("gruflow.model_sync")


# ----------------------------------------------------------------------------- Kafka side

def topic_name(settings: Any) -> str:
    from stream.kafka.topics import TopicNames

    return TopicNames.from_settings(settings).models


def _producer(settings: Any) -> Any:
    from confluent_kafka import Producer

    from stream.kafka.config import producer_config

    return Producer(producer_config(settings))


def _consumer(settings: Any) -> Any:
    """A group-less reader (assign(), no commits): every reader wants the whole topic."""
    from confluent_kafka import Consumer

    from stream.kafka.config import consumer_config

    return Consumer(consumer_config(settings, None, **{"enable.partition.eof": True}))


def publish_version(settings: Any, ckpt_bytes: bytes, version: int, parent: int, meta: dict | None = None,
                    producer: Any = None, timeout: float = 60.0) -> int:
    """Publish one version (all chunks, flushed); returns the number of chunks."""
    topic = topic_name(settings)
    producer = producer or _producer(settings)
    errors: list[str] = []

    def on_delivery(err: Any, msg: Any) -> None:
        if err is not None:
            errors.append(str(err))

    chunks = encode_chunks(ckpt_bytes, version, parent, meta)
    for key, value in chunks:
        while True:
            try:
                producer.produce(topic, value=value, key=key, partition=0, on_delivery=on_delivery)
                break
            except BufferError:
                producer.poll(0.1)
    left = producer.flush(timeout)
    if left or errors:
        raise RuntimeError(f"publishing model version {version} to {topic} failed: "
                           f"{errors[:3] or f'{left} messages not delivered within {timeout}s'}")
    log.info("published model version %d (parent %d, %d bytes in %d chunks) to %s",
             version, parent, len(ckpt_bytes), len(chunks), topic)
    return len(chunks)


def delete_version(settings: Any, version: int, n_chunks: int, producer: Any = None) -> None:
    """Tombstone every chunk of ``version`` so compaction removes it."""
    topic = topic_name(settings)
    producer = producer or _producer(settings)
    for i in range(n_chunks):
        producer.produce(topic, value=None, key=chunk_key(version, i), partition=0)
    producer.flush(30.0)


@dataclass
class VersionInfo:
    version: int
    parent: int
    chunks: int
    size: int
    complete: bool
    meta: dict | None
    timestamp_ms: int


def _key_version(key: bytes | None) -> int:
    try:
        return int(key.decode().split("/")[0]) if key else -1
    except (ValueError, UnicodeDecodeError):
        return -1


def _watermarks(consumer: Any, tp: Any, timeout: float) -> tuple[int, int]:
    """Log start/end offsets, retrying while a just-created topic has no leader yet."""
    from confluent_kafka import KafkaException

    deadline = time.monotonic() + timeout
    while True:
        try:
            return consumer.get_watermark_offsets(tp, timeout=max(1.0, deadline - time.monotonic()))
        except KafkaException as exc:
            err = exc.args[0]
            retriable = getattr(err, "retriable", lambda: False)() or err.code() in (6, 3, 5)
            if not retriable or time.monotonic() >= deadline:
                raise
            time.sleep(0.2)


def _read_all(settings: Any, timeout: float = 30.0) -> Iterable[Any]:
    """Every message of the models topic from the start to the end offset at call time."""
    from confluent_kafka import OFFSET_BEGINNING, TopicPartition

    topic = topic_name(settings)
    consumer = _consumer(settings)
    try:
        low, high = _watermarks(consumer, TopicPartition(topic, 0), timeout)
        if high <= low:
            return
        consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msgs = consumer.consume(500, 1.0)
            for m in msgs:
                if m.error() is not None:
                    if m.error().code() == -191:  # _PARTITION_EOF
                        return
                    raise RuntimeError(f"reading {topic}: {m.error()}")
                yield m
                if m.offset() >= high - 1:
                    return
        raise TimeoutError(f"reading {topic} did not reach offset {high} within {timeout}s")
    finally:
        consumer.close()


def list_versions(settings: Any, timeout: float = 30.0) -> list[VersionInfo]:
    """Versions present on the models topic (tombstoned ones excluded), oldest first."""
    infos: dict[int, VersionInfo] = {}
    seen: dict[int, set[int]] = {}
    for m in _read_all(settings, timeout):
        if m.value() is None:  # tombstone
            try:
                v = int(m.key().decode().split("/")[0])
            except (ValueError, AttributeError):
                continue
            seen.get(v, set()).discard(int(m.key().decode().split("/")[1]))
            continue
        try:
            c = message_chunk(m)
        except ModelSyncError:
            continue
        info = infos.get(c.version)
        if info is None or info.size != c.size:
            info = infos[c.version] = VersionInfo(c.version, c.parent, c.count, c.size, False, None,
                                                  m.timestamp()[1])
            seen[c.version] = set()
        seen[c.version].add(c.index)
        if c.meta is not None:
            info.meta = c.meta
    out = []
    for v, info in sorted(infos.items()):
        if seen[v]:
            info.complete = len(seen[v]) == info.chunks
            out.append(info)
    return out


def read_version_bytes(settings: Any, version: int, timeout: float = 30.0) -> bytearray | None:
    """The verified checkpoint bytes of ``version`` from the topic, or None when absent/incomplete."""
    asm = Assembler(max_pending=1)
    found: Assembled | None = None
    for m in _read_all(settings, timeout):
        if m.value() is None:
            if _key_version(m.key()) == version:  # tombstoned: deleted
                found = None
                asm.forget(version)
            continue
        try:
            c = message_chunk(m)
            if c.version != version:
                continue
            got = asm.add(c)
        except ModelSyncError:
            continue
        if got is not None:
            found = got
    return found.data if found else None


def load_latest(settings: Any, metrics: Any = None, timeout: float = 30.0) -> Any:
    """The newest complete, valid version on the models topic as a Recommender, or None.

    Called by a worker at startup, before it serves. Invalid versions are skipped (counted as
    refusals when ``metrics`` is given) in favour of the newest valid one."""
    asm = Assembler(max_pending=MAX_PENDING_VERSIONS)
    complete: dict[int, Assembled] = {}
    for m in _read_all(settings, timeout):
        if m.value() is None:
            complete.pop(_key_version(m.key()), None)
            continue
        try:
            got = asm.add(message_chunk(m))
        except ModelSyncError as exc:
            _refuse(metrics, exc)
            continue
        if got is not None:
            complete[got.version] = got
    for version in sorted(complete, reverse=True):
        try:
            return to_recommender(complete[version])
        except ModelSyncError as exc:
            _refuse(metrics, exc)
    return None


def _refuse(metrics: Any, exc: ModelSyncError) -> None:
    log.warning("refused model: %s", exc)
    if metrics is not None:
        metrics.model_refusals.labels(reason=exc.reason).inc()


class ModelSubscriber:
    """Background thread: follows the models topic, assembles and verifies new versions and swaps
    them into ``holder`` (a ModelHolder); the worker picks the new model up at its next micro-batch,
    so consumption never pauses. Corrupt, incompatible, non-finite or absurd versions are refused, and
    so is a version not newer than the served one once the subscriber has caught up with the topic;
    the old model stays.

    ``serving``: the holder is what this process serves (a worker), so a swap sets
    ``gruflow_model_version`` and counts ``gruflow_model_swaps``; the trainer follows the topic
    without serving and keeps those for its own promotions. Refusals are counted either way."""

    _STALE_MEMORY = 1024  # versions refused as stale, remembered so each is counted once (not per chunk)

    def __init__(self, settings: Any, holder: Any, metrics: Any = None,
                 on_version: Callable[[Any], None] | None = None, serving: bool = True) -> None:
        self.settings = settings
        self.holder = holder
        self.metrics = metrics
        self.on_version = on_version
        self.serving = serving
        self._stale: set[int] = set()
        self.highest_seen = 0  # highest version number on the topic, refused ones included
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.swapped: list[int] = []
        self.refused: list[tuple[int, str]] = []
        self.caught_up = threading.Event()
        self.error: BaseException | None = None

    def start(self) -> "ModelSubscriber":
        self._thread = threading.Thread(target=self._run, name="gruflow-model-subscriber", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> "ModelSubscriber":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _current_version(self) -> int:
        cur = self.holder.current
        return int(getattr(cur, "version", 0) or 0) if cur is not None else 0

    def _run(self) -> None:
        from confluent_kafka import OFFSET_BEGINNING, KafkaError, TopicPartition

        topic = topic_name(self.settings)
        try:
            consumer = _consumer(self.settings)
        except Exception as exc:  # noqa: BLE001 - reported, the worker keeps serving its model
            self.error = exc
            log.error("model subscriber cannot start: %s", exc)
            return
        asm = Assembler()
        try:
            consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
            while not self._stop.is_set():
                for m in consumer.consume(100, 0.5):
                    err = m.error()
                    if err is not None:
                        if err.code() == KafkaError._PARTITION_EOF:
                            self.caught_up.set()
                        else:
                            log.warning("models topic: %s", err)
                        continue
                    self._handle(asm, m)
        except Exception as exc:  # noqa: BLE001
            self.error = exc
            log.exception("model subscriber stopped")
        finally:
            consumer.close()

    def _handle(self, asm: Assembler, m: Any) -> None:
        if m.value() is None:
            return
        version = -1
        try:
            c = message_chunk(m)
            version = c.version
            self.highest_seen = max(self.highest_seen, c.version)
            served = self._current_version()
            if c.version <= served:
                asm.forget(c.version)
                self._check_not_stale(c.version, served)
                return
            got = asm.add(c)
            if got is None:
                return
            rec = to_recommender(got)
            check_compatible(self.holder.current, rec)
        except ModelSyncError as exc:
            self.refused.append((version, exc.reason))
            _refuse(self.metrics, exc)
            return
        self.holder.swap(rec)
        self.swapped.append(rec.version)
        if self.metrics is not None and self.serving:
            self.metrics.model_swaps.inc()
            self.metrics.model_version.set(rec.version)
        log.info("swapped in model version %d", rec.version)
        if self.on_version is not None:
            self.on_version(rec)

    def _check_not_stale(self, version: int, served: int) -> None:
        """Raise ModelSyncError(lower_version/same_version) for a chunk of a version that is not newer
        than the served one, once per version. Before the first catch-up the chunks read are the
        topic's history (the versions kept before the served one): skipped without a word."""
        if not self.caught_up.is_set() or version in self._stale:
            return
        if len(self._stale) >= self._STALE_MEMORY:
            self._stale.discard(min(self._stale))
        self._stale.add(version)
        if version < served:
            raise ModelSyncError(R_LOWER, f"model version {version} was published after version {served}, which "
                                          f"is served: a lower number never replaces it (`gruflow model rollback` "
                                          f"republishes an old version under a new, higher number)")
        raise ModelSyncError(R_SAME, f"model version {version} was published again while it is served: the "
                                     f"served one stays (are two trainers publishing?)")
