"""Model distribution over the compacted ``models`` topic: publish, load at startup, hot swap.

Protocol (version 2). A model version is one checkpoint (``model.checkpoint.checkpoint_to_bytes``:
weights, vocabulary, metadata with version and parent version, its own sha256) sent as ``count``
chunks on partition 0 of the models topic, each under ``CHUNK_BYTES`` so any broker's default
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
Rollback republishes an old version's weights as a new, higher version with ``rollback_of`` set.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from stream.online.model_envelope import R_ENVELOPE, R_PROTOCOL, EnvelopeError, pack, unpack

CHUNK_BYTES = 512 * 1024
MAX_PENDING_VERSIONS = 4  # incomplete versions kept while assembling (older ones are dropped)

# the envelope descriptor's fields
F_VERSION = "version"
F_PARENT = "parent"
F_CHUNK = "chunk"
F_CHUNKS = "chunks"
F_SHA = "sha256"
F_SIZE = "size"
F_META = "meta"

# refusal reasons (label values of gruflow_model_refusals_total); R_ENVELOPE (not a model envelope, or
# one whose descriptor is unusable) and R_PROTOCOL (an envelope of another protocol) come with the envelope
R_CHECKSUM = "checksum"
R_CORRUPT = "corrupt"
R_STATE = "incompatible_state"
R_VOCAB = "incompatible_vocab"
# model.weight_check's reasons, spelled out so that reading the topic (`gruflow model list`) needs no torch
R_NON_FINITE = "non_finite"  # NaN or infinite weights (or popularity counts)
R_ABSURD = "absurd_weights"  # a weight beyond model.weight_check.MAX_ABS_WEIGHT
R_LOWER = "lower_version"  # published after a higher version was served
R_SAME = "same_version"  # the served version's number, published again
REFUSAL_REASONS = (R_ENVELOPE, R_CHECKSUM, R_CORRUPT, R_STATE, R_VOCAB, R_PROTOCOL, R_NON_FINITE, R_ABSURD, R_LOWER,
                   R_SAME)

log = logging.getLogger("gruflow.model_sync")


class ModelSyncError(ValueError):
    """A models-topic message or version is unusable; ``reason`` is a refusal reason label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# ----------------------------------------------------------------------------- codec (pure)

@dataclass(frozen=True)
class Chunk:
    version: int
    parent: int
    index: int
    count: int
    sha256: str
    size: int
    payload: bytes
    meta: dict | None = None


def chunk_key(version: int, index: int) -> bytes:
    return f"{version:012d}/{index:06d}".encode()


