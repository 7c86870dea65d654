"""Wall-clock waits precise to the operating system's timer, for requests sent at a due time.

asyncio's timers fire up to a millisecond late: the selector waits in whole milliseconds, rounded
up. A replay (and calibration's spaced requests) stamps each request with its due time, so that
lateness would count into every request's queue time and TTFT: a simulated engine on a wall clock
queued the burst scenario's requests 1.4 ms at the median with asyncio's timers, 1.0 ms with these
(benchmarks/results/arrival_lateness_cpu.json), against a few milliseconds of TTFT. Here one helper
thread sleeps until the earliest due moment (a condition wait, microsecond timeouts) and wakes the
waiting coroutine through `call_soon_threadsafe`, which wakes the loop at once. Only for loops that
run in wall time: a virtual-time loop's own timers are exact.
"""
from __future__ import annotations

import asyncio
import heapq
import itertools
import threading
import time
from typing import Any

from batchdeck.engine.service.virtual_loop import VirtualTimeLoop


LINGER_S = 1.0  # an idle helper thread waits this long for the next wait before it exits


class ArrivalTimer:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, asyncio.AbstractEventLoop, asyncio.Future]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._stop: threading.Event | None = None

    async def sleep(self, seconds: float) -> None:
        """Return `seconds` from now: of wall time, or on a virtual-time loop of its time (its own timers
        are exact). A cancelled wait leaves nothing behind."""
        if seconds <= 0:
            return
        loop = asyncio.get_running_loop()
        if isinstance(loop, VirtualTimeLoop):
            await asyncio.sleep(seconds)
            return
        fut = loop.create_future()
        entry = (time.monotonic() + seconds, next(self._seq), loop, fut)
        with self._cond:
            heapq.heappush(self._heap, entry)
            if self._thread is None:  # none running (never, since `close`, or it exited idle): start one
                self._stop = threading.Event()
                self._thread = threading.Thread(target=self._run, args=(self._stop,), name="batchdeck-arrivals",
                                                daemon=True)
                self._thread.start()
            self._cond.notify()
        try:
            await fut
        except asyncio.CancelledError:
            with self._cond:
                if entry in self._heap:
                    self._heap.remove(entry)
                    heapq.heapify(self._heap)
                    self._cond.notify()
            raise

    def close(self) -> None:
        """Stop the helper thread now; waits not yet due are cancelled (a later `sleep` starts another)."""
        with self._cond:
            thread, self._thread = self._thread, None
            if self._stop is not None:
                self._stop.set()
            pending, self._heap = self._heap, []
            self._cond.notify_all()
        for _, _, loop, fut in pending:
            try:
                loop.call_soon_threadsafe(fut.cancel)
            except RuntimeError:  # its loop closed: nobody waits any more
                pass
        if thread is not None:
            thread.join()

    @property
    def running(self) -> bool:
        return self._thread is not None

    def _run(self, stop: threading.Event) -> None:
        with self._cond:
            while not stop.is_set():
                if not self._heap:
                    self._cond.wait(LINGER_S)
                    if not self._heap and not stop.is_set():  # idle: exit (the next wait starts a thread)
                        if self._stop is stop:
                            self._thread = None
                        return
                    continue
                due = self._heap[0][0]
                now = time.monotonic()
                if now < due:
                    self._cond.wait(due - now)
                    continue
                _, _, loop, fut = heapq.heappop(self._heap)
                try:
                    loop.call_soon_threadsafe(_wake, fut)
                except RuntimeError:  # the loop closed: nobody waits any more
                    pass


def _wake(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_result(None)
