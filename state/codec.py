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

Format version 2 appends the per-user part of the business rules (stream/rules.py), written only when
a list is not empty (otherwise the record stays version 1, byte for byte)::

    u8   n_bought          purchases kept, oldest first (bounded by GRUFLOW_RULE_STATE_ITEMS <= 255)
    u8   n_session         items of the current session kept, oldest first (same bound)
    (i32 row, u32 ts_s)[n_bought]   vocabulary row of a bought item, purchase time in epoch seconds
    i32  session[n_session]         4 * row + kind (0 viewed or clicked, 1 put in the cart)

Format version 3 is version 2 (its rule lists possibly empty) followed by the rows of the user's last
distinct known items of the session, for "because" (model/attribution.py); written only when that list
is not empty (the worker keeps it when GRUFLOW_BECAUSE is on, GRUFLOW_BECAUSE_HISTORY rows at most)::

    u8   n_recent          rows that follow
    i32  recent[n_recent]  oldest first

2 + 1 + 4 * 5 = 23 bytes at the default history of 5 when there are no rule lists.

31 header bytes + 4*H + 4*K: 511 bytes at H=100, K=20 (version 1); version 2 adds 2 + 8 per purchase +
4 per session item, at most 3,062 bytes more. Item rows (not ids) are stored because the
vocabulary is append-only, so a row keeps its meaning across model versions. The applied offsets make
re-delivered events (at-least-once after a crash) idempotent: a user's events live in one partition
of each input topic, so an event at or below the stored offset has already been applied.
A reader refuses unknown format versions instead of guessing.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np

FORMAT_VERSION = 2  # written when the rule lists are not empty; version 1 otherwise (and always read)
FORMAT_VERSION_RECENT = 3  # version 2 + the recent item rows of "because"
_RULES = struct.Struct("<BB")
BOUGHT_DTYPE = np.dtype([("row", "<i4"), ("ts_s", "<u4")])
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
    bought: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=BOUGHT_DTYPE))  # (row, ts_s), oldest first
    session_items: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))  # 4 * row + kind
    recent: np.ndarray | None = None  # int32 rows of the last distinct items of the session, oldest first

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
    n_bought, n_session = len(state.bought), len(state.session_items)
    if n_bought > 0xFF or n_session > 0xFF:
        raise StateCodecError(f"state too large to encode: {n_bought} purchases, {n_session} session items")
    recent = np.ascontiguousarray(state.recent if state.recent is not None else np.zeros(0), dtype="<i4")
    if recent.shape[0] > 0xFF:
        raise StateCodecError(f"state too large to encode: {recent.shape[0]} recent items")
    version = FORMAT_VERSION_RECENT if recent.shape[0] else FORMAT_VERSION if n_bought or n_session else 1
    head = _HEADER.pack(version, flags, n_hidden, recs.shape[0], min(int(state.session_events), 0xFFFFFFFF),
                        int(state.model_version) & 0xFFFFFFFF,
                        ts & 0xFFFF, ts >> 16, off0 & 0xFFFF, off0 >> 16, off1 & 0xFFFF, off1 >> 16)
    if version == 1:
        return b"".join((head, hbytes, recs.tobytes()))
    bought = np.asarray(state.bought, dtype=BOUGHT_DTYPE)
    session = np.ascontiguousarray(state.session_items, dtype="<i4")
    parts = [head, hbytes, recs.tobytes(), _RULES.pack(n_bought, n_session), bought.tobytes(), session.tobytes()]
    if version == FORMAT_VERSION_RECENT:
        parts += [bytes((recent.shape[0],)), recent.tobytes()]
    return b"".join(parts)


def decode(data: bytes) -> UserState:
    """The arrays of the result are read-only views of ``data`` (the worker decodes thousands of records
    per batch and only reads them)."""
    if len(data) < HEADER_SIZE:
        raise StateCodecError(f"state record of {len(data)} bytes is shorter than its {HEADER_SIZE}-byte header")
    (version, flags, n_hidden, n_recs, events, model_version,
     ts_lo, ts_hi, o0_lo, o0_hi, o1_lo, o1_hi) = _HEADER.unpack_from(data, 0)
    if version not in (1, FORMAT_VERSION, FORMAT_VERSION_RECENT):
        raise StateCodecError(f"state record format version {version} is not supported (this code reads "
                              f"versions 1 to {FORMAT_VERSION_RECENT})")
    expected = HEADER_SIZE + 4 * n_hidden + 4 * n_recs
    bought, session, recent = None, None, None
    if version >= 2:
        if len(data) < expected + _RULES.size:
            raise StateCodecError(f"state record of {len(data)} bytes is shorter than its rule lists' header")
        n_bought, n_session = _RULES.unpack_from(data, expected)
        at = expected + _RULES.size
        rules_end = at + BOUGHT_DTYPE.itemsize * n_bought + 4 * n_session
        expected = rules_end
        if version == FORMAT_VERSION_RECENT and len(data) > rules_end:
            expected = rules_end + 1 + 4 * data[rules_end]
        if len(data) == expected:
            bought = np.frombuffer(data, dtype=BOUGHT_DTYPE, count=n_bought, offset=at)
            session = np.frombuffer(data, dtype=_I4, count=n_session, offset=at + BOUGHT_DTYPE.itemsize * n_bought)
            if version == FORMAT_VERSION_RECENT:
                recent = np.frombuffer(data, dtype=_I4, count=data[rules_end], offset=rules_end + 1)
    if len(data) != expected:
        raise StateCodecError(f"state record has {len(data)} bytes, its header says {expected}")
    hidden = None
    if flags & FLAG_HIDDEN:
        hidden = np.frombuffer(data, dtype=_F4, count=n_hidden, offset=HEADER_SIZE)
    recs = np.frombuffer(data, dtype=_I4, count=n_recs, offset=HEADER_SIZE + 4 * n_hidden)
    state = UserState(hidden, ts_lo + (ts_hi << 16), events, model_version, recs,
                      [o0_lo + (o0_hi << 16), o1_lo + (o1_hi << 16)])
    if bought is not None:
        state.bought, state.session_items = bought, session
    state.recent = recent
    return state


def applied_offsets(data: bytes) -> tuple[int, ...]:
    """The ``offsets`` of an encoded record, read from its header alone (changelog recovery reads many)."""
    if len(data) < HEADER_SIZE or data[0] not in (1, FORMAT_VERSION, FORMAT_VERSION_RECENT):
        raise StateCodecError("not a state record of a known format version")
    fields = _HEADER.unpack_from(data, 0)
    return fields[8] + (fields[9] << 16), fields[10] + (fields[11] << 16)


def supersedes(newer: tuple[int, ...], older: tuple[int, ...]) -> bool:
    """Whether a state that applied its sources' events up to ``newer`` holds every event of one that applied
    them up to ``older``, and more. A user's events live in one partition per source, so a state's applied
    offsets only grow along one history of that user; a record they supersede is a late copy of an older
    state (a worker that lost the partition wrote it after the new owner's)."""
    return newer != older and all(n >= o for n, o in zip(newer, older))


def encoded_size(state_size: int, k: int, bought: int = 0, session_items: int = 0, recent: int = 0) -> int:
    """Bytes of a record with a hidden state of ``state_size`` floats, ``k`` recommendations, the rule
    lists' lengths and ``recent`` item rows."""
    rules = _RULES.size + BOUGHT_DTYPE.itemsize * bought + 4 * session_items if bought or session_items or recent else 0
    return HEADER_SIZE + 4 * state_size + 4 * k + rules + (1 + 4 * recent if recent else 0)
