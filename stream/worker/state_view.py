"""The users' states as the worker last decided them (read-your-writes): the states of batches still in
flight (pipelined at_least_once: produced, not yet delivered nor written to RocksDB) over RocksDB, and per
input partition the offset below which every event is reflected in them."""

from __future__ import annotations

import asyncio
from typing import Any

from state.codec import decode as decode_state


class StateView:
    """``overlay``: key -> (batch seq, encoded state | None) of the batches in flight; ``applied``: input
    (topic, partition) -> next offset whose event the states read here reflect."""

    def __init__(self, store: Any, app: Any) -> None:
        self.store, self.app = store, app
        self.overlay: dict[bytes, tuple[int, bytes | None]] = {}
        self.applied: dict[tuple[str, int], int] = {}
        self._advanced: asyncio.Event | None = None  # set (and replaced) after each batch: wakes waits

    def read(self, partition: int, keys: list[bytes], db: Any = None) -> dict[bytes, Any]:
        """States as the worker last decided them: in-flight batches' states first, then RocksDB. ``db``: the
        partition's handle (``store.partition_db``) when called from another thread (the request
        thread's reads): the overlay is read key by key there, each lookup atomic, and a key
        leaves it only after its state is in RocksDB (``settle``), so such a read never goes back in time
        short of a rebalance dropping the batches in flight (``reset``), as for reads on the loop."""
        overlay = self.overlay
        get = self.store.get_partition if db is None else lambda _p, ks: self.store.get_from(db, ks)
        if not overlay:
            return get(partition, keys)
        out: dict[bytes, Any] = {}
        rest: list[bytes] = []
        for key in keys:
            hit = overlay.get(key)
            if hit is None:
                rest.append(key)
            elif hit[1] is not None:
                out[key] = decode_state(hit[1])
        out.update(get(partition, rest))
        return out

    def stage(self, seq: int, local: dict[int, list[tuple[bytes, bytes | None]]]) -> None:
        """Batch ``seq``'s writes, visible to the batches after it until they are in RocksDB."""
        overlay = self.overlay
        for recs in local.values():
            for key, raw in recs:
                overlay[key] = (seq, raw)

    def settle(self, seq: int, recs: list[tuple[bytes, bytes | None]]) -> None:
        """Batch ``seq``'s writes of one partition are in RocksDB: their keys leave the overlay unless a
        later batch wrote them since."""
        overlay = self.overlay
        for key, _raw in recs:
            if overlay.get(key, (0,))[0] == seq:
                del overlay[key]

    def reset(self) -> None:
        """A new generation: the consumer seeks back to the committed offsets."""
        self.overlay.clear()
        self.applied.clear()

    def mark_applied(self, offsets: list[tuple[Any, list[int]]]) -> None:
        """The batch's states are now what ``read`` returns: its offsets count as applied."""
        for tp, offs in offsets:
            if offs:
                key = (tp.topic, tp.partition)
                self.applied[key] = max(self.applied.get(key, 0), max(offs) + 1)
        if self._advanced is not None:
            self._advanced.set()
            self._advanced = None

    def position(self, topic: str, partition: int) -> int:
        """Offset of one input partition below which every event is reflected in the states read here."""
        from faust.types import TP

        resumed = getattr(self.app.consumer, "resumed_at", {}).get(TP(topic, partition)) or 0
        return max(resumed, self.applied.get((topic, partition), 0))

    async def wait_applied(self, ends: dict[tuple[str, int], int]) -> None:
        """Return once every event below ``ends`` (input partition -> offset) is reflected in the states
        (the caller bounds the wait)."""
        while any(self.position(t, p) < end for (t, p), end in ends.items()):
            if self._advanced is None:
                self._advanced = asyncio.Event()
            await self._advanced.wait()
