"""Calibration workloads played through the serving loop (`batchdeck calibrate`'s driver): the
engine steps in the `AsyncEngine` worker thread while requests are submitted and their output
streams consumed on an asyncio loop, as `replay` and `serve` run it, so the iteration gaps the cost
model is fitted to include what that loop costs (engine/sim/calibrate.py)."""
from __future__ import annotations

import asyncio
import random
import time
from typing import Callable

from batchdeck.engine.llm_engine import LLMEngine
from batchdeck.engine.request import SamplingParams
from batchdeck.engine.service.arrival_timer import ArrivalTimer
from batchdeck.engine.service.async_engine import AsyncEngine
from batchdeck.engine.service.served_model import EngineDeadError
from batchdeck.engine.sim.calibrate import IterationTap, Workload, deadlines, workload_played


def drive_through_service(llm: LLMEngine, workloads: list[Workload], tap: IterationTap,
                          log: Callable[[str], None], budget_s: float = float("inf")) -> list[int]:
    """Play the workloads within `budget_s` seconds; the indices of those the budget cut short."""
    return asyncio.run(_play_all(llm, workloads, tap, log, budget_s))


async def _play_all(llm: LLMEngine, workloads: list[Workload], tap: IterationTap, log: Callable[[str], None],
                    budget_s: float) -> list[int]:
    engine = AsyncEngine(llm)
    await engine.start()
    rng = random.Random(0)
    ends = deadlines(workloads, budget_s, time.perf_counter())
    cut = []
    timer = ArrivalTimer()  # spaced requests on time to the OS timer's precision, as the workload player sends
    try:
        for i, w in enumerate(workloads):
            def begin(e: LLMEngine, i: int = i) -> None:
                tap.workload = i
                tap.idle()

            await engine.call(begin)
            await engine.update_config(w.live_changes(), "calibrate")
            t0 = time.perf_counter()
            cut_short = False
            try:
                cut_short = await _play(engine, w, rng, ends[i], timer)
            except EngineDeadError:  # the engine failed with requests open: named below (engine.error)
                pass
            if engine.error is not None:
                raise RuntimeError(f"calibrate: the engine failed in workload {w.name!r}") from engine.error
            cut += [i] if cut_short else []
            log(workload_played(i, len(workloads), w, time.perf_counter() - t0, cut_short))
    finally:
        timer.close()
        await engine.stop()
    return cut


async def _play(engine: AsyncEngine, w: Workload, rng: random.Random, deadline: float, timer: ArrivalTimer) -> bool:
    """Play one workload; past the deadline (perf_counter seconds) no request is sent and those
    unfinished are aborted. True when it was cut short so."""
    vocab = engine.engine.loaded.config.vocab_size
    pending = list(enumerate(w.requests))
    live: set[str] = set()
    cut = False

    async def send(arrival: float | None = None) -> None:
        i, (p, o) = pending.pop(0)
        ids = [rng.randrange(3, vocab - 1) for _ in range(p)]
        kw = {} if arrival is None else {"arrival_time": arrival}
        rid = f"cal-{w.name}-{i}"
        live.add(rid)
        stream = await engine.add_request(rid, ids, SamplingParams(max_tokens=o, ignore_eos=True), **kw)
        await stream.collect()
        live.discard(rid)

    async def cut_short() -> None:
        nonlocal cut
        await asyncio.sleep(max(0.0, deadline - time.perf_counter()))
        cut = bool(pending or live)
        pending.clear()
        for rid in list(live):
            await engine.abort(rid)

    watchdog = asyncio.get_running_loop().create_task(cut_short())
    try:
        if w.mode == "spaced":  # one request at a time, arriving gap_s after the previous one finished
            loop = asyncio.get_running_loop()
            offset = engine.engine.clock() - loop.time()  # engine clock and loop time are both monotonic
            while pending:
                due = loop.time() + w.gap_s
                await timer.sleep(w.gap_s)
                if pending:
                    await send(due + offset)  # stamped with its due time, as the workload player stamps arrivals
        elif w.mode == "batch":
            await asyncio.gather(*(send() for _ in range(len(pending))))
        else:
            async def client() -> None:
                while pending:
                    await send()

            await asyncio.gather(*(client() for _ in range(max(1, w.concurrency))))
    finally:
        watchdog.cancel()
    return cut
