"""The models-topic chunk protocol without a broker: split, envelope, reassemble, verify, refuse."""

from __future__ import annotations

import hashlib
import os
import random
import struct

import pytest

from stream.online import model_envelope
from stream.online.model_envelope import PROTOCOL
from stream.online.model_sync import (CHUNK_BYTES, F_CHUNK, F_META, F_SHA, R_CHECKSUM, R_ENVELOPE, R_PROTOCOL,
                               R_STATE, R_VOCAB, Assembler, ModelSyncError, check_compatible, chunk_key, decode_chunk,
                               encode_chunks, message_chunk)


def _chunks(data: bytes, version: int = 3, parent: int = 2, chunk_bytes: int = 1000, meta: dict | None = None):
    return [decode_chunk(k, v) for k, v in encode_chunks(data, version, parent, meta, chunk_bytes=chunk_bytes)]


def test_chunks_respect_size_and_carry_their_descriptor_in_the_value() -> None:
    data = os.urandom(4321)
    encoded = encode_chunks(data, 7, 6, {"n_items": 5}, chunk_bytes=1000)
    assert len(encoded) == 5
    assert [k for k, _ in encoded] == [chunk_key(7, i) for i in range(5)]
    unpacked = [model_envelope.unpack(v) for _, v in encoded]
    assert all(len(payload) <= 1000 for _, payload in unpacked)
    assert b"".join(payload for _, payload in unpacked) == data
    assert all(d[F_SHA] == hashlib.sha256(data).hexdigest() for d, _ in unpacked)
    assert [d[F_CHUNK] for d, _ in unpacked] == list(range(5))
    assert unpacked[0][0][F_META] == {"n_items": 5} and all(F_META not in d for d, _ in unpacked[1:])


def test_a_full_chunk_with_its_envelope_stays_under_the_brokers_default_limit() -> None:
    meta = {"version": 7, "parent_version": 6, "n_items": 10**6, "loss": 6.5, "source": "x" * 200}
    (_, value), *_ = encode_chunks(os.urandom(CHUNK_BYTES * 2), 7, 6, meta)
    assert CHUNK_BYTES < len(value) < CHUNK_BYTES + 1024 < 1_000_000


def test_empty_payload_is_one_chunk() -> None:
    chunks = _chunks(b"")
    assert len(chunks) == 1
    got = Assembler().add(chunks[0])
    assert got is not None and got.data == b""


def test_reassembles_in_any_order_with_duplicates() -> None:
    data = os.urandom(9999)
    chunks = _chunks(data, meta={"a": 1})
    shuffled = chunks + chunks[:3]  # at-least-once delivery may repeat chunks
    random.Random(1).shuffle(shuffled)
    asm = Assembler()
    results = [r for r in (asm.add(c) for c in shuffled) if r is not None]
    assert len(results) >= 1
    assert results[0].data == data and results[0].version == 3 and results[0].parent == 2
    assert results[0].meta == {"a": 1}


def test_interleaved_versions() -> None:
    a, b = os.urandom(3000), os.urandom(2500)
    ca, cb = _chunks(a, version=4), _chunks(b, version=5)
    asm = Assembler()
    done = {}
    for x, y in zip(ca, cb + [None] * (len(ca) - len(cb))):
        for c in (x, y):
            if c is not None and (r := asm.add(c)) is not None:
                done[r.version] = r.data
    assert done == {4: a, 5: b}
    assert asm.pending_versions == []


def test_corrupted_chunk_is_refused_by_checksum() -> None:
    data = os.urandom(3000)
    chunks = _chunks(data)
    bad = chunks[1].__class__(**{**chunks[1].__dict__, "payload": bytes(len(chunks[1].payload))})
    asm = Assembler()
    with pytest.raises(ModelSyncError) as info:
        for c in [chunks[0], bad, *chunks[2:]]:
            asm.add(c)
    assert info.value.reason == R_CHECKSUM


def test_truncated_chunk_is_refused() -> None:
    data = os.urandom(3000)
    chunks = _chunks(data)
    cut = chunks[-1].__class__(**{**chunks[-1].__dict__, "payload": chunks[-1].payload[:-1]})
    asm = Assembler()
    with pytest.raises(ModelSyncError) as info:
        for c in [*chunks[:-1], cut]:
            asm.add(c)
    assert info.value.reason == R_CHECKSUM


