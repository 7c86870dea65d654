"""Replaying a preset: build (or borrow) an engine, drive it with `PresetDriver`, keep its telemetry.

`run_preset_async(preset, ...)` is what `batchdeck replay --headless` runs and what the console
calls to let a preset's timeline drive it (pass the console's `AsyncEngine` as `engine=`: the
telemetry is teed off its sink for the duration and the sink is restored afterwards).
`ReplayResult.report()` gives the JSON report (presets/report.py).

Recording (`record=`): the one recording format (engine/service/recording.py), as the console's own
`--record` writes it, so `batchdeck console --replay` plays either. The first line is
`{"type": "config", ...}` (the engine's config snapshot), the second
`{"type": "action", "op": "replay", "preset": NAME, ...}`, then one action per timeline entry when it is
applied (`op`: set | pause | resume, with `changes`, `applied_iteration`, `ok`, `error`,
`config`, `source`, `timeline_index`, `time`, `iteration`).
"""
from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Mapping

from batchdeck.engine.service.async_engine import AsyncEngine
from batchdeck.engine.service.heap_freeze import RetainedFreezer
from batchdeck.engine.service.recording import RecordingWriter
from batchdeck.engine.service.virtual_loop import InlineAsyncEngine, run_virtual
from batchdeck.engine.sim.clock import VirtualClock
from batchdeck.presets.preset_driver import AppliedAction, PresetDriver, build_engine_for_preset, scale_preset
from batchdeck.engine.telemetry import ListSink
from batchdeck.presets import Preset, load_preset, resolve_preset
from batchdeck.presets.report import build_report, preset_info, prompt_hash
from batchdeck.presets.workload_streams import read_trace_files


def read_preset_traces(preset: Preset, duration_scale: float = 1.0) -> None:
    """Read the trace files of `preset` at `duration_scale` (and discard them): a bad row fails here,
    naming its line, before a model loads, a console opens or a recording overwrites a file."""
    read_trace_files(scale_preset(preset, duration_scale).workload, preset.base_dir)


def as_preset(preset: Preset | str | Path) -> Preset:
    """A Preset from a Preset, a shipped preset's name, or a path."""
    if isinstance(preset, Preset):
        return preset
    return load_preset(resolve_preset(preset))


class Tee:
    """Call several sinks in order; a failing one never stops the others (nor the engine)."""

    def __init__(self, *sinks: Callable[[str, Any], None] | None):
        self.sinks = [s for s in sinks if s is not None]
        self.errors = 0

    def __call__(self, topic: str, record: Any) -> None:
        for sink in self.sinks:
            try:
                sink(topic, record)
            except Exception:  # noqa: BLE001 - telemetry must never break the engine
                self.errors += 1


def action_record(action: AppliedAction, source: str) -> dict[str, Any]:
    """The `action` line for a timeline entry."""
    return {"op": action.action, "changes": action.changes, "pause": action.pause, "source": source,
            "timeline_index": action.index, "at": action.at, "at_iteration": action.at_iteration,
            "time": action.time, "iteration": action.applied_iteration,
            "applied_iteration": action.applied_iteration, "ok": action.status == "applied",
            "status": action.status, "error": action.error, "config": action.config}


@dataclass
class ReplayResult:
    """A finished (or failed) replay: the preset as run, the driver, and all telemetry."""

    preset: Preset  # after duration scaling
    driver: PresetDriver
    telemetry: ListSink
    initial_config: dict[str, Any]
    engine_info: dict[str, Any]
    speed: float
    duration_scale: float
    wall_time_s: float
    error: str | None = None
    interrupted: bool = False  # stopped early by SIGINT (Ctrl-C): the telemetry covers the run up to then
    extra: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        """Short: asyncio formats the finished main task, result included, when `asyncio.run` restores
        the SIGINT handler, and a field-by-field repr of every telemetry record took a minute after an
        hour-long simulated replay (2.2M iterations)."""
        return (f"ReplayResult(preset={self.preset.name!r}, iterations={len(self.telemetry.iterations)}, "
                f"requests={len(self.telemetry.requests)}, wall_time_s={self.wall_time_s:.2f}, error={self.error!r})")

    def request_rows(self) -> list[dict[str, Any]]:
        rows = []
        for rid, sub in self.driver.requests.items():
            item = sub.item
            rows.append({
                "request_id": rid, "stream_index": item.stream_index, "scheduled_arrival": item.arrival,
                "max_tokens": item.max_tokens, "clamped": item.clamped, "tenant": item.tenant,
                "slo_class": item.slo_class, "priority": item.priority, "prompt_tokens": item.num_prompt_tokens,
                "prompt_hash": prompt_hash(item.prompt_token_ids), "output_token_ids": list(sub.token_ids),
                "error": sub.error, **({"finish_reason": "rejected"} if sub.error else {}),
            })
        return rows

    def report(self) -> dict[str, Any]:
        from batchdeck.presets.analytic import analytic_summary

        t = self.telemetry
        report = build_report(
            preset=preset_info(self.preset), iterations=t.iterations, requests=t.requests, events=t.events,
            initial_config=self.initial_config, request_rows=self.request_rows(),
            timeline=[a.to_dict() for a in self.driver.applied], num_clamped=self.driver.clamped,
            run={"speed": self.speed, "duration_scale": self.duration_scale, "wall_time_s": self.wall_time_s,
                 "error": self.error, "interrupted": self.interrupted, "engine": self.engine_info, **self.extra},
        )
        sim = self.engine_info.get("simulation")
        report["analytic"] = analytic_summary(report, sim["cost_model"] if sim else None)
        return report


