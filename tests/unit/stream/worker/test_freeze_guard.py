"""FreezeGuard with a hand-driven clock: a gap of more than half a session between two looks at the clock
holds outputs for a whole session timeout from the moment the worker runs again; shorter gaps hold nothing."""

from __future__ import annotations

from stream.worker.freeze_guard import FreezeGuard


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _guard(session_s: float = 6.0) -> tuple[FreezeGuard, Clock]:
    clock = Clock()
    g = FreezeGuard(session_s, clock=clock)
    g.tick()
    return g, clock


def test_the_time_before_the_first_look_is_no_freeze() -> None:
    clock = Clock()
    g = FreezeGuard(6.0, clock=clock)  # built with the app; the worker starts, recovers, then runs batches
    clock.now += 60.0
    assert g.hold_s() == 0.0 and g.freezes == 0
    clock.now += 7.0
    assert g.hold_s() == 6.0 and g.freezes == 1


def test_regular_ticks_and_late_timers_hold_nothing() -> None:
    g, clock = _guard()
    for _ in range(100):
        clock.now += g.tick_interval_s
        g.tick()
        assert g.hold_s() == 0.0
    clock.now += 2.9  # a timer late by less than half a session: no freeze
    assert g.hold_s() == 0.0 and g.freezes == 0


def test_a_freeze_seen_by_the_timer_holds_for_a_session_after_the_thaw() -> None:
    g, clock = _guard()
    clock.now += 9.0  # SIGSTOPped for 9 s
    g.tick()
    assert g.freezes == 1 and g.hold_s() == 6.0
    for _ in range(8):  # the worker runs again: its timer ticks every half second
        clock.now += 0.5
        g.tick()
    assert g.hold_s() == 2.0
    clock.now += 2.5
    assert g.hold_s() == 0.0
    assert g.freezes == 1


def test_a_freeze_seen_first_by_the_batch_holds_too() -> None:
    g, clock = _guard(session_s=10.0)
    clock.now += 30.0  # the batch handler runs before the timer after the thaw
    assert g.hold_s() == 10.0
    g.tick()  # the timer then sees no new gap
    assert g.freezes == 1 and g.hold_s() == 10.0


def test_the_tick_interval_sees_half_a_session() -> None:
    assert FreezeGuard(6.0).tick_interval_s < 6.0 / 2
    assert FreezeGuard(0.1).tick_interval_s == 0.05


def test_each_freeze_is_counted_in_the_workers_metrics_from_zero() -> None:
    from pipelinekit import make_rig

    rig = make_rig()  # a real Pipeline (session timeout 600 s) with the worker's own Metrics
    try:
        name = "gruflow_worker_freezes_total"
        assert rig.metrics.registry.get_sample_value(name) == 0.0  # exported from the start, before any freeze
        clock = Clock()
        rig.pipeline.freeze.clock = clock
        rig.pipeline.freeze.tick()
        clock.now += 200.0  # less than half the session: a late timer, no freeze
        rig.pipeline.freeze.tick()
        assert rig.sample(name) == 0.0
        clock.now += 301.0
        assert rig.pipeline.freeze.hold_s() == 600.0
        clock.now += 1.0
        rig.pipeline.freeze.tick()  # the same freeze, seen again: counted once
        assert rig.sample(name) == 1.0
        clock.now += 400.0
        rig.pipeline.freeze.tick()
        assert rig.sample(name) == 2.0 and rig.pipeline.freeze.freezes == 2
    finally:
        rig.close()
