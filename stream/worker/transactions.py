"""exactly_once: faust's transaction manager, made to survive what a takeover does to a worker's producers.

Two things happen to the transactional producers of a worker whose partitions moved while it was not
looking (a network cut, a paused VM, a long stop-the-world; the SIGSTOP test stands in for them): the
new owner fences them, by opening the same transactional ids with a newer epoch, and the worker learns
that it lost the partitions only at its next heartbeat. ``FreshTransactionManager`` handles both sides:

- **a fenced commit is not a crash when a rebalance follows.** faust answers ``ProducerFenced`` at commit
  with ``app.crash``, which stops the worker. Being fenced by a new owner only says what the heartbeat
  will say a moment later: the broker has aborted the open transactions (their outputs never reach a
  ``read_committed`` reader, their offsets are not committed, and the new owner answers those events), so
  the commit reports failure, the worker logs a warning and counts it, and the rebalance that follows
  seeks back to the committed offsets and gives it new producers. The same error also means a transaction
  that timed out while the worker still owns its partitions; then no rebalance comes, faust already counts
  the offsets as committed, and only a restart goes back to the broker's: when no rebalance has begun
  within ``fence_grace_s``, the worker crashes as faust would have.
- **every rebalance starts every transactional producer afresh** (below).
"""

from __future__ import annotations

import logging
import asyncio
from collections import defaultdict
from typing import Any, Callable, Mapping, MutableMapping, Set

from aiokafka.errors import ProducerFenced
from faust.transport.consumer import TransactionManager
from faust.types import TP

from stream import compat

log = logging.getLogger("gruflow.worker")


def transactional_id(app: Any, topic: str, partition: int) -> str:
    """faust's transactional id of a partition's transaction (its TransactionManager's naming, pinned by
    ``test_the_sink_computes_faust_transactional_ids``): what the sink sends in and the commit commits."""
    return f"{app.conf.id}-{app.assignor.group_for_topic(topic)}-{partition}"


class FreshTransactionManager(TransactionManager):
    """faust's transaction manager with a commit that survives being fenced, and fresh producers per rebalance.

    faust keeps the producer of a transactional id across a rebalance unless it counts the partition as
    revoked, and it kept the producers of the partitions a worker handed over when a second worker joined
    (no stop was logged). That worker fenced them (a new producer epoch for the same transactional id),
    and when the partitions came back (that worker killed), faust reused the fenced producers: begin
    failed ("Invalid state transition IN_TRANSACTION", logged and ignored) and the first batch's send
    failed ("Can't send messages while not in transaction"), which stopped the worker. A producer that
    lost its partition for a while (a network cut) is fenced the same way. A new producer per rebalance
    is always valid, and nothing is lost: the revocation committed every acked batch, and nothing is sent
    between the revocation and the next generation's seek."""

    # called once per fenced commit or send (the worker counts them: gruflow_transactions_fenced_total)
    on_fenced: Callable[[], None] | None = None
    # seconds a fenced worker waits for its rebalance to begin before it crashes (the worker sets two
    # session timeouts: the broker drops a member that missed its heartbeats within one)
    fence_grace_s: float = 30.0

    async def on_rebalance(self, assigned: Set[TP], revoked: Set[TP], newly_assigned: Set[TP]) -> None:
        producers = compat.transaction_producers(self.producer)
        for transactional_id in list(producers):
            await self.producer.stop_transaction(transactional_id)
        await super().on_rebalance(assigned, revoked, newly_assigned)

    async def commit(self, offsets: Mapping[TP, int], start_new_transaction: bool = True) -> bool:
        """Commit each partition's offsets in the transaction of its transactional id (faust's naming, as
        ``TransactionalSink`` sends); False when a newer producer fenced one of them."""
        by_transactional_id: MutableMapping[str, MutableMapping[TP, int]] = defaultdict(dict)
        for tp, offset in offsets.items():
            by_transactional_id[transactional_id(self.app, tp.topic, tp.partition)][tp] = offset
        if not by_transactional_id:
            return True
        try:
            await self.producer.commit_transactions(by_transactional_id, self.app.conf.id,
                                                    start_new_transaction=start_new_transaction)
        except ProducerFenced as exc:
            self.fenced(exc)
            return False
        return True

    def fenced(self, exc: BaseException) -> None:
        """A commit or a batch's send was fenced: logged and counted (``on_fenced``), and the app crashed as
        faust would unless a rebalance begins within ``fence_grace_s``."""
        log.warning("exactly_once: a newer producer holds this worker's transactional ids (its partitions moved "
                    "while it stood still, or a transaction timed out); the open transactions are aborted; this "
                    "worker waits up to %.0f s for the rebalance", self.fence_grace_s)
        if self.on_fenced is not None:
            self.on_fenced()
        asyncio.ensure_future(self._rebalance_or_crash(exc, self.app.rebalancing_count))

    async def _rebalance_or_crash(self, exc: BaseException, count_when_fenced: int) -> None:
        """Crash the app (faust's answer to a fence) unless a rebalance begins within ``fence_grace_s``."""
        app = self.app
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.fence_grace_s
        while loop.time() < deadline:
            if app.rebalancing or app.rebalancing_count != count_when_fenced:
                return
            await asyncio.sleep(0.1)
        log.error("exactly_once: fenced, and no rebalance began within %.0f s (a transaction timeout?): stopping "
                  "the worker so that it restarts from the committed offsets", self.fence_grace_s)
        await app.crash(exc)
