from __future__ import annotations

import numpy as np
import pytest

from state.codec import (FORMAT_VERSION_RECENT, HEADER_SIZE, StateCodecError, UserState, decode, encode,
                         encoded_size)
from state.store import MemoryStore


def _state(h: int = 100, k: int = 20, seed: int = 0) -> UserState:
    rng = np.random.default_rng(seed)
    return UserState(rng.standard_normal(h).astype(np.float32), 1_700_000_000_123, 7, 42,
                     rng.integers(0, 20_000, size=k).astype(np.int32), [123_456_789_012, -1])


def test_round_trip_keeps_every_field() -> None:
    s = _state()
    back = decode(encode(s))
    np.testing.assert_array_equal(back.hidden, s.hidden)
    np.testing.assert_array_equal(back.recs, s.recs)
    assert (back.last_ts_ms, back.session_events, back.model_version, back.offsets) == \
        (s.last_ts_ms, s.session_events, s.model_version, s.offsets)
    assert back.hidden.dtype == np.float32 and back.recs.dtype == np.int32


def test_record_fits_512_bytes_at_h100_k20() -> None:
    data = encode(_state(100, 20))
    assert len(data) == encoded_size(100, 20) <= 512


def test_state_without_hidden_and_recs() -> None:
    s = UserState(None, 5, 1, 0, np.zeros(0, dtype=np.int32))
    data = encode(s)
    assert len(data) == HEADER_SIZE
    back = decode(data)
    assert back.hidden is None and back.recs.shape == (0,) and back.offsets == [-1, -1]


@pytest.mark.parametrize("cut", [0, 5, HEADER_SIZE, HEADER_SIZE + 3])
def test_truncated_record_is_refused(cut: int) -> None:
    with pytest.raises(StateCodecError):
        decode(encode(_state())[:cut])


def test_unknown_format_version_is_refused() -> None:
    data = bytearray(encode(_state()))
    data[0] = FORMAT_VERSION_RECENT + 1
    with pytest.raises(StateCodecError, match="format version"):
        decode(bytes(data))


def test_out_of_range_values_are_refused() -> None:
    s = _state()
    s.offsets = [1 << 50, 0]
    with pytest.raises(StateCodecError):
        encode(s)
    with pytest.raises(StateCodecError):
        encode(_state(k=300))


def test_memory_store_round_trips_through_the_codec() -> None:
    store = MemoryStore()
    a, b = _state(seed=1), _state(seed=2)
    store.put_many({b"a": a, b"b": b})
    got = store.get_many([b"a", b"b", b"missing"])
    assert set(got) == {b"a", b"b"}
    np.testing.assert_array_equal(got[b"b"].hidden, b.hidden)
    assert store.raw(b"a") == encode(a)
    store.delete(b"a")
    store.delete(b"never")
    assert list(store) == [b"b"] and len(store) == 1


def test_recent_items_round_trip_and_version_1_stays_byte_identical() -> None:
    plain = _state()
    assert encode(plain)[0] == 1  # without recent rows or rule lists: the version-1 bytes
    s = _state()
    s.recent = np.array([7, 3, 11], dtype=np.int32)
    data = encode(s)
    assert data[0] == FORMAT_VERSION_RECENT and len(data) == len(encode(plain)) + 2 + 1 + 4 * 3
    assert len(data) == encoded_size(s.hidden.shape[0], len(s.recs), recent=3)
    assert decode(data).recent.tolist() == [7, 3, 11]
    s.session_items = np.array([4 * 7, 4 * 3 + 1], dtype=np.int32)  # with the rules' lists too
    back = decode(encode(s))
    assert back.recent.tolist() == [7, 3, 11] and back.session_items.tolist() == [28, 13]
    assert decode(encode(plain)).recent is None
    for cut in (1, 5):  # a truncated recent section is refused, not misread
        with pytest.raises(StateCodecError):
            decode(data[:-cut])
