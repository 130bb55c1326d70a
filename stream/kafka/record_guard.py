"""Records the broker stores but aiokafka cannot parse reach the worker as marked records, not as a crash.

Kafka's wire format lets a header name be any bytes (the Java broker decodes it leniently and stores it),
but aiokafka's record parser decodes header names as strict UTF-8, and a batch compressed with a codec
whose library is missing cannot be read at all. Raised inside aiokafka's fetcher, either error would stop
the worker before gruflow sees the record, at the same offset on every restart.

``install`` replaces the record-set class aiokafka's fetcher builds each fetched partition's records with
(``aiokafka.consumer.fetcher.MemoryRecords``, its only use) by ``GuardedRecords``. It hands every batch to
aiokafka's own (compiled) parser first; only when that parser raises does this module read the rest of
the batch itself:

- a record whose header names are all UTF-8 comes out as aiokafka would give it;
- a record with a header name that is not UTF-8 comes out with its key and value unchanged and
  ``(Unreadable,)`` as its headers: ``unreadable_detail(record)`` says why;
- a batch that cannot be read (a codec whose library is missing, a broken structure) comes out as one
  marked record at its first unread offset whose value is the batch's records section as stored.

So every offset the broker returns is either a normal record or a marked one, and the consumer's
position moves past both. ``Unreadable`` is a tuple subclass that only this module creates; headers that
come over the wire are plain tuples, so no producer can make a record look unreadable.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Iterator

from aiokafka import codec
from aiokafka.record.memory_records import MemoryRecords as _MemoryRecords  # aiokafka's own (compiled where built)
from aiokafka.record.util import decode_varint

from stream import compat

UNREADABLE_HEADER = "gruflow-unreadable"

# Kafka record batch v2 header: baseOffset, batchLength, partitionLeaderEpoch, magic, crc, attributes,
# lastOffsetDelta, firstTimestamp, maxTimestamp, producerId, producerEpoch, baseSequence, recordCount
_V2_HEADER = struct.Struct(">qiibIhiqqqhii")
_LOG_OVERHEAD = 12  # baseOffset + batchLength: a batch takes 12 + batchLength bytes
_MAGIC_AT = 16
_CODEC_MASK = 0x07
_LOG_APPEND_TIME = 0x08
_DECODERS = {1: ("gzip", codec.has_gzip, codec.gzip_decode), 2: ("snappy", codec.has_snappy, codec.snappy_decode),
             3: ("lz4", codec.has_lz4, codec.lz4_decode), 4: ("zstd", codec.has_zstd, codec.zstd_decode)}


class Unreadable(tuple):
    """The one header of a record that could not be read: ``(UNREADABLE_HEADER, detail as UTF-8)``."""

    __slots__ = ()

    def __new__(cls, detail: str) -> "Unreadable":
        return super().__new__(cls, (UNREADABLE_HEADER, detail.encode("utf-8", "replace")))

    @property
    def detail(self) -> str:
        return self[1].decode("utf-8")


def unreadable_detail(record: Any) -> str | None:
    """Why ``record`` (an aiokafka ConsumerRecord) could not be read, or None for a normal record."""
    headers = record.headers
    if headers and type(headers[0]) is Unreadable:
        return headers[0].detail
    return None


@dataclass(frozen=True, slots=True)
class ParsedRecord:
    """A record as aiokafka's fetcher reads it into a ConsumerRecord (see ``compat.use_record_set_class``)."""

    offset: int
    timestamp: int
    timestamp_type: int
    key: bytes | None
    value: bytes | None
    headers: tuple
    checksum: None = None


def install() -> None:
    """Make aiokafka's fetcher build ``GuardedRecords`` (idempotent; every aiokafka consumer of the process)."""
    compat.use_record_set_class(GuardedRecords)


class GuardedRecords:
    """aiokafka's MemoryRecords over one fetched partition's bytes, whose batches fall back to
    ``read_batch`` where aiokafka's parser fails. Batches are cut where aiokafka cuts them (12 +
    batchLength bytes each); a partial batch at the end is left to aiokafka, which fetches it again."""

    __slots__ = ("_records", "_data", "_pos")

    def __init__(self, data: bytes) -> None:
        self._records = _MemoryRecords(data)
        self._data = data
        self._pos = 0

    def size_in_bytes(self) -> int:
        return self._records.size_in_bytes()

    def has_next(self) -> bool:
        return self._records.has_next()

    def next_batch(self) -> Any:
        batch = self._records.next_batch()
        if batch is None:
            return None
        start = self._pos
        (length,) = struct.unpack_from(">i", self._data, start + 8)
        self._pos = start + _LOG_OVERHEAD + length
        return GuardedBatch(batch, self._data, start, self._pos)


