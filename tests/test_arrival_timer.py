"""Precise wall-clock waits for due arrivals: never early, in due order, one helper thread that stops
when closed (and restarts on the next wait), and a replay's player closes its timer when it ends."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest
from batchdeck.engine.service.arrival_timer import ArrivalTimer
from batchdeck.engine.sim.clock import PacedClock
from batchdeck.presets.replay import run_preset


def _arrival_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "batchdeck-arrivals"]


def test_waits_end_in_due_order_and_never_early():
    timer = ArrivalTimer()

    async def main() -> list[tuple[float, float, float]]:
        ended = []

        async def wait(delay: float) -> None:
            start = time.monotonic()
            await timer.sleep(delay)
            ended.append((delay, start, time.monotonic()))

        await asyncio.gather(*(wait(d) for d in (0.03, 0.01, 0.02, 0.0, 0.015, -1.0)))
        return ended

    try:
        ended = asyncio.run(main())
    finally:
        timer.close()
    assert [d for d, _, _ in ended] == [0.0, -1.0, 0.01, 0.015, 0.02, 0.03]  # no wait for nothing due
    assert all(end >= start + delay for delay, start, end in ended)
    assert not timer.running and not _arrival_threads()


def test_on_a_virtual_time_loop_the_loops_own_timer_waits():
    from batchdeck.engine.service.virtual_loop import run_virtual
    from batchdeck.engine.sim.clock import VirtualClock

    timer, clock = ArrivalTimer(), VirtualClock()

    async def main() -> float:
        await timer.sleep(5.0)
        return clock()

    assert run_virtual(main(), clock) == 5.0  # virtual seconds, at once
    assert not timer.running and not _arrival_threads()


def test_a_closed_timer_starts_again_on_the_next_wait():
    timer = ArrivalTimer()
    asyncio.run(timer.sleep(0.001))
    assert timer.running
    timer.close()
    assert not timer.running and not _arrival_threads()
    asyncio.run(timer.sleep(0.001))  # a new loop, a new helper thread
    assert timer.running
    timer.close()
    assert not _arrival_threads()


def test_a_cancelled_wait_leaves_nothing_and_close_cancels_what_waits():
    timer = ArrivalTimer()

    async def main() -> None:
        waiting = asyncio.create_task(timer.sleep(30.0))
        await asyncio.sleep(0)
        assert len(timer._heap) == 1
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert timer._heap == []  # no entry left for the helper thread to sleep on
        stuck = asyncio.create_task(timer.sleep(30.0))
        await asyncio.sleep(0)
        timer.close()  # a wait not yet due ends, cancelled, instead of hanging
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(stuck, 10.0)

    asyncio.run(main())
    assert not _arrival_threads()


def test_an_idle_helper_thread_exits_by_itself():
    timer = ArrivalTimer()
    asyncio.run(timer.sleep(0.001))  # never closed
    deadline = time.monotonic() + 30.0
    while _arrival_threads() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _arrival_threads() and not timer.running
    asyncio.run(timer.sleep(0.001))  # the next wait starts another
    timer.close()


def test_a_replay_in_wall_time_sends_through_the_timer_and_stops_it(paced_preset):
    result = run_preset(paced_preset, clock=PacedClock(4.0), duration_scale=0.2)
    assert result.error is None and result.driver.submitted > 0
    assert result.driver.player._timer is not None  # the arrivals went through it
    assert not result.driver.player._timer.running and not _arrival_threads()
