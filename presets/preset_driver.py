"""Drive an `AsyncEngine` with a preset: its workload at the right times and its timeline of live changes.

`PresetDriver(engine, preset).run()` submits the open-loop requests (poisson, gamma, burst, trace)
at their arrival times, runs the closed-loop clients (each sends again when answered), applies the
timeline (`set` through `AsyncEngine.update_config(changes, source)`, `pause: S` / `resume` through
pause/resume) and returns once every request has finished. It is used by `batchdeck replay`, the
console and the headless `batchdeck engine` command.

The workload is played by `presets.workload_player.WorkloadPlayer` (its clock, ids and arrival
stamps are described there). t0 is the engine time when `run()` starts (0 with
`restart_clock=True`, the default, which restarts the engine's clock while it is idle). Timeline
`at` is on the workload's clock; `at_iteration: N` fires once
the engine's iteration counter reaches N (the change then applies at the next iteration boundary,
so `applied_iteration >= N`; the exact value is what `applied` and the engine's events report).

Timeline entries are applied in file order: an entry never goes before the one above it (two
entries that are due together are applied in order, each on top of the last, as the schema checks
them). `pause: S` pauses the engine and resumes it S / speed seconds later (arrivals keep coming
and queue meanwhile). Entries not yet due when the last request finishes are reported as skipped.

`duration_scale` shortens a preset (for CI and quick looks): see `scale_preset`.
"""
from __future__ import annotations

import asyncio
import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping

from batchdeck.engine.config import EngineConfig, LiveConfig
from batchdeck.engine.service.async_engine import AsyncEngine
from batchdeck.presets.workload_player import SubmittedRequest, WorkloadPlayer
from batchdeck.presets.workload_streams import (ClosedLoopStream, WorkloadItem, closed_loop_streams, count_clamped,
                                                generate_open_loop)

if TYPE_CHECKING:
    from batchdeck.engine.llm_engine import LLMEngine
    from batchdeck.presets.schema import Preset, TimelineEntry

POLL_S = 0.002  # how often `at_iteration` entries look at the engine's iteration counter


# ---------------------------------------------------------------------------------------------
# Building an engine for a preset


def preset_configs(preset: "Preset", overrides: Mapping[str, Any] | None = None) -> tuple[EngineConfig, LiveConfig]:
    """EngineConfig and LiveConfig for a preset under `overrides` (settings by name; None values are
    ignored): the one resolution every command uses (`engine.config.resolve_configs`), so limits are
    raised to fit every value the preset's config and timeline ask for."""
    from batchdeck.engine.service.flags import preset_engine_configs

    return preset_engine_configs(preset, dict(overrides or {}))


def build_engine_for_preset(preset: "Preset", overrides: Mapping[str, Any] | None = None, **engine_kwargs: Any
                            ) -> "LLMEngine":
    """An LLMEngine for the preset (see `preset_configs`); `engine_kwargs` go to LLMEngine (sink, ...).
    A simulated one when the engine settings name a profile (`sim`; `clock` then picks its time)."""
    from batchdeck.engine.sim.engine import make_engine

    cfg, live = preset_configs(preset, overrides)
    return make_engine(cfg, live, **engine_kwargs)


# ---------------------------------------------------------------------------------------------
# Shortening a preset


def _scaled_count(n: int | None, factor: float) -> int | None:
    return None if n is None else max(1, math.ceil(n * factor))


def scaled_rates(preset: Preset, k: float) -> Preset:
    """The preset with every rate-driven stream's rate multiplied by k (trace and closed-loop streams as they are)."""
    streams = [dataclasses.replace(s, rate=s.rate * k) if getattr(s, "rate", None) else s for s in preset.workload]
    return dataclasses.replace(preset, workload=streams)


