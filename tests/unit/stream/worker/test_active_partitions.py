"""The request path's view of this worker's active partitions: asked of faust's assignor once per rebalance,
never cached while one is under way."""

from __future__ import annotations

from dataclasses import dataclass, field

from faust.types import TP

from stream.worker.partitions import ActivePartitions

CHANGELOG = "gruflow-state-changelog"


@dataclass
class App:
    """faust's public rebalance bookkeeping (app.rebalancing, rebalancing_count, consumer_generation_id) and
    an assignor whose answer the test changes as the consumer thread would."""

    actives: set[TP] = field(default_factory=set)
    rebalancing: bool = False
    rebalancing_count: int = 0
    consumer_generation_id: int = 0
    asked: int = 0

    @property
    def assignor(self) -> "App":
        return self

    def assigned_actives(self) -> set[TP]:
        self.asked += 1
        return set(self.actives)

    def rebalance(self, partitions: list[int], *, finish: bool = True) -> None:
        self.rebalancing = True  # on_rebalance_start
        self.rebalancing_count += 1
        self.actives = {TP(CHANGELOG, p) for p in partitions} | {TP("gruflow-clicks", p) for p in partitions}
        self.consumer_generation_id += 1  # on_partitions_assigned
        if finish:
            self.rebalancing = False  # on_rebalance_end, after the tables recovered


def test_the_assignment_is_asked_once_per_rebalance() -> None:
    app = App()
    actives = ActivePartitions(app, CHANGELOG)
    assert actives.get() == frozenset() and app.asked == 1
    app.rebalance([0, 2])
    for _ in range(100):
        assert 2 in actives and 1 not in actives
    assert actives.get() == {0, 2} and app.asked == 2
    app.rebalance([1])
    assert actives.get() == {1} and 2 not in actives and app.asked == 3


def test_during_a_rebalance_every_call_asks_the_assignor() -> None:
    app = App()
    actives = ActivePartitions(app, CHANGELOG)
    app.rebalance([0, 1])
    assert actives.get() == {0, 1}
    app.rebalance([0, 1], finish=False)
    app.actives = {TP(CHANGELOG, 0)}  # the new assignment arrives while the rebalance goes on
    assert 1 not in actives and actives.get() == {0}
    asked = app.asked
    actives.get()
    assert app.asked == asked + 1  # not cached while rebalancing
    app.rebalancing = False
    assert actives.get() == {0} and 1 not in actives


def test_a_set_read_as_a_rebalance_starts_is_not_kept_past_it() -> None:
    app = App()
    app.rebalance([0, 1])

    class Racing(App):
        def assigned_actives(self) -> set[TP]:  # a rebalance starts and ends between the key and the read
            out = super().assigned_actives()
            if self.asked == 1:
                self.rebalance([1])
            return out

    racing = Racing(actives=set(app.actives), rebalancing_count=1, consumer_generation_id=1)
    actives = ActivePartitions(racing, CHANGELOG)
    assert actives.get() == {0, 1}  # what the assignor said when asked
    assert actives.get() == {1}  # the next call sees the new generation
