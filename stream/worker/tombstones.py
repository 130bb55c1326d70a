"""Users a batch deletes: those idle past the TTL, and those named by ``gruflow forget``. Each deletion is a
changelog tombstone sent with the batch's other outputs (so in exactly_once mode it is in the same
transaction) and a RocksDB delete written with its states.

TTL (settings.worker.state_ttl_s > 0) uses EVENT time: a user whose newest event is more than the TTL
older than the newest event this worker has seen is evicted. ``StateTtl.scan`` lists candidates per
partition now and then; the next batch of that partition re-checks and deletes them (``StateTtl.evict``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

from state.codec import HEADER_SIZE
from stream.worker.batch_consumer import Batch
from stream.worker.sinks import Outgoing

log = logging.getLogger("gruflow.worker")
_LAST_TS_AT = 13  # byte offset of last_ts_ms in a state record (state/codec.py), read without decoding
Writes = dict[int, list[tuple[bytes, bytes | None]]]  # partition -> RocksDB writes (None: delete)


def deleted_keys(local: Writes) -> list[bytes]:
    """The users whose state ``local`` deletes."""
    return [key for recs in local.values() for key, raw in recs if raw is None]
ReadStates = Callable[[int, list[bytes]], dict[bytes, Any]]  # (partition, keys) -> states as last decided


class StateTtl:
    """The TTL's candidates (partition -> keys idle at the last scan) and the two halves that use them."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_ms = int(ttl_s * 1000)
        self.candidates: dict[int, set[bytes]] = {}

    async def scan(self, stream_time_ms: int, partitions: list[int], store: Any, lock: asyncio.Lock) -> None:
        """List idle users per partition (event time); the partition's next batch deletes them. Each
        partition is read under ``lock`` (no batch writes it meanwhile), and the loop yields in between."""
        if self.ttl_ms <= 0 or not stream_time_ms:
            return
        cutoff = stream_time_ms - self.ttl_ms
        for p in partitions:
            cands: set[bytes] = set()
            async with lock:
                for key, raw in store.iter_partition(p):
                    if len(raw) >= HEADER_SIZE and \
                            int.from_bytes(raw[_LAST_TS_AT:_LAST_TS_AT + 6], "little", signed=True) < cutoff:
                        cands.add(key)
            if cands:
                self.candidates.setdefault(p, set()).update(cands)
            await asyncio.sleep(0)

    def evict(self, batch: Batch, touched: dict[bytes, int], stream_time_ms: int, read: ReadStates, out: Outgoing,
              local: Writes) -> int:
        """Tombstones for the candidates of the batch's partitions that are still idle (users ``touched`` by
        the batch are alive); returns how many."""
        if not self.candidates or self.ttl_ms <= 0:
            return 0
        cutoff = stream_time_ms - self.ttl_ms
        n = 0
        for tp, _ in batch:
            cands = self.candidates.pop(tp.partition, None)
            if not cands:
                continue
            keys = [k for k in cands if k not in touched]
            for key, st in read(tp.partition, keys).items():
                if st.last_ts_ms < cutoff:
                    out.changelog[tp.partition].append((key, None))
                    local[tp.partition].append((key, None))
                    n += 1
        return n


def forget_users(forget: dict[int, list[bytes]], batch_states: dict[bytes, Any], read: ReadStates, out: Outgoing,
                 local: Writes) -> int:
    """``gruflow forget``: tombstone each named user after this batch's own writes (the request wins over
    events of the same batch). The changelog always gets the tombstone; RocksDB deletes only keys that
    exist, so the user count stays exact. Returns how many users were named."""
    n = 0
    for p, keys in forget.items():
        present = set(read(p, [k for k in keys if k not in batch_states]))
        for key in dict.fromkeys(keys):
            out.changelog[p].append((key, None))
            if key in batch_states or key in present:
                local[p].append((key, None))
        n += len(set(keys))
    log.info("forgot %d user(s) on request", n)
    return n