def scale_preset(preset: "Preset", factor: float) -> "Preset":
    """The preset shortened (factor < 1) or stretched in time, keeping its rates and lengths.

    Multiplies by `factor`: stream durations and counts (burst counts too, so a burst keeps its
    share of the work), burst times, a trace's `limit` (the trace's first part is kept; without a
    limit, the trace is cut at `factor` of the file's rows), timeline `at`, `at_iteration` and
    pause lengths. Counts are rounded up and stay >= 1. factor == 1 returns the preset unchanged.
    """
    if not factor > 0:
        raise ValueError(f"duration scale must be > 0, got {factor!r}")
    if factor == 1:
        return preset
    streams = []
    for spec in preset.workload:
        kw: dict[str, Any] = {}
        if getattr(spec, "duration", None) is not None:
            kw["duration"] = spec.duration * factor
        if spec.kind == "multi-turn":  # as many chats, each as long (its count is conversations x turns)
            kw["conversations"] = _scaled_count(spec.conversations, factor)
        elif spec.kind != "trace" and getattr(spec, "count", None) is not None:
            kw["count"] = _scaled_count(spec.count, factor)
        if spec.kind == "burst":
            kw["at"] = spec.at * factor
        if spec.kind == "trace":
            limit = spec.limit
            if limit is None:
                from batchdeck.presets.trace_loader import load_trace

                limit = len(load_trace(spec.path, spec.columns, spec.time_unit, spec.time_scale,
                                       spec.length_scale, spec.start, None))
            kw["limit"] = _scaled_count(limit, factor)
        streams.append(dataclasses.replace(spec, **kw))
    timeline = []
    for entry in preset.timeline:
        kw = {}
        if entry.at is not None:
            kw["at"] = entry.at * factor
        if entry.at_iteration is not None:
            kw["at_iteration"] = int(round(entry.at_iteration * factor))
        if entry.pause is not None:
            kw["pause"] = entry.pause * factor
        timeline.append(dataclasses.replace(entry, **kw))
    return dataclasses.replace(preset, workload=streams, timeline=timeline)


# ---------------------------------------------------------------------------------------------
# The driver


