"""Versioned binary record of one user's state, as stored in the worker's state table.

Layout (little-endian), format version 1::

    u8   format version (1)
    u8   flags             bit 0: hidden state present (a known item was seen in this session)
    u16  n_hidden          floats that follow (0 when the flag is clear)
    u8   n_recs            rows that follow the hidden state (K <= 255)
    u32  session_events    events in the current session
    u32  model_version     version of the model that produced ``recs``
    i48  last_ts_ms        event time of the user's newest event
    i48  offsets[2]        offset of the last event applied from the clicks / purchases topic (-1: none)
    f32  hidden[n_hidden]
    i32  recs[n_recs]      vocabulary rows last published to the user, best first

31 header bytes + 4*H + 4*K: 511 bytes at H=100, K=20. Item rows (not ids) are stored because the
vocabulary is append-only, so a row keeps its meaning across model versions. The applied offsets make
re-delivered events (at-least-once after a crash) idempotent: a user's events live in one partition
of each input topic, so an event at or below the stored offset has already been applied.
A reader refuses unknown format versions instead of guessing.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np

FORMAT_VERSION = 1
_HEAD = struct.Struct("<BBHBII")
_I48 = 6
HEADER_SIZE = _HEAD.size + 3 * _I48
FLAG_HIDDEN = 0x01
N_SOURCES = 2  # clicks, purchases
_I48_MIN, _I48_MAX = -(1 << 47), (1 << 47) - 1


class StateCodecError(ValueError):
    """A stored state record cannot be decoded (corrupt, truncated or from an unknown format version)."""


@dataclass(slots=True)
class UserState:
    """One user's state. ``hidden`` is None when no item of the current session was known to the model."""

    hidden: np.ndarray | None
    last_ts_ms: int
    session_events: int
    model_version: int
    recs: np.ndarray  # int32 rows, best first; may be empty
    offsets: list[int] = field(default_factory=lambda: [-1] * N_SOURCES)

    @classmethod
    def empty(cls) -> "UserState":
        return cls(None, 0, 0, 0, np.zeros(0, dtype=np.int32))


def _i48(v: int, what: str) -> bytes:
    if not _I48_MIN <= v <= _I48_MAX:
        raise StateCodecError(f"{what} {v} does not fit the 48-bit field")
    return v.to_bytes(_I48, "little", signed=True)


def encode(state: UserState) -> bytes:
    recs = np.ascontiguousarray(state.recs, dtype="<i4")
    hidden = state.hidden
    if hidden is None:
        flags, hbytes, n_hidden = 0, b"", 0
    else:
        h = np.ascontiguousarray(hidden, dtype="<f4").ravel()
        flags, hbytes, n_hidden = FLAG_HIDDEN, h.tobytes(), h.shape[0]
    if n_hidden > 0xFFFF or recs.shape[0] > 0xFF:
        raise StateCodecError(f"state too large to encode: {n_hidden} hidden floats, {recs.shape[0]} recs")
    if len(state.offsets) != N_SOURCES:
        raise StateCodecError(f"state has {len(state.offsets)} offsets, expected {N_SOURCES}")
    head = _HEAD.pack(FORMAT_VERSION, flags, n_hidden, recs.shape[0], min(int(state.session_events), 0xFFFFFFFF),
                      int(state.model_version) & 0xFFFFFFFF)
    return b"".join((head, _i48(int(state.last_ts_ms), "last_ts_ms"),
                     _i48(int(state.offsets[0]), "offset"), _i48(int(state.offsets[1]), "offset"),
                     hbytes, recs.tobytes()))


def decode(data: bytes) -> UserState:
    if len(data) < HEADER_SIZE:
        raise StateCodecError(f"state record of {len(data)} bytes is shorter than its {HEADER_SIZE}-byte header")
    version, flags, n_hidden, n_recs, events, model_version = _HEAD.unpack_from(data, 0)
    if version != FORMAT_VERSION:
        raise StateCodecError(f"state record format version {version} is not supported (this code reads "
                              f"version {FORMAT_VERSION})")
    expected = HEADER_SIZE + 4 * n_hidden + 4 * n_recs
    if len(data) != expected:
        raise StateCodecError(f"state record has {len(data)} bytes, its header says {expected}")
    p = _HEAD.size
    last_ts = int.from_bytes(data[p:p + _I48], "little", signed=True)
    off0 = int.from_bytes(data[p + _I48:p + 2 * _I48], "little", signed=True)
    off1 = int.from_bytes(data[p + 2 * _I48:p + 3 * _I48], "little", signed=True)
    hidden = None
    if flags & FLAG_HIDDEN:
        hidden = np.frombuffer(data, dtype="<f4", count=n_hidden, offset=HEADER_SIZE).astype(np.float32)
    recs = np.frombuffer(data, dtype="<i4", count=n_recs, offset=HEADER_SIZE + 4 * n_hidden).astype(np.int32)
    return UserState(hidden, last_ts, events, model_version, recs, [off0, off1])


def encoded_size(state_size: int, k: int) -> int:
    """Bytes of a record with a hidden state of ``state_size`` floats and ``k`` recommendations."""
    return HEADER_SIZE + 4 * state_size + 4 * k
