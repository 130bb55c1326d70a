"""Versioned binary record of one user's state, as stored in the worker's state table.

Layout (little-endian), format version 1 (and 2, see below)::

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

Format version 2 is version 1 followed by the user's most recent item rows, written only when the
record has them (the worker keeps them when "because" is on, GRUFLOW_BECAUSE_HISTORY of them at
most), so a record without them stays byte-identical to version 1::

    u8   n_recent          rows that follow (<= 255)
    i32  recent[n_recent]  rows of the user's last known items in this session, oldest first

1 + 4*n bytes more: 21 bytes at the default 5. A reader refuses unknown format versions instead of guessing.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np

FORMAT_VERSION = 1
FORMAT_VERSION_RECENT = 2  # version 1 + recent item rows
# stored little-endian; native arrays where the machine is little-endian too (x86, ARM), else converted
_F4 = np.float32 if np.little_endian else np.dtype("<f4")
_I4 = np.int32 if np.little_endian else np.dtype("<i4")
# the whole header, each i48 as its low u16 and high i32 (little-endian): one (un)pack per record
_HEADER = struct.Struct("<BBHBIIHiHiHi")
HEADER_SIZE = _HEADER.size
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
    recent: np.ndarray | None = None  # int32 rows of the last items of the session, oldest first (format 2)

    @classmethod
    def empty(cls) -> "UserState":
        return cls(None, 0, 0, 0, np.zeros(0, dtype=np.int32))


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
    ts, off0, off1 = int(state.last_ts_ms), int(state.offsets[0]), int(state.offsets[1])
    for value, what in ((ts, "last_ts_ms"), (off0, "offset"), (off1, "offset")):
        if not _I48_MIN <= value <= _I48_MAX:
            raise StateCodecError(f"{what} {value} does not fit the 48-bit field")
    recent = state.recent
    version = FORMAT_VERSION if recent is None or len(recent) == 0 else FORMAT_VERSION_RECENT
    head = _HEADER.pack(version, flags, n_hidden, recs.shape[0], min(int(state.session_events), 0xFFFFFFFF),
                        int(state.model_version) & 0xFFFFFFFF,
                        ts & 0xFFFF, ts >> 16, off0 & 0xFFFF, off0 >> 16, off1 & 0xFFFF, off1 >> 16)
    if version == FORMAT_VERSION:
        return b"".join((head, hbytes, recs.tobytes()))
    rec = np.ascontiguousarray(recent, dtype="<i4")
    if rec.shape[0] > 0xFF:
        raise StateCodecError(f"state too large to encode: {rec.shape[0]} recent items")
    return b"".join((head, hbytes, recs.tobytes(), bytes((rec.shape[0],)), rec.tobytes()))


def decode(data: bytes) -> UserState:
    """The arrays of the result are read-only views of ``data`` (the worker decodes thousands of records
    per batch and only reads them)."""
    if len(data) < HEADER_SIZE:
        raise StateCodecError(f"state record of {len(data)} bytes is shorter than its {HEADER_SIZE}-byte header")
    (version, flags, n_hidden, n_recs, events, model_version,
     ts_lo, ts_hi, o0_lo, o0_hi, o1_lo, o1_hi) = _HEADER.unpack_from(data, 0)
    if version not in (FORMAT_VERSION, FORMAT_VERSION_RECENT):
        raise StateCodecError(f"state record format version {version} is not supported (this code reads "
                              f"versions {FORMAT_VERSION} and {FORMAT_VERSION_RECENT})")
    expected = HEADER_SIZE + 4 * n_hidden + 4 * n_recs
    recent = None
    if version == FORMAT_VERSION_RECENT and len(data) > expected:
        n_recent = data[expected]
        recent = np.frombuffer(data, dtype=_I4, count=min(n_recent, (len(data) - expected - 1) // 4),
                               offset=expected + 1)
        expected += 1 + 4 * n_recent
    if len(data) != expected:
        raise StateCodecError(f"state record has {len(data)} bytes, its header says {expected}")
    hidden = None
    if flags & FLAG_HIDDEN:
        hidden = np.frombuffer(data, dtype=_F4, count=n_hidden, offset=HEADER_SIZE)
    recs = np.frombuffer(data, dtype=_I4, count=n_recs, offset=HEADER_SIZE + 4 * n_hidden)
    return UserState(hidden, ts_lo + (ts_hi << 16), events, model_version, recs,
                     [o0_lo + (o0_hi << 16), o1_lo + (o1_hi << 16)], recent)


def encoded_size(state_size: int, k: int, recent: int = 0) -> int:
    """Bytes of a record with a hidden state of ``state_size`` floats, ``k`` recommendations and ``recent``
    recent item rows."""
    return HEADER_SIZE + 4 * state_size + 4 * k + (1 + 4 * recent if recent else 0)
