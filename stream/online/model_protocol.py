"""How a model version travels on the models topic, without Kafka: a checkpoint is cut into chunks under MODEL_CHUNK_BYTES with headers (protocol, version, parent, chunk index and count, sha256, size, metadata), and put back together (Assembler) and checked (checksum, compatibility with the served model) on the way in. A version that fails a check is refused with one of REFUSAL_REASONS."""

from __future__ import annotations
import hashlib
from dataclasses import dataclass, field
from typing import Any, Iterable
import orjson
from stream.kafka.config import MODEL_CHUNK_BYTES


PROTOCOL = 1


MAX_PENDING_VERSIONS = 4  # incomplete versions kept while assembling (older ones are dropped)


H_PROTOCOL = "gruflow-protocol"


H_VERSION = "gruflow-version"


H_PARENT = "gruflow-parent"


H_CHUNK = "gruflow-chunk"


H_CHUNKS = "gruflow-chunks"


H_SHA = "gruflow-sha256"


H_SIZE = "gruflow-size"


H_META = "gruflow-meta"


# refusal reasons (label values of gruflow_model_refusals_total)
R_HEADER = "bad_header"


R_CHECKSUM = "checksum"


R_CORRUPT = "corrupt"


R_STATE = "incompatible_state"


R_VOCAB = "incompatible_vocab"


R_PROTOCOL = "unknown_protocol"


# model.weight_check's reasons, spelled out so that reading the topic (`gruflow model list`) needs no torch
R_NON_FINITE = "non_finite"  # NaN or infinite weights (or popularity counts)


R_ABSURD = "absurd_weights"  # a weight beyond model.weight_check.MAX_ABS_WEIGHT


R_LOWER = "lower_version"  # published after a higher version was served


R_SAME = "same_version"  # the served version's number, published again


REFUSAL_REASONS = (R_HEADER, R_CHECKSUM, R_CORRUPT, R_STATE, R_VOCAB, R_PROTOCOL, R_NON_FINITE, R_ABSURD, R_LOWER,
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
                  chunk_bytes: int = MODEL_CHUNK_BYTES) -> list[tuple[bytes, bytes, list[tuple[str, bytes]]]]:
    """(key, value, headers) for every chunk of one version."""
    if version < 1:
        raise ValueError(f"model versions start at 1, got {version}")
    if chunk_bytes < 1:
        raise ValueError("chunk_bytes must be >= 1")
    digest = hashlib.sha256(ckpt).hexdigest()
    count = max(1, -(-len(ckpt) // chunk_bytes))
    out = []
    for i in range(count):
        headers = [(H_PROTOCOL, str(PROTOCOL).encode()), (H_VERSION, str(version).encode()),
                   (H_PARENT, str(parent).encode()), (H_CHUNK, str(i).encode()), (H_CHUNKS, str(count).encode()),
                   (H_SHA, digest.encode()), (H_SIZE, str(len(ckpt)).encode())]
        if i == 0 and meta is not None:
            headers.append((H_META, orjson.dumps(meta)))
        out.append((chunk_key(version, i), ckpt[i * chunk_bytes:(i + 1) * chunk_bytes], headers))
    return out


def message_chunk(m: Any) -> Chunk:
    """``decode_chunk`` of a consumed confluent-kafka message. confluent-kafka cannot read a header name that is
    not UTF-8 (the broker stores one): ``Message.headers()`` raises (SystemError over the UnicodeDecodeError, or
    the UnicodeDecodeError itself), and such a message is refused like any other bad header instead of stopping
    the reader at its offset. Not covered: confluent-kafka 2.16.1 caches the half-built list, so a second
    ``headers()`` on that message (never made here) returns it, and touching it crashes the process; a first
    call has been seen to return it too (docs/unreadable-records.md)."""
    try:
        headers = m.headers()
    except (SystemError, UnicodeDecodeError) as exc:
        raise ModelSyncError(R_HEADER, f"models message {m.key()!r}: unreadable headers "
                                       f"({exc.__cause__ or exc!r})") from None
    return decode_chunk(m.key(), m.value(), headers)


def decode_chunk(key: bytes | None, value: bytes | None, headers: Iterable[tuple[str, bytes]] | None) -> Chunk:
    """Parse one message; raises ModelSyncError(bad_header/unknown_protocol) when it is not a chunk."""
    h = {k: v for k, v in (headers or [])}
    try:
        proto = int(h[H_PROTOCOL])
    except (KeyError, ValueError, TypeError):
        raise ModelSyncError(R_HEADER, f"models message {key!r} has no {H_PROTOCOL} header") from None
    if proto != PROTOCOL:
        raise ModelSyncError(R_PROTOCOL, f"models message {key!r} uses protocol {proto}; this gruflow reads {PROTOCOL}")
    try:
        version, parent = int(h[H_VERSION]), int(h[H_PARENT])
        index, count, size = int(h[H_CHUNK]), int(h[H_CHUNKS]), int(h[H_SIZE])
        sha = h[H_SHA].decode("ascii")
        meta = orjson.loads(h[H_META]) if H_META in h else None
    except (KeyError, ValueError, TypeError, UnicodeDecodeError, orjson.JSONDecodeError) as exc:
        raise ModelSyncError(R_HEADER, f"models message {key!r}: bad headers ({exc})") from None
    if not (0 <= index < count) or version < 1 or size < 0 or len(sha) != 64:
        raise ModelSyncError(R_HEADER, f"models message {key!r}: chunk {index}/{count} of version {version} "
                                       f"is out of range")
    return Chunk(version, parent, index, count, sha, size, value or b"", meta)


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


def header_meta(meta: dict) -> dict:
    """The small summary carried in chunk 0's header (for ``gruflow model list``)."""
    keep = ("version", "parent_version", "created_at", "stream_time", "n_items", "new_items", "rollback_of",
            "finetune_round", "train_events", "loss", "source")
    out = {k: meta[k] for k in keep if k in meta}
    if "guardrail" in meta:
        g = meta["guardrail"]
        out["guardrail"] = {"current": g.get("current"), "candidate": g.get("candidate")}
    if "retired_rows" in meta:
        out["retired"] = len(meta["retired_rows"])
    return out
