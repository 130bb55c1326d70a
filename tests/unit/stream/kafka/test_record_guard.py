"""record_guard: records the broker stores but aiokafka cannot parse come out of aiokafka's fetcher marked,
with every other record unchanged. The batches are built with aiokafka's own batch builder and read by
aiokafka's own PartitionRecords (what the fetcher does with a fetched partition), not by fakes."""

from __future__ import annotations

import inspect
import struct

import aiokafka
import pytest
from aiokafka import codec
from aiokafka.consumer import fetcher
from aiokafka.consumer.fetcher import READ_UNCOMMITTED, PartitionRecords
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.record.memory_records import MemoryRecords
from aiokafka.record.util import calc_crc32c
from aiokafka.structs import TopicPartition

from stream.kafka import record_guard
from stream.kafka.record_guard import GuardedRecords, Unreadable, read_batch, unreadable_detail

TP = TopicPartition("t.clicks", 3)
PLACEHOLDER = "@@"  # a header name rewritten into bytes that are not UTF-8 once the batch is built
BAD_NAME = b"\xff\xfe"
GZIP, LZ4 = 1, 3


def batch(records: list[tuple[bytes | None, bytes | None, list]], base: int = 0, codec_id: int = 0) -> bytes:
    """One stored record batch (v2) as the broker returns it, offsets from ``base``. A header named
    PLACEHOLDER becomes BAD_NAME (uncompressed batches only), with the CRC recomputed like a producer would."""
    b = DefaultRecordBatchBuilder(2, codec_id, 0, -1, -1, -1, 1 << 20)
    for i, (key, value, headers) in enumerate(records):
        assert b.append(i, 1_700_000_000_000 + i, key, value, headers) is not None
    buf = bytearray(b.build())
    struct.pack_into(">q", buf, 0, base)
    at = buf.find(PLACEHOLDER.encode())
    while at >= 0:
        buf[at:at + 2] = BAD_NAME
        at = buf.find(PLACEHOLDER.encode())
    struct.pack_into(">I", buf, 17, calc_crc32c(bytes(buf[21:])))
    return bytes(buf)


def consumer_records(data: bytes) -> list:
    """What aiokafka's fetcher makes of one fetched partition's bytes (its PartitionRecords), guarded."""
    return list(PartitionRecords(TP, GuardedRecords(data), None, 0, None, None, True, READ_UNCOMMITTED))


def test_a_header_name_that_is_not_utf8_stops_aiokafkas_own_parser() -> None:
    """Why the guard exists (aiokafka 0.14.0): the record parser raises for the whole fetch."""
    data = batch([(b"u1", b"v0", []), (b"u1", b"v1", [(PLACEHOLDER, b"x")])])
    with pytest.raises(UnicodeDecodeError):
        list(PartitionRecords(TP, MemoryRecords(data), None, 0, None, None, True, READ_UNCOMMITTED))


def test_the_unreadable_record_is_marked_and_its_neighbours_come_out_unchanged() -> None:
    data = batch([(b"u1", b"v0", [("ok", b"1")]), (b"u2", b"v1", [("fine", b"2"), (PLACEHOLDER, b"x")]),
                  (b"u3", b"v2", [("after", None)])], base=40)
    data += batch([(b"u4", b"v3", [])], base=43)  # the next batch of the same fetch
    got = consumer_records(data)
    assert [r.offset for r in got] == [40, 41, 42, 43]
    assert [(r.key, r.value) for r in got] == [(b"u1", b"v0"), (b"u2", b"v1"), (b"u3", b"v2"), (b"u4", b"v3")]
    assert [unreadable_detail(r) is None for r in got] == [True, False, True, True]
    assert got[0].headers == (("ok", b"1"),) and got[2].headers == (("after", None),)
    assert got[1].timestamp == 1_700_000_000_001
    detail = unreadable_detail(got[1])
    assert "header 1 name" in detail and repr(BAD_NAME) in detail


def test_every_record_after_the_first_failure_of_a_batch_is_read_by_the_fallback() -> None:
    data = batch([(b"u1", b"v0", [(PLACEHOLDER, b"x")]), (b"u2", b"v1", []), (None, None, [(PLACEHOLDER, None)])])
    got = consumer_records(data)
    assert [(r.offset, r.key, r.value, unreadable_detail(r) is not None) for r in got] == \
        [(0, b"u1", b"v0", True), (1, b"u2", b"v1", False), (2, None, None, True)]


@pytest.mark.parametrize("headers", [[("h", None)], [("h", b"\xff\xfe\x00")], [("", b"")]],
                         ids=["null-value", "value-not-utf8", "empty-name"])