async def run_preset_async(
    preset: Preset | str | Path,
    *,
    engine: AsyncEngine | None = None,
    overrides: Mapping[str, Any] | None = None,
    speed: float = 1.0,
    duration_scale: float = 1.0,
    record: str | Path | IO[str] | None = None,
    sink: Callable[[str, Any], None] | None = None,
    source: str = "preset",
    on_start: Callable[[PresetDriver], None] | None = None,
    progress: Callable[[PresetDriver], None] | None = None,
    progress_interval: float = 0.2,
    gpu_monitor: bool | None = None,
    loaded: Any = None,
    clock: Any = None,
    interruptible: bool = False,
) -> ReplayResult:
    """Play `preset` to the end and return its telemetry.

    engine: an AsyncEngine to drive (the console's); None builds one from the preset
      (`build_engine_for_preset(preset, overrides)`), runs it and stops it at the end.
    speed: workload time runs `speed` times faster than the engine clock.
    duration_scale: shorten (< 1) the preset (see `presets.preset_driver.scale_preset`).
    record: a path or text stream for the JSONL recording.
    sink: another telemetry sink to feed too (e.g. a bus).
    on_start(driver): called once the driver exists, before anything is submitted.
    progress(driver): called every `progress_interval` seconds while it runs.
    gpu_monitor: sample the GPU with NVML into the telemetry ("gpu" records); default: on CUDA.
    loaded: a LoadedModel to reuse (tests), passed to LLMEngine.
    clock: a simulated engine's clock; a `VirtualClock` steps the engine inline on this loop, which must
      then be a `VirtualTimeLoop` on the same clock (`run_preset` arranges it).

    The engine's failure (an exception in a step) ends the run: the result carries `error` and the
    telemetry up to then. Other exceptions propagate. interruptible: a cancellation of this task (what
    `asyncio.run` does at the first Ctrl-C) also ends the run with its telemetry so far, `interrupted`
    set, instead of propagating (the CLI then still writes the report).
    """
    preset = as_preset(preset)
    read_preset_traces(preset, duration_scale)
    telemetry = ListSink()
    recorder = RecordingWriter(record) if record is not None else None
    own_engine = engine is None
    # What the run keeps for its report leaves the collector's reach as it grows, while an engine holds
    # the freeze (heap_freeze.py): only with an engine of its own (a borrowed one, the console's, goes on
    # serving after the run). On a virtual clock this saves CPU time: an hour of simulated Azure traffic
    # keeps 2.2M iteration records, which full collections would otherwise walk again and again.
    freezer = RetainedFreezer() if own_engine else None
    tee = Tee(telemetry, freezer, recorder, sink)
    if own_engine:
        kwargs = {"loaded": loaded} if loaded is not None else {}
        if clock is not None:
            kwargs["clock"] = clock
        llm_engine = build_engine_for_preset(preset, overrides, sink=tee, **kwargs)
        engine = InlineAsyncEngine(llm_engine) if isinstance(clock, VirtualClock) else AsyncEngine(llm_engine)
        previous_sink = None
    else:
        previous_sink = engine.engine.sink
        await _set_sink(engine, Tee(previous_sink, tee))
    llm = engine.engine
    initial_config = llm.target_config.to_dict()
    engine_info = llm.config_snapshot()["engine"] | {"max_model_len": llm.max_model_len}
    if recorder is not None:
        recorder("config", llm.config_snapshot())
        recorder("action", {"op": "replay", "preset": preset.name, "description": preset.description,
                            "speed": speed, "duration_scale": duration_scale, "source": source, "time": 0.0,
                            "iteration": llm.iteration, "ok": True, "config": initial_config})

    def on_action(action: AppliedAction) -> None:
        if recorder is not None and action.status != "skipped":
            recorder("action", action_record(action, source))

    driver = PresetDriver(engine, preset, speed=speed, duration_scale=duration_scale, source=source,
                          restart_clock=own_engine, on_action=on_action)
    if on_start is not None:
        on_start(driver)
    monitor = None
    if gpu_monitor or (gpu_monitor is None and llm.device.type == "cuda"):
        from batchdeck.engine.service.gpu_monitor import GpuMonitor

        monitor = GpuMonitor(device_index=llm.device.index or 0, kv_pool_bytes=llm.kv_cache.num_bytes,
                             clock=llm.clock)
        monitor.start(tee)

    async def report_progress() -> None:
        while True:
            progress(driver)
            await asyncio.sleep(progress_interval)

    ticker = asyncio.create_task(report_progress()) if progress is not None else None
    error = None
    interrupted = False
    t0 = time.perf_counter()
    try:
        await driver.run()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if not interruptible or task is None:
            raise
        task.uncancel()  # handled here: the clean-up below may await again
        interrupted = True
    except Exception as exc:  # noqa: BLE001 - the engine's own failure ends the run with a report
        if engine.error is None or exc is not engine.error:
            raise
        error = f"{type(exc).__name__}: {exc}"
    finally:
        wall = time.perf_counter() - t0
        try:
            if ticker is not None:
                ticker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ticker
                progress(driver)
            if monitor is not None:
                monitor.stop()
        finally:  # whatever failed above, the engine stops (and gives its heap freeze back)
            if own_engine:
                await engine.stop()
            else:
                await _set_sink(engine, previous_sink)
            if recorder is not None:
                recorder.close()
    return ReplayResult(preset=driver.preset, driver=driver, telemetry=telemetry, initial_config=initial_config,
                        engine_info=engine_info, speed=speed, duration_scale=duration_scale, wall_time_s=wall,
                        error=error, interrupted=interrupted)