class GuardedBatch:
    """One of aiokafka's record batches; iterating it yields aiokafka's records until its parser fails,
    then what ``read_batch`` reads of the records after the last one yielded."""

    __slots__ = ("_batch", "_data", "_start", "_end")

    def __init__(self, batch: Any, data: bytes, start: int, end: int) -> None:
        self._batch = batch
        self._data = data
        self._start = start
        self._end = end

    def __getattr__(self, name: str) -> Any:
        return getattr(self._batch, name)

    def __next__(self) -> Any:  # the fetcher reads a control batch's marker with next()
        return next(self._batch)

    def __iter__(self) -> Iterator[Any]:
        return self._records()

    def _records(self) -> Iterator[Any]:
        last = -1
        try:
            for record in self._batch:
                yield record
                last = record.offset
        except Exception as exc:  # noqa: BLE001 - whatever the parser raised, the fallback reads what it can
            raw = bytes(memoryview(self._data)[self._start:self._end])
            yield from read_batch(raw, after=last, cause=exc)


def read_batch(raw: bytes, after: int = -1, cause: BaseException | None = None) -> Iterator[ParsedRecord]:
    """The records of one stored batch with offsets above ``after``, read without failing: a record whose
    header names are not all UTF-8 is marked ``Unreadable``, and what cannot be read from some point on
    (legacy format, missing codec, broken structure) is one marked record holding the bytes from there."""
    base = struct.unpack_from(">q", raw, 0)[0]
    if len(raw) < _V2_HEADER.size or raw[_MAGIC_AT] < 2:
        why = f"record batch (magic {raw[_MAGIC_AT] if len(raw) > _MAGIC_AT else '?'}) not readable: {cause!r}"
        yield ParsedRecord(max(base, after + 1), -1, 0, None, raw, (Unreadable(why),))
        return
    header = _V2_HEADER.unpack_from(raw, 0)
    attributes, last_delta, first_ts, max_ts, count = header[5], header[6], header[7], header[8], header[12]
    log_append = bool(attributes & _LOG_APPEND_TIME)
    ts_type = 1 if log_append else 0
    body = raw[_V2_HEADER.size:]
    last = after
    try:
        data = _decompress(attributes & _CODEC_MASK, body)
        for record in _parse_records(data, count, base, first_ts, max_ts if log_append else None, ts_type):
            if record.offset > after:
                last = record.offset
                yield record
    except Exception as exc:  # noqa: BLE001 - the rest of the batch is one dead letter, not a crash
        why = f"record batch at offsets {base}..{base + last_delta} not readable from offset " \
              f"{max(base, last + 1)}: {exc}" + (f" (aiokafka: {cause!r})" if cause is not None else "")
        yield ParsedRecord(max(base, last + 1), max_ts if log_append else first_ts, ts_type, None, body,
                           (Unreadable(why),))


def _decompress(codec_id: int, body: bytes) -> bytes:
    if codec_id == 0:
        return body
    known = _DECODERS.get(codec_id)
    if known is None:
        raise ValueError(f"unknown compression codec {codec_id}")
    name, available, decode = known
    if not available():
        raise ValueError(f"{name}-compressed, and the {name} codec's library (cramjam) is not installed")
    return bytes(decode(body))


def _parse_records(data: bytes, count: int, base: int, first_ts: int, append_ts: int | None,
                   ts_type: int) -> Iterator[ParsedRecord]:
    """Kafka v2 records: length, attributes, timestampDelta, offsetDelta, key, value, headers (varints)."""
    pos = 0
    for _ in range(count):
        length, pos = decode_varint(data, pos)
        end = pos + length
        if length < 0 or end > len(data):
            raise ValueError(f"record of {length} bytes at byte {pos} overruns the batch")
        _attrs, pos = decode_varint(data, pos)
        ts_delta, pos = decode_varint(data, pos)
        offset_delta, pos = decode_varint(data, pos)
        key, pos = _bytes(data, pos)
        value, pos = _bytes(data, pos)
        n_headers, pos = decode_varint(data, pos)
        headers: list[tuple[str, bytes | None]] = []
        bad: list[str] = []
        for i in range(n_headers):
            name, pos = _bytes(data, pos)
            h_value, pos = _bytes(data, pos)
            try:
                headers.append(((name or b"").decode("utf-8"), h_value))
            except UnicodeDecodeError:
                bad.append(f"header {i} name {name!r} is not UTF-8")
        if pos != end:
            raise ValueError(f"record at offset {base + offset_delta}: {end - pos} bytes left over")
        timestamp = append_ts if append_ts is not None else first_ts + ts_delta
        marked = (Unreadable("; ".join(bad)),) if bad else tuple(headers)
        yield ParsedRecord(base + offset_delta, timestamp, ts_type, key, value, marked)


def _bytes(data: bytes, pos: int) -> tuple[bytes | None, int]:
    n, pos = decode_varint(data, pos)
    if n < 0:
        return None, pos
    if pos + n > len(data):
        raise ValueError(f"field of {n} bytes at byte {pos} overruns the record")
    return data[pos:pos + n], pos + n
