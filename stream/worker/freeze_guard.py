"""Hold a worker's outputs after the worker itself stood still longer than its group session allows.

A worker that is frozen (SIGSTOP, a paused VM, a long stop-the-world) past ``broker_session_timeout_s``
has been dropped from the consumer group and its partitions given to another member, but it does not know
that until its next heartbeat. Under at_least_once nothing fences it: the batch it had in hand, and any
records its fetcher still buffered, would be answered and written to the state changelog from its stale
state, AFTER the new owner's writes, so the changelog would end with an older state for those users
(transactions fence such a "zombie" under exactly_once; here it must fence itself).

Invariant kept by the worker: no output of a batch leaves the worker while ``hold_s()`` is positive; it
waits until the rebalance that follows a freeze has begun (the batch is then dropped unacked, and the
group's seek rewinds to it) or until a whole session timeout has passed since the freeze ended with the
worker still a member (its heartbeats were accepted, so its partitions are still its own).

A freeze is seen as a gap between two ``tick()`` calls (a timer on the event loop) or between the last
tick and ``hold_s()``, whichever the loop runs first after the freeze. Not covered: outputs already handed
to the producer before the freeze, which go out as soon as the process runs again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

log = logging.getLogger("gruflow.worker")


@dataclass
class FreezeGuard:
    session_timeout_s: float
    clock: Callable[[], float] = time.monotonic
    # called once per freeze seen (the worker counts them: gruflow_worker_freezes_total)
    on_freeze: Callable[[], object] | None = None
    _last: float | None = field(init=False, default=None)  # None until the first look: start-up is no freeze
    _thawed_at: float | None = field(init=False, default=None)
    freezes: int = field(init=False, default=0)

    @property
    def tick_interval_s(self) -> float:
        """How often ``tick`` must run for a gap of half a session to mean a freeze, not a late timer."""
        return max(0.05, self.session_timeout_s / 8)

    def tick(self) -> None:
        now = self.clock()
        # the loop stood still: the session may have expired
        if self._last is not None and now - self._last > self.session_timeout_s / 2:
            self._thawed_at = now
            self.freezes += 1
            if self.on_freeze is not None:
                self.on_freeze()
        self._last = now

    def hold_s(self) -> float:
        """Seconds outputs must still wait (0: none). A freeze seen here counts like one seen by ``tick``."""
        self.tick()
        if self._thawed_at is None:
            return 0.0
        return max(0.0, self._thawed_at + self.session_timeout_s - self.clock())

    async def wait_out(self, still_member: Callable[[], bool], n_events: int) -> bool:
        """After a freeze: wait until the group's rebalance has begun (``still_member()`` False: returns False,
        the batch is dropped unacked and the seek that ends the rebalance rewinds to it) or the hold has passed
        with the worker still a member (True: its outputs may go out)."""
        log.warning("this worker stood still for more than half its session timeout: a batch of %d events "
                    "waits up to %.1f s for the group to settle before its outputs go out", n_events, self.hold_s())
        while (hold := self.hold_s()) > 0 and still_member():
            await asyncio.sleep(min(0.1, hold))
        if still_member():
            return True
        log.info("rebalance after a freeze: a batch of %d events dropped unacked, it will be processed again",
                 n_events)
        return False