@dataclass
class AppliedAction:
    """What happened to one timeline entry."""

    index: int  # position in preset.timeline
    action: str  # set | pause | resume
    changes: dict[str, Any] | None = None  # for set
    pause: float | None = None  # for pause: seconds (workload time)
    at: float | None = None  # the entry's trigger, as scheduled (workload seconds) ...
    at_iteration: int | None = None  # ... or iteration
    time: float | None = None  # engine time when it was sent
    applied_iteration: int | None = None  # the first iteration that ran with it
    status: str = "pending"  # pending | applied | error | skipped
    error: str | None = None
    config: dict[str, Any] | None = None  # the live config after a set

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class PresetDriver:
    def __init__(self, engine: AsyncEngine, preset: "Preset", *, speed: float = 1.0,
                 max_model_len: int | None = None, duration_scale: float = 1.0, source: str = "preset",
                 apply_initial_config: bool = False, restart_clock: bool = True,
                 on_action: Callable[[AppliedAction], None] | None = None):
        if not speed > 0:
            raise ValueError(f"speed must be > 0, got {speed!r}")
        self.engine = engine
        self.preset = scale_preset(preset, duration_scale)
        self.speed = float(speed)
        self.source = source
        self.apply_initial_config = apply_initial_config
        self.restart_clock = restart_clock
        self.on_action = on_action
        self.max_model_len = max_model_len if max_model_len is not None else engine.engine.max_model_len
        self.open_items: list[WorkloadItem] = generate_open_loop(self.preset.workload, self.preset.seed,
                                                                 self.max_model_len, preset.base_dir)
        self.closed: list[ClosedLoopStream] = closed_loop_streams(self.preset.workload, self.preset.seed,
                                                                  self.max_model_len)
        self.applied: list[AppliedAction] = [self._action_for(i, e) for i, e in enumerate(self.preset.timeline)]
        self.player = WorkloadPlayer(engine, self.open_items, self.closed, speed=self.speed)
        self.done = False
        self._resume_tasks: list[asyncio.Task] = []
        self._timed_pauses = 0  # `pause: SECONDS` entries not yet over: the engine resumes when the last ends

    # -- progress ---------------------------------------------------------------------------------
    @property
    def requests(self) -> dict[str, SubmittedRequest]:
        return self.player.requests

    @property
    def submitted(self) -> int:
        return self.player.submitted

    @property
    def finished(self) -> int:
        return self.player.finished

    @property
    def rejected(self) -> int:
        return self.player.rejected

    @property
    def t0(self) -> float:
        """Engine time of workload time 0 (set by run)."""
        return self.player.t0

    @property
    def total(self) -> int:
        """Requests expected in all: open-loop ones plus closed-loop ones issued or still to come
        (a duration-bound closed-loop stream counts what it issued, plus its clients, until it stops)."""
        n = len(self.open_items)
        for stream in self.closed:
            if stream.spec.count is not None:
                n += stream.spec.count
            else:
                n += stream.issued + (0 if self.done else stream.spec.concurrency)
        return max(n, self.submitted)

    @property
    def clamped(self) -> int:
        return count_clamped([r.item for r in self.requests.values()])

    def progress(self) -> dict[str, Any]:
        return {"submitted": self.submitted, "finished": self.finished, "rejected": self.rejected,
                "total": self.total, "done": self.done}

    def workload_time(self) -> float:
        """The workload clock now: (engine time - t0) * speed."""
        return self.player.workload_time()

    # -- run ----------------------------------------------------------------------------------------
    async def run(self) -> "PresetDriver":
        """Play the whole preset; returns self once every request finished (or the engine failed).

        Starts the AsyncEngine if it is not running. Raises the engine's error if it failed.
        """
        if not self.engine.running:
            await self.engine.start()

        def start_clock(e: "LLMEngine") -> float:
            if self.restart_clock and not e.has_unfinished:
                e.restart_clock()
                return 0.0
            return e.clock()

        t0 = await self.engine.call(start_clock)
        self.player.t0 = t0
        if self.apply_initial_config and self.preset.config:
            await self.engine.update_config(self.preset.config, source=self.source)
        player = asyncio.create_task(self.player.run(t0))
        timeline = asyncio.create_task(self._timeline())
        watchdog = asyncio.create_task(self._watch_engine())
        try:
            done, _ = await asyncio.wait([player, watchdog], return_when=asyncio.FIRST_COMPLETED)
            if self.engine.error is not None:  # the failure itself, not the EngineDeadError it ended the
                raise self.engine.error        # open requests' streams with (the player raises that one)
            for t in done:
                t.result()
        finally:
            self.done = True
            for t in [timeline, watchdog, player, *self._resume_tasks]:
                t.cancel()
            await asyncio.gather(player, timeline, watchdog, *self._resume_tasks, return_exceptions=True)
            for a in self.applied:
                if a.status == "pending":
                    a.status = "skipped"
                    self._notify(a)
        return self

    async def _watch_engine(self) -> None:
        """Returns once the engine failed (its streams then end; the run raises engine.error)."""
        while self.engine.error is None:
            await asyncio.sleep(0.05)

    # -- timeline -------------------------------------------------------------------------------
    @staticmethod
    def _action_for(index: int, entry: "TimelineEntry") -> AppliedAction:
        action = "set" if entry.set is not None else ("pause" if entry.pause is not None else "resume")
        return AppliedAction(index=index, action=action, changes=dict(entry.set) if entry.set else None,
                             pause=entry.pause, at=entry.at, at_iteration=entry.at_iteration)

    def _notify(self, action: AppliedAction) -> None:
        if self.on_action is not None:
            self.on_action(action)

    async def _timeline(self) -> None:
        for entry, action in zip(self.preset.timeline, self.applied):
            if entry.at is not None:
                await self.player.sleep_until(entry.at)
            else:
                while self.engine.engine.iteration < entry.at_iteration:
                    await asyncio.sleep(POLL_S)
            await self._apply(entry, action)

    async def _apply(self, entry: "TimelineEntry", action: AppliedAction) -> None:
        action.time = self.engine.engine.clock()
        try:
            if entry.set is not None:
                reply = await self.engine.update_config(entry.set, source=self.source)
                action.applied_iteration, action.config = reply.applied_iteration, reply.config
            elif entry.pause is not None:
                action.applied_iteration = await self.engine.pause(source=self.source)
                self._timed_pauses += 1
                self._resume_tasks.append(asyncio.create_task(self._resume_after(entry.pause / self.speed)))
            else:
                action.applied_iteration = await self.engine.resume(source=self.source)
            action.status = "applied"
        except Exception as exc:  # noqa: BLE001 - a bad change is reported, the run goes on
            action.status, action.error = "error", f"{type(exc).__name__}: {exc}"
            message = f"timeline[{action.index}] {action.action} failed: {action.error}"
            await self.engine.call(lambda e: e.emit_event("error", message=message, source=self.source,
                                                          timeline_index=action.index))
        self._notify(action)

    async def _resume_after(self, seconds: float) -> None:
        """End one timed pause; overlapping pauses keep the engine paused until the last of them ends."""
        await asyncio.sleep(seconds / self.engine.engine.time_rate)
        self._timed_pauses -= 1
        if self._timed_pauses == 0:
            await self.engine.resume(source=self.source)


async def run_preset(engine: AsyncEngine, preset: "Preset", **kwargs: Any) -> PresetDriver:
    """`PresetDriver(engine, preset, **kwargs).run()`."""
    return await PresetDriver(engine, preset, **kwargs).run()


# ---------------------------------------------------------------------------------------------
# What `batchdeck engine --preset` needs to play a preset (handed to the service by batchdeck/cli.py)


def headless_driver(engine: AsyncEngine, preset: "Preset", *, speed: float = 1.0,
                    duration_scale: float = 1.0) -> PresetDriver:
    """A driver for a headless engine that also serves other clients (its clock is not restarted)."""
    return PresetDriver(engine, preset, speed=speed, duration_scale=duration_scale, restart_clock=False)
