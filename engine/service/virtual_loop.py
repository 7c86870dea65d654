"""Running a simulated engine on virtual time, as fast as the CPU allows and deterministically.

`VirtualTimeLoop(clock)` is an asyncio event loop whose `time()` is the simulated engine's
`VirtualClock`: when nothing is ready to run it does not wait for the next timer, it moves the clock
to it, so `asyncio.sleep` (the preset driver's arrivals and timeline, pauses, polls) takes simulated
time only. `InlineAsyncEngine` is the `AsyncEngine` interface with the iterations stepped by a task
on that loop instead of a worker thread: everything runs in one thread in a fixed order, so the same
preset and seed give the same run. Use them together (`run_virtual(coro, clock)`).
"""
from __future__ import annotations

import asyncio
import selectors
import time
from typing import Any, Awaitable, Callable, TypeVar

from batchdeck.engine.llm_engine import LLMEngine, RequestOutput
from batchdeck.engine.service.async_engine import AsyncEngine

T = TypeVar("T")
DRAIN_TURNS = 64  # loop turns at most between two iterations for work due by then (a bound against a busy poll)


class _VirtualSelector:
    """Polls real I/O without waiting; a wait for a timer becomes a jump of the virtual clock."""

    def __init__(self, clock: Any):
        self._selector = selectors.DefaultSelector()
        self._clock = clock

    def select(self, timeout: float | None = None):
        events = self._selector.select(0)
        if events or timeout == 0:
            return events
        if timeout is None:  # no timer at all: only another thread can wake the loop
            return self._selector.select(None)
        self._clock.sleep(timeout)
        return []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._selector, name)


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self, clock: Any):
        super().__init__(_VirtualSelector(clock))
        self._virtual_clock = clock

    def time(self) -> float:
        return self._virtual_clock()

    def quiet_until(self) -> float:
        """Nothing can run before this virtual time: no callback is ready and the first timer is then
        (inf when there is none). A stepper may keep stepping, without yielding, until the clock gets there."""
        if self._ready:
            return float("-inf")
        return self._scheduled[0].when() if self._scheduled else float("inf")


def run_virtual(main: Awaitable[T], clock: Any) -> T:
    """`asyncio.run(main)` on a `VirtualTimeLoop` reading `clock`."""
    with asyncio.Runner(loop_factory=lambda: VirtualTimeLoop(clock)) as runner:
        return runner.run(main)


class InlineAsyncEngine(AsyncEngine):
    """Steps the engine in the event loop's thread. A coroutine runs only between iterations, so
    `call(fn)` runs `fn(engine)` at once (it is already an iteration boundary).

    On a `VirtualTimeLoop` it keeps stepping without yielding while nothing else could run (no ready
    callback, no timer due), and a request's stream gets its tokens in one delta when it finishes
    (virtual time has no wall-clock moments in between to stream them at; nothing waits on a partial
    stream but a console, which runs on a paced clock instead). Both only cut the CPU per iteration;
    what runs, and at which simulated time, is unchanged. Between two iterations it yields until
    nothing due by the current simulated time is left to run, so an arrival is planned at the first
    iteration boundary after it, however many loop turns its submission takes.
    """

    def __init__(self, engine: LLMEngine, snapshot_interval: float = 0.25):
        super().__init__(engine, snapshot_interval)
        self._task: asyncio.Task | None = None
        self._kick: asyncio.Event | None = None
        self._held: dict[str, list[int]] = {}  # tokens of unfinished requests, delivered when they finish

    # start()/stop() are AsyncEngine's, freeze included (here it saves CPU time, the collector walking less)
    def _launch(self) -> None:
        self._kick = asyncio.Event()
        self._task = self._loop.create_task(self._run())

    async def _join(self) -> None:
        if self._kick is not None:
            self._kick.set()
        if self._task is not None:
            await self._task

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def call(self, fn: Callable[[LLMEngine], Any]) -> Any:
        result = fn(self.engine)
        if self._kick is not None:
            self._kick.set()
        return result

    def _deliver(self, outputs, finished=()) -> None:
        for observe in self.finished_observers:
            for r in finished:
                observe(r)
        streams = self._streams
        for out in outputs:
            stream = streams.get(out.request_id)
            if stream is None:
                continue
            pending = self._held.get(out.request_id)
            if not out.finished:
                if pending is None:
                    self._held[out.request_id] = list(out.new_token_ids)
                else:
                    pending.extend(out.new_token_ids)
                continue
            if pending:
                self._held.pop(out.request_id)
                pending.extend(out.new_token_ids)
                out = RequestOutput(out.request_id, pending, True, out.finish_reason)
            stream._put(out)
            del streams[out.request_id]

    def deliver_abort(self, request_id: str, reason: str = "abort") -> None:
        stream = self._streams.get(request_id)
        pending = self._held.pop(request_id, None)
        if stream is not None and pending:
            stream._put(RequestOutput(request_id, pending, False))
        super().deliver_abort(request_id, reason)

    async def _run(self) -> None:
        engine = self.engine
        kick = self._kick
        sleep = asyncio.sleep
        quiet_until = getattr(self._loop, "quiet_until", None)
        clock = engine.clock
        resolution = getattr(self._loop, "_clock_resolution", 1e-9)
        while not self._stop.is_set():
            if self.paused or not engine.has_unfinished:
                kick.clear()
                await kick.wait()
                continue
            try:
                result = engine.step()
            except Exception as exc:  # noqa: BLE001 - reported, engine stops stepping
                self._report_failure(exc)
                continue
            if result is None:
                kick.clear()
                try:
                    await asyncio.wait_for(kick.wait(), self._idle_wait_s())
                except asyncio.TimeoutError:
                    pass
                continue
            self._publish_requests(time.monotonic())
            if result.outputs:
                self._deliver(result.outputs, result.finished)
            if quiet_until is None:
                await sleep(0)
                continue
            # Before the next iteration starts, let run whatever is due by now: an arrival's timer, the
            # task it wakes, the task that submits the request, each a turn of the loop (a real engine's
            # next step sees what arrived while the previous one ran). Nothing due: it starts at once.
            for _ in range(DRAIN_TURNS):
                if self.paused or clock() + resolution < quiet_until():
                    break
                await sleep(0)