def test_values_that_are_not_chunk_envelopes_are_refused() -> None:
    (k, v), = encode_chunks(b"x", 1, 0)
    descriptor, payload = model_envelope.unpack(v)
    cases = {
        R_ENVELOPE: [None, b"", b"v", b"\x00" * 64, v[:len(model_envelope.MAGIC) + 2],  # not one, or cut short
                     model_envelope.MAGIC + struct.pack(">BI", PROTOCOL, 10**6) + b"{}",  # length beyond the value
                     model_envelope.MAGIC + struct.pack(">BI", PROTOCOL, 3) + b"{{{x",  # descriptor not JSON
                     model_envelope.MAGIC + struct.pack(">BI", PROTOCOL, 2) + b"[]x",  # not an object
                     model_envelope.pack({**descriptor, F_CHUNK: 5}, payload),  # index beyond the count
                     model_envelope.pack({**descriptor, "version": "1"}, payload),  # a number as text
                     model_envelope.pack({**descriptor, "size": True}, payload),
                     model_envelope.pack({k2: x for k2, x in descriptor.items() if k2 != F_SHA}, payload)],
        R_PROTOCOL: [model_envelope.MAGIC + struct.pack(">BI", 99, 2) + b"{}x"],
    }
    for reason, values in cases.items():
        for value in values:
            with pytest.raises(ModelSyncError) as info:
                decode_chunk(k, value)
            assert info.value.reason == reason, value
    assert decode_chunk(k, v).payload == b"x"


def test_pending_versions_are_bounded() -> None:
    asm = Assembler(max_pending=2)
    for v in range(1, 6):
        asm.add(_chunks(os.urandom(2000), version=v)[0])  # only the first of two chunks
    assert asm.pending_versions == [4, 5]


def test_version_must_be_positive() -> None:
    with pytest.raises(ValueError):
        encode_chunks(b"x", 0, 0)


def _rec(ids: list[str], layers: tuple[int, ...] = (8,), version: int = 1):
    from model.network import GRU4RecNet
    from model.params import GRU4RecParams
    from model.recommender import Recommender
    from model.vocab import Vocabulary

    return Recommender(GRU4RecNet(len(ids), GRU4RecParams(layers=layers)), Vocabulary(ids), version=version)


def test_compatibility_rules() -> None:
    cur = _rec(["a", "b", "c"])
    check_compatible(cur, _rec(["a", "b", "c", "d"], version=2))  # grown vocabulary: fine
    check_compatible(None, _rec(["x"]))
    with pytest.raises(ModelSyncError) as info:
        check_compatible(cur, _rec(["a", "c", "b", "d"], version=2))
    assert info.value.reason == R_VOCAB
    with pytest.raises(ModelSyncError) as info:
        check_compatible(cur, _rec(["a", "b"], version=2))
    assert info.value.reason == R_VOCAB
    with pytest.raises(ModelSyncError) as info:
        check_compatible(cur, _rec(["a", "b", "c"], layers=(16,), version=2))
    assert info.value.reason == R_STATE


class _MessageWithUnreadableHeaders:
    """A consumed message as confluent-kafka 2.16.1 gives one whose header name is not UTF-8 (against a real
    broker, Message.headers() raised SystemError chained to the UnicodeDecodeError, or crashed later)."""

    def __init__(self, value: bytes) -> None:
        self._value = value

    def key(self) -> bytes:
        return chunk_key(1, 0)

    def value(self) -> bytes:
        return self._value

    def headers(self) -> list:
        raise AssertionError("a models-topic reader called Message.headers()")


def test_reading_a_message_never_calls_headers() -> None:
    (_, v), = encode_chunks(b"chunk", 1, 0)
    assert message_chunk(_MessageWithUnreadableHeaders(v)).payload == b"chunk"
    with pytest.raises(ModelSyncError) as info:
        message_chunk(_MessageWithUnreadableHeaders(b"chunk"))
    assert info.value.reason == R_ENVELOPE
