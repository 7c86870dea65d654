"""The engine side of `batchdeck serve`, the same wherever it runs (in the server's process with
`--engine-in-process`, or in an engine process: engine/service/engine_process.py): the engine and the
HeadlessRunner around it, the line saying it is loaded, and the NVML sampler /metrics reads."""
from __future__ import annotations

import asyncio
import time
from typing import Any

from batchdeck.engine.service.bus import Bus
from batchdeck.engine.service.headless import HeadlessRunner


def build_serve_runner(cfg: Any, live: Any, runner_kw: dict[str, Any], *, prog: str, install_signals: bool = True,
                       engine_process: int | None = None) -> HeadlessRunner:
    """Load the engine (a simulated one with --sim, paced at wall time) on a new Bus, wrap it in a
    HeadlessRunner (`runner_kw`: its keywords) and say it is loaded: model, device or profile, dtype,
    load time, KV blocks, the engine process's pid (`engine_process`) and the MQTT broker if any."""
    from batchdeck.engine.sim.engine import make_engine

    bus = Bus()
    t0 = time.monotonic()
    llm = make_engine(cfg, live, sink=bus)
    runner = HeadlessRunner(llm, bus, install_signals=install_signals, prog=prog, **runner_kw)
    where = llm.profile.label() if cfg.sim else f"on {cfg.device}"
    settings = runner.settings
    runner.say(f"model {cfg.model} {where} ({cfg.dtype}) loaded in {time.monotonic() - t0:.1f} s; "
               f"{llm.blocks.num_blocks} KV blocks of {cfg.block_size} tokens"
               + (f"; engine process {engine_process}" if engine_process is not None else "")
               + (f"; MQTT {settings.host}:{settings.port} as {runner.engine_id}" if settings else ""))
    return runner


def start_metrics_gpu_monitor(runner: HeadlessRunner) -> asyncio.Task | None:
    """On a CUDA engine without MQTT (whose bridge runs its own), sample NVML every --gpu-interval s
    onto the runner's bus, for /metrics; None otherwise (CPU, --gpu-interval 0). Cancel the task to stop."""
    llm = runner.llm
    if runner.settings is not None or runner.gpu_interval <= 0 or llm.device.type != "cuda":
        return None
    from batchdeck.engine.service.gpu_monitor import GpuMonitor

    monitor = GpuMonitor(llm.device.index or 0, runner.gpu_interval, llm.kv_cache.num_bytes, clock=llm.clock)
    monitor.prepare()  # before requests arrive
    return asyncio.get_running_loop().create_task(monitor.run(runner.bus.publish))
