"""The models-topic chunk protocol without a broker: split, reassemble, verify, refuse."""

from __future__ import annotations

import hashlib
import os
import random

import pytest

from stream.online.model_sync import (H_CHUNK, H_META, H_SHA, PROTOCOL, R_CHECKSUM, R_HEADER, R_PROTOCOL, R_STATE, R_VOCAB,
                               Assembler, ModelSyncError, check_compatible, chunk_key, decode_chunk, encode_chunks,
                               message_chunk)


def _chunks(data: bytes, version: int = 3, parent: int = 2, chunk_bytes: int = 1000, meta: dict | None = None):
    return [decode_chunk(k, v, h) for k, v, h in encode_chunks(data, version, parent, meta, chunk_bytes=chunk_bytes)]


def test_chunks_respect_size_and_carry_headers() -> None:
    data = os.urandom(4321)
    encoded = encode_chunks(data, 7, 6, {"n_items": 5}, chunk_bytes=1000)
    assert len(encoded) == 5
    assert all(len(v) <= 1000 for _, v, _ in encoded)
    assert b"".join(v for _, v, _ in encoded) == data
    assert [k for k, _, _ in encoded] == [chunk_key(7, i) for i in range(5)]
    headers = [dict(h) for _, _, h in encoded]
    assert all(h[H_SHA].decode() == hashlib.sha256(data).hexdigest() for h in headers)
    assert [int(h[H_CHUNK]) for h in headers] == list(range(5))
    assert H_META in headers[0] and all(H_META not in h for h in headers[1:])


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


def test_bad_headers() -> None:
    with pytest.raises(ModelSyncError) as info:
        decode_chunk(b"k", b"v", [])
    assert info.value.reason == R_HEADER
    (k, v, h), = encode_chunks(b"x", 1, 0)
    h2 = [(name, b"99" if name == "gruflow-protocol" else val) for name, val in h]
    with pytest.raises(ModelSyncError) as info:
        decode_chunk(k, v, h2)
    assert info.value.reason == R_PROTOCOL
    h3 = [(name, b"5" if name == H_CHUNK else val) for name, val in h]  # index beyond count
    with pytest.raises(ModelSyncError) as info:
        decode_chunk(k, v, h3)
    assert info.value.reason == R_HEADER
    assert PROTOCOL == 1


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
    """A consumed message as confluent-kafka 2.16.1 gives one whose header name is not UTF-8 (seen against a
    real broker: Message.headers() raises SystemError chained to the UnicodeDecodeError)."""

    def key(self) -> bytes:
        return b"1/0"

    def value(self) -> bytes:
        return b"chunk"

    def headers(self) -> list:
        try:
            b"\xff\xfe".decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SystemError("<method 'headers'> returned a result with an exception set") from exc
        return []


def test_a_message_whose_headers_cannot_be_read_is_a_bad_header() -> None:
    with pytest.raises(ModelSyncError) as info:
        message_chunk(_MessageWithUnreadableHeaders())
    assert info.value.reason == R_HEADER
    assert "utf-8" in str(info.value)
