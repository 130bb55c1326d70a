"""/livez of a worker follows its stream's loop: alive while the loop turns (or before it runs for good),
failing with a reason once it has not turned for the configured time, alive again once it turns."""

from __future__ import annotations

import asyncio
import threading
import time

from stream.observe.heartbeat import LoopHeartbeat
from stream.observe.metrics import Metrics
from stream.observe.web import make_web_app


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_loop_that_stops_turning_fails_and_one_that_turns_again_does_not() -> None:
    clock = Clock()
    beat = LoopHeartbeat(stall_s=30.0, interval_s=1.0, clock=clock)
    loop = asyncio.new_event_loop()
    try:
        clock.now += 500
        assert beat.check() == (True, "ok")  # not armed yet: start-up is the startup probe's business
        beat.arm(loop)
        loop.run_until_complete(asyncio.sleep(0))  # the first stamp
        clock.now += 29
        assert beat.check()[0]
        clock.now += 2  # the loop did not run meanwhile
        ok, reason = beat.check()
        assert not ok and "has not turned for 31 s" in reason and "GRUFLOW_LIVEZ_STALL_S=30" in reason
        loop.run_until_complete(asyncio.sleep(1.2))  # it turns again: the timer stamps
        assert beat.check() == (True, "ok")
        beat.disarm()
        clock.now += 3600
        assert beat.check() == (True, "ok")  # stopping: no longer counted
        assert LoopHeartbeat(0.0, clock=clock).check()[0]  # 0 turns the check off
    finally:
        loop.close()


def test_a_loop_blocked_in_its_own_thread_is_seen_from_another() -> None:
    beat = LoopHeartbeat(stall_s=0.3, interval_s=0.05)
    loop = asyncio.new_event_loop()
    beat.arm(loop)  # before the loop runs, as the worker may
    runner = threading.Thread(target=loop.run_forever, daemon=True)
    runner.start()
    release = threading.Event()
    try:
        assert beat.check()[0]
        loop.call_soon_threadsafe(release.wait, 10)  # a blocking call on the loop
        deadline = time.monotonic() + 10
        while beat.check()[0]:
            assert time.monotonic() < deadline, "a blocked loop was never reported"
            time.sleep(0.02)
        release.set()
        deadline = time.monotonic() + 10
        while not beat.check()[0]:
            assert time.monotonic() < deadline, "a loop turning again was not seen"
            time.sleep(0.02)
    finally:
        release.set()
        loop.call_soon_threadsafe(loop.stop)
        runner.join(10)
        loop.close()


def test_livez_answers_503_with_the_reason() -> None:
    from aiohttp.test_utils import TestClient, TestServer

    verdict = [(True, "ok")]

    async def probe() -> list[tuple[int, str]]:
        app = make_web_app(Metrics.create(role="worker"), lambda: (True, "ready"), live=lambda: verdict[0])
        out = []
        async with TestClient(TestServer(app)) as client:
            for now in ((True, "ok"), (False, "the stream's event loop has not turned for 61 s")):
                verdict[0] = now
                resp = await client.get("/livez")
                out.append((resp.status, (await resp.text()).strip()))
        return out

    assert asyncio.run(probe()) == [(200, "ok"), (503, "the stream's event loop has not turned for 61 s")]