def test_headers_aiokafka_reads_are_not_marked(headers: list) -> None:
    got = consumer_records(batch([(b"u1", b"v", headers)]))
    assert len(got) == 1 and unreadable_detail(got[0]) is None
    assert got[0].headers == tuple(headers)


def test_a_wire_header_named_like_the_mark_is_not_a_mark() -> None:
    got = consumer_records(batch([(b"u1", b"v", [(record_guard.UNREADABLE_HEADER, b"forged")])]))
    assert unreadable_detail(got[0]) is None
    assert type(Unreadable("why")) is Unreadable and Unreadable("why").detail == "why"


def test_a_batch_whose_codec_is_missing_is_one_marked_record_with_its_stored_bytes(monkeypatch) -> None:
    if not codec.has_lz4():
        pytest.skip("cramjam (aiokafka's lz4/snappy/zstd codecs) is not installed: cannot build an lz4 batch")
    data = batch([(b"u1", b"v0", []), (b"u2", b"v1", [])], base=7, codec_id=LZ4)
    assert [r.value for r in consumer_records(data)] == [b"v0", b"v1"]  # with the codec: read as usual
    monkeypatch.setattr(codec, "cramjam", None)  # aiokafka's own test of the library, as without it
    got = consumer_records(data)
    assert len(got) == 1 and got[0].offset == 7 and got[0].key is None
    assert got[0].value == data[61:]  # the records section as stored (compressed)
    detail = unreadable_detail(got[0])
    assert "offsets 7..8" in detail and "lz4" in detail and "cramjam" in detail


def test_a_batch_whose_structure_breaks_keeps_what_was_read_before_the_break() -> None:
    good = batch([(b"u1", b"v0", []), (b"u2", b"v1", [(PLACEHOLDER, b"x")])])
    broken = good[:-3] + b"\x7f\x7f\x7f"  # the last record's headers overrun it
    got = list(read_batch(broken))
    assert [(r.offset, unreadable_detail(r) is None) for r in got] == [(0, True), (1, False)]
    assert "not readable from offset 1" in unreadable_detail(got[1])
    assert list(read_batch(good, after=0))[0].offset == 1  # records up to ``after`` were yielded already


def compressed(data: bytes) -> bytes:
    """The same batch with its records section gzip-compressed, as a producer using gzip would store it."""
    body = codec.gzip_encode(data[61:])
    buf = bytearray(data[:61] + body)
    struct.pack_into(">i", buf, 8, len(buf) - 12)  # batchLength
    struct.pack_into(">h", buf, 21, struct.unpack_from(">h", buf, 21)[0] | GZIP)  # attributes: codec
    struct.pack_into(">I", buf, 17, calc_crc32c(bytes(buf[21:])))
    return bytes(buf)


def test_an_unreadable_header_name_in_a_compressed_batch_is_found_after_decompressing() -> None:
    data = compressed(batch([(b"u1", b"v0", []), (b"u2", b"v1", [(PLACEHOLDER, b"x")]), (b"u3", b"v2", [])], base=5))
    with pytest.raises(UnicodeDecodeError):  # aiokafka decompresses it, then fails on the name
        list(PartitionRecords(TP, MemoryRecords(data), None, 0, None, None, True, READ_UNCOMMITTED))
    got = consumer_records(data)
    assert [(r.offset, r.value, unreadable_detail(r) is None) for r in got] == \
        [(5, b"v0", True), (6, b"v1", False), (7, b"v2", True)]


def test_gzip_batches_are_read_by_aiokafka_without_the_fallback() -> None:
    data = batch([(b"u1", b"v0", [("h", None)])], codec_id=GZIP)
    assert [(r.value, r.headers) for r in consumer_records(data)] == [(b"v0", (("h", None),))]


def test_the_private_aiokafka_contract_the_guard_relies_on() -> None:
    """aiokafka is pinned; if an upgrade moves these, this test names what moved."""
    assert aiokafka.__version__ == "0.14.0"
    # the fetcher builds each fetched partition's records through its module-level name, once per fetch
    source = inspect.getsource(fetcher.Fetcher._proc_fetch_request)
    assert "MemoryRecords(part_data[-1])" in source and "records.has_next()" in source
    assert list(inspect.signature(PartitionRecords).parameters) == [
        "tp", "records", "aborted_transactions", "fetch_offset", "key_deserializer", "value_deserializer",
        "check_crcs", "isolation_level"]
    # a record's headers reach the ConsumerRecord element by element (the mark survives)
    assert "tuple(record.headers)" in inspect.getsource(PartitionRecords._consumer_record)
    record_guard.install()
    assert fetcher.MemoryRecords is GuardedRecords
    record_guard.install()  # idempotent
    assert fetcher.MemoryRecords is GuardedRecords
