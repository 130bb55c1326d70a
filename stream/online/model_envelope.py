"""The envelope of a models-topic record: a chunk's metadata and bytes, both in the record value.

Readers of the models topic never look at record headers. confluent-kafka cannot read a header name that
is not UTF-8 (the broker accepts one from any client): ``Message.headers()`` raises, leaves a half-built
list behind, and touching that list can crash the process. So a chunk carries what readers need inside
the value, where only bytes are read, and headers (whatever a writer put there) are ignored.

Layout (all integers big-endian)::

    MAGIC (14 bytes) | protocol (1 byte) | n (4 bytes) | descriptor (n bytes, JSON object) | payload

The descriptor holds the chunk's fields (version, parent, chunk index, chunk count, sha256 and size
of the whole checkpoint, and on chunk 0 an optional summary ``meta``); ``stream.online.model_sync`` checks
their values. This module only frames and unframes, and refuses a value that is not an envelope
(``bad_envelope``) or one of a protocol it does not know (``unknown_protocol``).
"""

from __future__ import annotations

import struct

import orjson

MAGIC = b"gruflow-model\n"
PROTOCOL = 2  # 1 carried the descriptor in record headers; its records have no envelope and are refused
MAX_DESCRIPTOR_BYTES = 64 * 1024  # the descriptor is ~300 bytes; a longer length field is garbage
_FRAME = struct.Struct(">BI")  # protocol, descriptor length

R_ENVELOPE = "bad_envelope"
R_PROTOCOL = "unknown_protocol"


class EnvelopeError(ValueError):
    """A value that cannot be unframed; ``reason`` is a refusal reason label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def pack(descriptor: dict, payload: bytes) -> bytes:
    """The record value carrying ``descriptor`` (JSON-serialisable) and ``payload``."""
    doc = orjson.dumps(descriptor)
    if len(doc) > MAX_DESCRIPTOR_BYTES:
        raise ValueError(f"model chunk descriptor of {len(doc)} bytes exceeds {MAX_DESCRIPTOR_BYTES}")
    return b"".join((MAGIC, _FRAME.pack(PROTOCOL, len(doc)), doc, payload))


def unpack(value: bytes | None) -> tuple[dict, bytes]:
    """(descriptor, payload) of a record value; EnvelopeError when it is not an envelope this code reads."""
    if not value or not value.startswith(MAGIC):
        head = bytes(value[:16]) if value else value
        raise EnvelopeError(R_ENVELOPE, f"value does not start with the gruflow model envelope (starts {head!r})")
    start = len(MAGIC) + _FRAME.size
    if len(value) < start:
        raise EnvelopeError(R_ENVELOPE, f"envelope truncated at {len(value)} bytes")
    protocol, n = _FRAME.unpack_from(value, len(MAGIC))
    if protocol != PROTOCOL:
        raise EnvelopeError(R_PROTOCOL, f"envelope protocol {protocol}; this gruflow reads {PROTOCOL}")
    if n > MAX_DESCRIPTOR_BYTES or start + n > len(value):
        raise EnvelopeError(R_ENVELOPE, f"descriptor length {n} does not fit a {len(value)}-byte value")
    try:
        descriptor = orjson.loads(value[start:start + n])
    except orjson.JSONDecodeError as exc:
        raise EnvelopeError(R_ENVELOPE, f"descriptor is not JSON ({exc})") from None
    if not isinstance(descriptor, dict):
        raise EnvelopeError(R_ENVELOPE, f"descriptor is a {type(descriptor).__name__}, not an object")
    return descriptor, bytes(value[start + n:])
