"""Where per-user state lives, behind one small interface.

The worker's store is the faust Table adapter in ``stream/worker/table_store.py`` (RocksDB + changelog);
``MemoryStore`` holds the same encoded records in a dict, so unit tests exercise the codec too.
Keys are user ids as UTF-8 bytes (the Kafka message key).
"""

from __future__ import annotations

from typing import Iterable, Iterator, Mapping, Protocol, Sequence

from state.codec import UserState, decode, encode


class StateStore(Protocol):
    def get_many(self, keys: Sequence[bytes]) -> dict[bytes, UserState]:
        """States of the given users; users without state are absent from the result."""
        ...

    def put_many(self, states: Mapping[bytes, UserState]) -> None:
        ...

    def delete(self, key: bytes) -> None:
        """Forget a user (no error when absent)."""
        ...


class MemoryStore:
    """Dict-backed store of encoded records (unit tests, tools)."""

    def __init__(self, items: Iterable[tuple[bytes, UserState]] = ()) -> None:
        self._data: dict[bytes, bytes] = {}
        self.put_many(dict(items))

    def get_many(self, keys: Sequence[bytes]) -> dict[bytes, UserState]:
        data = self._data
        return {k: decode(data[k]) for k in keys if k in data}

    def put_many(self, states: Mapping[bytes, UserState]) -> None:
        for key, state in states.items():
            self._data[key] = encode(state)

    def delete(self, key: bytes) -> None:
        self._data.pop(key, None)

    def raw(self, key: bytes) -> bytes | None:
        return self._data.get(key)

    def __len__(self) -> int:
        return len(self._data)

    def __iter__(self) -> Iterator[bytes]:
        return iter(list(self._data))
