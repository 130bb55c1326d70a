"""exactly_once: faust's transaction manager, made to survive what a takeover does to a worker's producers.

Two things happen to the transactional producers of a worker whose partitions moved while it was not
looking (a network cut, a paused VM, a long stop-the-world; the SIGSTOP test stands in for them): the
new owner fences them, by opening the same transactional ids with a newer epoch, and the worker learns
that it lost the partitions only at its next heartbeat. ``FreshTransactionManager`` handles both sides:

- **a fenced commit is not a crash.** faust answers ``ProducerFenced`` at commit with ``app.crash``, which
  stops the worker (seen in the exactly_once freeze test: the resumed worker's timer commit was fenced and
  the process exited). Being fenced only says what the heartbeat will say a moment later: the broker has
  aborted the open transactions (their outputs never reach a ``read_committed`` reader, their offsets
  are not committed, and the new owner answers those events), so the commit reports failure, the
  worker logs a warning and counts it, and the rebalance that follows gives it new producers.
- **every rebalance starts every transactional producer afresh** (below).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Callable, Mapping, MutableMapping, Set

from aiokafka.errors import ProducerFenced
from faust.transport.consumer import TransactionManager
from faust.types import TP

from stream import compat

log = logging.getLogger("gruflow.worker")


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

    # called once per fenced commit (the worker counts them: gruflow_transactions_fenced_total)
    on_fenced: Callable[[], None] | None = None

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
            group = self.app.assignor.group_for_topic(tp.topic)
            by_transactional_id[f"{self.app.conf.id}-{group}-{tp.partition}"][tp] = offset
        if not by_transactional_id:
            return True
        try:
            await self.producer.commit_transactions(by_transactional_id, self.app.conf.id,
                                                    start_new_transaction=start_new_transaction)
        except ProducerFenced:
            log.warning("exactly_once: a newer producer holds this worker's transactional ids (its partitions "
                        "moved while it stood still); the open transactions are aborted and their events are "
                        "answered by the new owner; this worker waits for the rebalance")
            if self.on_fenced is not None:
                self.on_fenced()
            return False
        return True
