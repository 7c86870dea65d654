"""The one workload player: submits a workload's requests to an `AsyncEngine` at their times.

Open-loop items (poisson, gamma, burst, trace) are submitted at their arrival times; closed-loop
clients each send again when answered; a multi-turn chat (presets/prefix_workloads.py) sends its
next turn, whose prompt carries the conversation so far and the engine's answer, at that turn's
arrival (the answer's time plus a think time). Used by `PresetDriver` (a preset played once, with its
timeline) and by the console's steady background load (`repeat_every`: the open-loop items are
played again every period, with fresh ids).

Time: the workload's clock is `(engine clock - t0) * speed`; an arrival at `t` (in pass `k` of a
repeating workload: `k * repeat_every + t`) is submitted at engine time `t0 + t / speed` and carries
that arrival time, so a late submission (the engine thread was busy) shows up as queue time, not as
a shifted arrival. Items due together are submitted at one boundary, in order.

Requests: greedy, `ignore_eos=True`, `max_tokens` from the workload; ids are
`f"{id_prefix}{stream_index}-{n}"` (n counts the stream's requests from 0 in issue order, so an id
always names the same prompt and lengths in the first pass: the workload is drawn from its seed).
"""
from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field

from batchdeck.engine.request import RequestError, SamplingParams
from batchdeck.engine.service.arrival_timer import ArrivalTimer
from batchdeck.engine.service.async_engine import AsyncEngine
from batchdeck.presets.prefix_workloads import MultiTurnStream
from batchdeck.presets.workload_streams import ClosedLoopStream, WorkloadItem


@dataclass
class SubmittedRequest:
    request_id: str
    item: WorkloadItem
    arrival: float  # engine time the request carries
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None  # rejected at submission


class WorkloadPlayer:
    """Plays `open_items` and `closed` streams on `engine`; `run()` returns when all finished
    (never, with `repeat_every`, until cancelled). `keep_requests=False` keeps only the counters
    (a workload that repeats forever must not grow)."""

    def __init__(self, engine: AsyncEngine, open_items: list[WorkloadItem],
                 closed: list[ClosedLoopStream | MultiTurnStream], *,
                 speed: float = 1.0, repeat_every: float | None = None, id_prefix: str = "",
                 keep_requests: bool = True):
        if not speed > 0:
            raise ValueError(f"speed must be > 0, got {speed!r}")
        if repeat_every is not None and not repeat_every > 0:
            raise ValueError(f"repeat_every must be > 0 seconds, got {repeat_every!r}")
        self.engine = engine
        self.open_items = open_items
        self.closed = closed
        self.speed = float(speed)
        self.repeat_every = repeat_every
        self.id_prefix = id_prefix
        self.keep_requests = keep_requests
        self.requests: dict[str, SubmittedRequest] = {}
        self.submitted = 0
        self.finished = 0
        self.rejected = 0
        self.t0 = 0.0  # engine time of workload time 0 (set by run)
        self._counters: dict[int, int] = {}
        self._tasks: set[asyncio.Task] = set()
        self._timer: ArrivalTimer | None = None  # wall-time waits (created at the first one)

    def workload_time(self) -> float:
        """The workload clock now: (engine time - t0) * speed."""
        return (self.engine.engine.clock() - self.t0) * self.speed

    async def run(self, t0: float | None = None) -> None:
        """Play from engine time `t0` (default: now)."""
        self.t0 = self.engine.engine.clock() if t0 is None else t0
        workers = [asyncio.create_task(self._open_loop())]
        for stream in self.closed:
            for item in stream.initial():
                workers.append(asyncio.create_task(self._client(stream, item)))
        try:
            await asyncio.gather(*workers)
        finally:
            for t in [*workers, *self._tasks]:
                t.cancel()
            await asyncio.gather(*workers, *self._tasks, return_exceptions=True)
            if self._timer is not None:
                self._timer.close()

    def _next_id(self, stream_index: int) -> str:
        n = self._counters.get(stream_index, 0)
        self._counters[stream_index] = n + 1
        return f"{self.id_prefix}{stream_index}-{n}"

    async def sleep_until(self, workload_t: float) -> None:
        """Wait until the workload clock reaches `workload_t` (in wall time through the precise
        `ArrivalTimer`: requests are stamped with their due time, so lateness would count as latency)."""
        delay = self.t0 + workload_t / self.speed - self.engine.engine.clock()
        if delay > 0:  # engine-clock seconds; a paced simulation's clock runs `time_rate` times faster
            if self._timer is None:
                self._timer = ArrivalTimer()
            await self._timer.sleep(delay / self.engine.engine.time_rate)

    async def _submit(self, item: WorkloadItem, arrival: float) -> SubmittedRequest:
        """Add one request (arriving at workload time `arrival`) and wait for it to finish (or be rejected)."""
        rid = self._next_id(item.stream_index)
        sub = SubmittedRequest(rid, item, self.t0 + arrival / self.speed)
        if self.keep_requests:
            self.requests[rid] = sub
        self.submitted += 1
        try:
            stream = await self.engine.add_request(
                rid, item.prompt_token_ids, SamplingParams(max_tokens=item.max_tokens, ignore_eos=True),
                arrival_time=sub.arrival, tenant=item.tenant, priority=item.priority, slo_class=item.slo_class)
        except RequestError as exc:  # the engine reported it as a request_rejected event too
            sub.error = str(exc)
            self.rejected += 1
            self.finished += 1
            return sub
        sub.token_ids = await stream.collect()  # a multi-turn chat passes it on; kept only in `requests`
        sub.finish_reason = stream.finish_reason
        self.finished += 1
        return sub

    def _spawn(self, item: WorkloadItem, arrival: float) -> None:
        task = asyncio.create_task(self._submit(item, arrival))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _open_loop(self) -> None:
        items = self.open_items
        for cycle in itertools.count():
            base = cycle * (self.repeat_every or 0.0)
            i = 0
            while i < len(items):
                await self.sleep_until(base + items[i].arrival)
                now = self.workload_time()
                while i < len(items) and base + items[i].arrival <= now:  # everything due: one boundary
                    self._spawn(items[i], base + items[i].arrival)
                    i += 1
            if self.repeat_every is None:
                break
            await self.sleep_until(base + self.repeat_every)
        while self._tasks:
            await asyncio.gather(*list(self._tasks))

    async def _client(self, stream: ClosedLoopStream | MultiTurnStream, first: WorkloadItem) -> None:
        item: WorkloadItem | None = first
        while item is not None:
            await self.sleep_until(item.arrival)  # a chat's next turn comes after a think time
            sub = await self._submit(item, item.arrival)
            item = stream.on_finished(self.workload_time(), item, sub.token_ids)