def encode_chunks(ckpt: bytes, version: int, parent: int, meta: dict | None = None,
                  chunk_bytes: int = CHUNK_BYTES) -> list[tuple[bytes, bytes]]:
    """(key, value) for every chunk of one version."""
    if version < 1:
        raise ValueError(f"model versions start at 1, got {version}")
    if chunk_bytes < 1:
        raise ValueError("chunk_bytes must be >= 1")
    digest = hashlib.sha256(ckpt).hexdigest()
    count = max(1, -(-len(ckpt) // chunk_bytes))
    out = []
    for i in range(count):
        descriptor = {F_VERSION: version, F_PARENT: parent, F_CHUNK: i, F_CHUNKS: count, F_SHA: digest,
                      F_SIZE: len(ckpt)}
        if i == 0 and meta is not None:
            descriptor[F_META] = meta
        out.append((chunk_key(version, i), pack(descriptor, ckpt[i * chunk_bytes:(i + 1) * chunk_bytes])))
    return out


def message_chunk(m: Any) -> Chunk:
    """``decode_chunk`` of a consumed confluent-kafka message. Only its key and value are read: never
    ``Message.headers()``, which a header name that is not UTF-8 makes raise or crash the process
    (docs/model-safety.md)."""
    return decode_chunk(m.key(), m.value())


def _int_field(descriptor: dict, name: str) -> int:
    v = descriptor[name]
    if type(v) is not int:  # bool is an int subclass, and neither a float nor a string is a count
        raise TypeError(f"{name} is {v!r}, not an integer")
    return v


def decode_chunk(key: bytes | None, value: bytes | None) -> Chunk:
    """Parse one record; raises ModelSyncError(bad_envelope/unknown_protocol) when it is not a chunk."""
    try:
        d, payload = unpack(value)
    except EnvelopeError as exc:
        raise ModelSyncError(exc.reason, f"models message {key!r}: {exc}") from None
    try:
        version, parent = _int_field(d, F_VERSION), _int_field(d, F_PARENT)
        index, count, size = _int_field(d, F_CHUNK), _int_field(d, F_CHUNKS), _int_field(d, F_SIZE)
        sha, meta = d[F_SHA], d.get(F_META)
        if not isinstance(sha, str) or (meta is not None and not isinstance(meta, dict)):
            raise TypeError(f"{F_SHA} must be text and {F_META} an object")
    except (KeyError, TypeError) as exc:
        raise ModelSyncError(R_ENVELOPE, f"models message {key!r}: bad descriptor ({exc!r})") from None
    if not (0 <= index < count) or version < 1 or size < 0 or len(sha) != 64:
        raise ModelSyncError(R_ENVELOPE, f"models message {key!r}: chunk {index}/{count} of version {version} "
                                         f"is out of range")
    return Chunk(version, parent, index, count, sha, size, payload, meta)


@dataclass
class _Pending:
    count: int
    sha256: str
    size: int
    parent: int
    parts: dict[int, bytes] = field(default_factory=dict)
    meta: dict | None = None


@dataclass(frozen=True)
class Assembled:
    version: int
    parent: int
    data: bytes
    meta: dict | None


class Assembler:
    """Collects chunks into complete versions. ``add`` returns an ``Assembled`` when a version's
    last chunk arrives and its size and sha256 check out, raises ModelSyncError(checksum) when
    they do not, else None. Memory stays bounded: at most MAX_PENDING_VERSIONS incomplete versions."""

    def __init__(self, max_pending: int = MAX_PENDING_VERSIONS) -> None:
        self.max_pending = max_pending
        self._pending: dict[int, _Pending] = {}

    def add(self, c: Chunk) -> Assembled | None:
        p = self._pending.get(c.version)
        if p is not None and (p.count, p.sha256, p.size) != (c.count, c.sha256, c.size):
            # a rewrite of the same version number: start over with the newer chunks
            p = None
        if p is None:
            p = _Pending(c.count, c.sha256, c.size, c.parent)
            self._pending[c.version] = p
            while len(self._pending) > self.max_pending:
                del self._pending[min(self._pending)]
        p.parts[c.index] = c.payload
        if c.meta is not None:
            p.meta = c.meta
        if len(p.parts) < p.count:
            return None
        del self._pending[c.version]
        data = b"".join(p.parts[i] for i in range(p.count))
        if len(data) != p.size or hashlib.sha256(data).hexdigest() != p.sha256:
            raise ModelSyncError(R_CHECKSUM, f"model version {c.version}: {len(data)} bytes with sha256 "
                                             f"{hashlib.sha256(data).hexdigest()[:12]}..., header says {p.size} "
                                             f"bytes / {p.sha256[:12]}...")
        return Assembled(c.version, p.parent, data, p.meta)

    def forget(self, version: int) -> None:
        self._pending.pop(version, None)

    @property
    def pending_versions(self) -> list[int]:
        return sorted(self._pending)


def to_recommender(asm: Assembled) -> Any:
    """Parse an assembled version into a Recommender; ModelSyncError(corrupt) when it does not parse,
    ModelSyncError(non_finite/absurd_weights) when its weights are unfit to serve or train from."""
    from model.checkpoint import CheckpointError, checkpoint_from_bytes
    from model.weight_check import weight_problem

    try:
        ckpt = checkpoint_from_bytes(asm.data)
    except CheckpointError as exc:
        raise ModelSyncError(R_CORRUPT, f"model version {asm.version}: {exc}") from None
    problem = weight_problem(ckpt.net, ckpt.popularity)
    if problem is not None:
        raise ModelSyncError(problem.reason, f"model version {asm.version}: {problem}")
    return ckpt.recommender(asm.version)


def check_compatible(current: Any, new: Any) -> None:
    """Refuse a version the worker cannot swap in without breaking stored state: the hidden-state
    layout must be the same, and the vocabulary must extend the served one (rows are append-only)."""
    if current is None:
        return
    if list(current.net.layers) != list(new.net.layers) or current.state_size != new.state_size:
        raise ModelSyncError(R_STATE, f"model version {new.version}: layers {list(new.net.layers)} differ from "
                                      f"the served {list(current.net.layers)}; stored hidden states would not fit")
    old_ids, new_ids = current.vocab.ids, new.vocab.ids
    if len(new_ids) < len(old_ids) or new_ids[: len(old_ids)] != old_ids:
        raise ModelSyncError(R_VOCAB, f"model version {new.version}: its vocabulary ({len(new_ids)} items) does "
                                      f"not extend the served one ({len(old_ids)} items); rows would change meaning")


# ----------------------------------------------------------------------------- Kafka side

def _topic(settings: Any) -> str:
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
    topic = _topic(settings)
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
    topic = _topic(settings)
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

    topic = _topic(settings)
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


def read_version_bytes(settings: Any, version: int, timeout: float = 30.0) -> bytes | None:
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

        topic = _topic(self.settings)
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


def header_meta(meta: dict) -> dict:
    """The small summary carried in chunk 0's descriptor (for ``gruflow model list``)."""
    keep = ("version", "parent_version", "created_at", "stream_time", "n_items", "new_items", "rollback_of",
            "finetune_round", "train_events", "loss", "source")
    out = {k: meta[k] for k in keep if k in meta}
    if "guardrail" in meta:
        g = meta["guardrail"]
        out["guardrail"] = {"current": g.get("current"), "candidate": g.get("candidate")}
    if "retired_rows" in meta:
        out["retired"] = len(meta["retired_rows"])
    return out


def rollback(settings: Any, version: int, store: Any = None) -> int:
    """Republish the weights of ``version`` as a new, newest version (metadata ``rollback_of``).

    Items added to the vocabulary after ``version`` keep their rows (rows never change meaning, and
    workers refuse a vocabulary that shrinks); those rows take the newest version's vectors and are
    marked retired, so the rolled-back model does not recommend them until a fine-tune round has
    trained them again. Returns the new version number."""
    import numpy as np

    from model.checkpoint import checkpoint_from_bytes, checkpoint_to_bytes
    from model.finetune import ITEM_ROW_PARAMS, grow_net
    from model.weight_check import weight_problem

    infos = [i for i in list_versions(settings) if i.complete]
    if not infos:
        raise LookupError(f"no model version on {_topic(settings)}: nothing to roll back")
    newest = max(i.version for i in infos)
    data = read_version_bytes(settings, version)
    if data is None and store is not None:
        data = store.load(version)
    if data is None:
        where = f"{_topic(settings)}" + (f" or in {store.root}" if store is not None else "")
        raise LookupError(f"model version {version} is not on {where}; available: "
                          f"{sorted({i.version for i in infos} | set(store.versions() if store else []))}")
    old = checkpoint_from_bytes(data)
    problem = weight_problem(old.net, old.popularity)
    if problem is not None:  # every reader would refuse it: say so here instead of publishing it
        raise ModelSyncError(problem.reason, f"cannot roll back to version {version}: {problem}")
    latest_data = read_version_bytes(settings, newest)
    if latest_data is None:
        raise LookupError(f"the newest model version {newest} could not be read from {_topic(settings)}")
    latest = checkpoint_from_bytes(latest_data)
    n_old, n_new = len(old.vocab), len(latest.vocab)
    if latest.vocab.ids[:n_old] != old.vocab.ids:
        raise ModelSyncError(R_VOCAB, f"cannot roll back to version {version}: its vocabulary is not a prefix of the "
                                      f"newest version {newest}'s")
    net, vocab = old.net, old.vocab
    pop = np.asarray(old.popularity, dtype=np.float64)
    retired = set(int(r) for r in (old.metadata or {}).get("retired_rows", []))
    if n_new > n_old:
        state = latest.net.state_dict()
        init = {name: state[name][n_old:] for name in ITEM_ROW_PARAMS if name in state}
        net = grow_net(old.net, n_new, init)
        vocab = latest.vocab
        pop = np.concatenate([pop, np.asarray(latest.popularity, dtype=np.float64)[n_old:]])
        retired |= set(range(n_old, n_new))
    new_version = newest + 1
    meta = {**(old.metadata or {}), "version": new_version, "parent_version": newest, "rollback_of": version,
            "created_at": time.time(), "retired_rows": sorted(retired), "n_items": len(vocab)}
    meta.pop("guardrail", None)
    payload = checkpoint_to_bytes(net, vocab, old.params, pop, meta)
    publish_version(settings, payload, new_version, newest, header_meta(meta))
    if store is not None:
        store.save(new_version, payload, header_meta(meta))
    return new_version
