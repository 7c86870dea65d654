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


class ArrivalTimer:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, asyncio.AbstractEventLoop, asyncio.Future]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._stop: threading.Event | None = None

    async def sleep(self, seconds: float) -> None:
        """Return `seconds` of wall time from now."""
        if seconds <= 0:
            return
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self._cond:
            heapq.heappush(self._heap, (time.monotonic() + seconds, next(self._seq), loop, fut))
            if self._thread is None:  # the first wait (or the first since `close`) starts the thread
                self._stop = threading.Event()
                self._thread = threading.Thread(target=self._run, args=(self._stop,), name="batchdeck-arrivals",
                                                daemon=True)
                self._thread.start()
            self._cond.notify()
        await fut

    def close(self) -> None:
        """Stop the helper thread (a later `sleep` starts another); waits not yet due never return."""
        with self._cond:
            thread, self._thread = self._thread, None
            if self._stop is not None:
                self._stop.set()
            self._heap.clear()
            self._cond.notify_all()
        if thread is not None:
            thread.join()

    @property
    def running(self) -> bool:
        return self._thread is not None

    def _run(self, stop: threading.Event) -> None:
        with self._cond:
            while not stop.is_set():
                if not self._heap:
                    self._cond.wait()
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
