"""This worker's active partitions of the state table, for the request path.

faust's ``assignor.assigned_actives()`` builds a new set of every assigned topic partition on each call;
a request only needs to know whether one partition of the changelog is active here. ``ActivePartitions``
keeps that answer between rebalances.

Invariant: the cached set is the assignor's answer read after the rebalance it belongs to was over, so it
is never older than what ``assigned_actives()`` would say. It is keyed by faust's public rebalance
bookkeeping (``app.rebalancing_count``, ``app.consumer_generation_id``), which the consumer thread
updates in this order: ``on_rebalance_start`` (``rebalancing = True``, count + 1), then the assignor's
new assignment, then the generation (``on_partitions_assigned``), then ``rebalancing = False`` once the
tables have recovered. While ``app.rebalancing`` is true nothing is cached: every call asks the assignor,
as the uncached lookup did, so a partition that moves during a rebalance is forwarded or refused exactly
as before. The key is read before the assignor, so a set read across a change of key is stored under the
older key and dropped by the next call.
"""

from __future__ import annotations

from typing import Any

from stream.worker.upkeep import active_partitions

_NONE: frozenset[int] = frozenset()


class ActivePartitions:
    """The active partitions of ``changelog`` on this worker (faust's assignment), cached per rebalance."""

    def __init__(self, app: Any, changelog: str) -> None:
        self.app = app
        self.changelog = changelog
        self._key: tuple[Any, Any] | None = None
        self._actives = _NONE

    def _read(self) -> frozenset[int]:
        return frozenset(active_partitions(self.app, self.changelog))

    def get(self) -> frozenset[int]:
        app = self.app
        key = (getattr(app, "rebalancing_count", None), getattr(app, "consumer_generation_id", None))
        if getattr(app, "rebalancing", False):
            return self._read()
        if key != self._key:
            self._actives = self._read()
            self._key = key
        return self._actives

    def __contains__(self, partition: int) -> bool:
        return partition in self.get()
