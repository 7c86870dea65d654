"""The console's default steady workload: a preset's streams (quickstart's) submitted straight to the
`AsyncEngine`, looping forever with fresh request ids so things keep moving.

`--preset` runs the preset once, timeline included, through presets.replay.run_preset_async (the
PresetDriver); the operator's own submissions go through the client.
"""
from __future__ import annotations

import asyncio
import itertools
from typing import Any

from batchdeck.engine.service.async_engine import AsyncEngine
from batchdeck.engine.request import RequestError, SamplingParams
from batchdeck.presets.workload_streams import WorkloadItem, closed_loop_streams, generate_open_loop

from batchdeck.presets.schema import Preset


def preset_period(preset: Preset) -> float:
    """How long one pass of the preset's workload lasts (its longest stream), at least 1 s."""
    ends = [1.0]
    for spec in preset.workload:
        for attr in ("duration", "at"):
            value = getattr(spec, attr, None)
            if isinstance(value, (int, float)):
                ends.append(float(value))
    return max(ends)


class SteadyWorkload:
    """Submit a preset's requests on the loop's clock; `loop=True` repeats the open-loop streams
    every `period` seconds with fresh ids (closed-loop streams run their own course). The preset's
    timeline is not played: this is background load for the operator to tune against."""

    def __init__(self, engine: AsyncEngine, preset: Preset, *, loop: bool = False, speed: float = 1.0,
                 prefix: str = "r") -> None:
        if not speed > 0:
            raise ValueError(f"speed must be > 0, got {speed!r}")
        self.engine = engine
        self.preset = preset
        self.loop = loop
        self.speed = speed
        self.prefix = prefix
        self.submitted = 0
        self.rejected = 0
        self._ids = itertools.count()
        lm = engine.engine.max_model_len
        self.items = generate_open_loop(preset.workload, preset.seed, lm,
                                        base_dir=preset.path.parent if preset.path else None)
        self.closed = closed_loop_streams(preset.workload, preset.seed, lm)
        self.period = preset_period(preset)

    async def _submit(self, item: WorkloadItem) -> Any:
        rid = f"{self.prefix}{next(self._ids):05d}"
        try:
            stream = await self.engine.add_request(
                rid, item.prompt_token_ids, SamplingParams(max_tokens=item.max_tokens, ignore_eos=True),
                tenant=item.tenant, priority=item.priority, slo_class=item.slo_class)
        except RequestError:
            self.rejected += 1  # reported by the engine as a request_rejected event
            return None
        self.submitted += 1
        return stream

    async def _sleep_until(self, loop: asyncio.AbstractEventLoop, t0: float, at: float) -> None:
        delay = t0 + at / self.speed - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)

    async def _open_loop(self, loop: asyncio.AbstractEventLoop, t0: float) -> None:
        for cycle in itertools.count():
            base = cycle * self.period
            for item in self.items:
                await self._sleep_until(loop, t0, base + item.arrival)
                await self._submit(item)
            if not self.loop:
                return
            await self._sleep_until(loop, t0, base + self.period)

    async def _closed_client(self, stream_gen, first: WorkloadItem, loop: asyncio.AbstractEventLoop, t0: float) -> None:
        item: WorkloadItem | None = first
        while item is not None:
            await self._sleep_until(loop, t0, item.arrival)  # a chat's next turn comes after a think time
            stream = await self._submit(item)
            answer = await stream.collect() if stream is not None else []
            item = stream_gen.on_finished((loop.time() - t0) * self.speed, item, answer)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        tasks = [asyncio.create_task(self._open_loop(loop, t0))]
        for gen in self.closed:
            for first in gen.initial():
                tasks.append(asyncio.create_task(self._closed_client(gen, first, loop, t0)))
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
