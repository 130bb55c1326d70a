"""Whether the stream's event loop still turns, for ``/livez``.

The worker's endpoints run on a thread of their own, so an answer from ``/livez`` alone says that the
process runs, not that the stream's loop does. A loop stuck in a blocking call or a deadlock would keep
answering while consuming nothing, and the kubelet would never restart it. ``LoopHeartbeat`` stamps the time from a
callback on the stream's loop every ``interval_s``; ``/livez``, on the endpoints' thread, fails once the
last stamp is older than ``stall_s``. It counts only while armed: from the moment the worker's loop runs
for good (start-up runs the loop in pieces, with model loading in between, which the startup probe
covers) until the worker stops.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable


class LoopHeartbeat:
    """Stamps written on the watched loop, read from any thread (one float: a read never sees half a write)."""

    def __init__(self, stall_s: float, interval_s: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.stall_s = float(stall_s)  # 0 or less: never fails
        self.interval_s = float(interval_s)
        self._clock = clock
        self._last: float | None = None  # None: not armed
        self._timer: asyncio.TimerHandle | None = None

    def arm(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start stamping on ``loop`` (from the loop's own thread, or before it runs)."""
        self._last = self._clock()
        loop.call_soon(self._beat, loop)

    def disarm(self) -> None:
        """Stop counting (the worker is stopping: its loop may end at any moment)."""
        self._last = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _beat(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._last is None:
            return
        self._last = self._clock()
        self._timer = loop.call_later(self.interval_s, self._beat, loop)

    def check(self) -> tuple[bool, str]:
        """(alive, reason): not alive once the loop has not stamped for longer than ``stall_s``."""
        last = self._last
        if last is None or self.stall_s <= 0:
            return True, "ok"
        stalled = self._clock() - last
        if stalled > self.stall_s:
            return False, (f"the stream's event loop has not turned for {stalled:.0f} s "
                           f"(GRUFLOW_LIVEZ_STALL_S={self.stall_s:g})")
        return True, "ok"