async def _set_sink(engine: AsyncEngine, sink: Callable[[str, Any], None]) -> None:
    """Swap the engine's sink between iterations (directly when its worker is not running)."""
    if engine.running:
        await engine.call(lambda e: setattr(e, "sink", sink))
    else:
        engine.engine.sink = sink


def run_preset(preset: Preset | str | Path, **kwargs: Any) -> ReplayResult:
    """`run_preset_async` from synchronous code (its own event loop). A simulated engine (settings naming
    a profile) runs on virtual time, as fast as the CPU allows, unless a `clock` is given."""
    from batchdeck.presets.preset_driver import preset_configs

    preset = as_preset(preset)
    if kwargs.get("clock") is None and kwargs.get("engine") is None:
        cfg, _ = preset_configs(preset, kwargs.get("overrides"))
        if cfg.sim:
            clock = VirtualClock()
            cpu0 = time.process_time()
            result = run_virtual(run_preset_async(preset, clock=clock, **kwargs), clock)
            cpu = time.process_time() - cpu0
            n = len(result.telemetry.iterations)
            result.extra.update(simulated_iterations_per_s=_iterations_per_s(result), cpu_time_s=round(cpu, 2),
                                simulated_iterations_per_cpu_s=round(n / cpu, 1) if cpu > 0 else None)
            return result
    return asyncio.run(run_preset_async(preset, **kwargs))


def _iterations_per_s(result: ReplayResult) -> float | None:
    n = len(result.telemetry.iterations)
    return round(n / result.wall_time_s, 1) if result.wall_time_s > 0 else None


def progress_printer(stream: IO[str] | None = None, enabled: bool | None = None) -> Callable[[PresetDriver], None]:
    """A `progress` callback drawing engine/progress.py's bar: finished/total, time and iteration."""
    from batchdeck.engine.service.progress import ProgressBar

    bar: ProgressBar | None = None
    closed = False

    def update(driver: PresetDriver) -> None:
        nonlocal bar, closed
        if closed:
            return
        if bar is None:
            bar = ProgressBar(driver.total, f"replay {driver.preset.name}", stream or sys.stderr, enabled)
        bar.total = max(1, driver.total)
        llm = driver.engine.engine
        bar.update(driver.finished, f"t={llm.clock():.1f}s it={llm.iteration}", force=driver.done)
        if driver.done:
            bar.close()
            closed = True

    return update


__all__ = ["ReplayResult", "Tee", "as_preset", "progress_printer", "run_preset", "run_preset_async", "scale_preset"]
