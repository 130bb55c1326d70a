"""How a model version travels on the models topic, without Kafka (stream.online.model_sync is the Kafka side).

A checkpoint is cut into chunks under ``MODEL_CHUNK_BYTES``, each carried in an envelope
(``stream.online.model_envelope``) whose descriptor names version, parent, chunk index and count, sha256,
size and (on chunk 0) a metadata summary; the ``Assembler`` puts a version back together, and the checks
(checksum, parse, compatibility with the served model) refuse what does not fit with one of
``REFUSAL_REASONS``. The protocol itself is described in stream/online/model_sync.py and
docs/model-safety.md.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from stream.kafka.config import MODEL_CHUNK_BYTES
from stream.online.model_envelope import R_ENVELOPE, R_PROTOCOL, EnvelopeError, pack, unpack

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

class ModelSyncError(ValueError):
    """A models-topic message or version is unusable; ``reason`` is a refusal reason label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


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
                  chunk_bytes: int = MODEL_CHUNK_BYTES) -> list[tuple[bytes, bytes]]:
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
    data: bytearray  # the checkpoint's bytes, verified
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
        # chunk by chunk into one buffer, each chunk let go once copied: a 1M-item checkpoint is 422 MB, and
        # a join would hold it twice while the served model is still in memory
        data = bytearray(sum(len(part) for part in p.parts.values()))
        at = 0
        for i in range(p.count):
            part = p.parts.pop(i)
            data[at:at + len(part)] = part
            at += len(part)
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
