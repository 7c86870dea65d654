"""The console's default steady workload: a preset's streams (quickstart's) played by the one
workload player (presets/workload_player.py), repeating forever so things keep moving.

`--preset` runs the preset once, timeline included, through presets.replay.run_preset_async (the
PresetDriver); the operator's own submissions go through the client.
"""
from __future__ import annotations

from batchdeck.engine.service.async_engine import AsyncEngine
from batchdeck.presets.schema import Preset
from batchdeck.presets.workload_player import WorkloadPlayer
from batchdeck.presets.workload_streams import closed_loop_streams, generate_open_loop


def preset_period(preset: Preset) -> float:
    """How long one pass of the preset's workload lasts (its longest stream), at least 1 s."""
    ends = [1.0]
    for spec in preset.workload:
        for attr in ("duration", "at"):
            value = getattr(spec, attr, None)
            if isinstance(value, (int, float)):
                ends.append(float(value))
    return max(ends)


def steady_workload(engine: AsyncEngine, preset: Preset, *, loop: bool = False, speed: float = 1.0,
                    prefix: str = "r") -> WorkloadPlayer:
    """A player for a preset's requests as background load for the operator to tune against: with
    `loop`, the open-loop streams repeat every pass (`preset_period`) with fresh ids (closed-loop
    streams run their own course). The preset's timeline is not played; `run()` plays it
    from now."""
    lm = engine.engine.max_model_len
    items = generate_open_loop(preset.workload, preset.seed, lm, base_dir=preset.path.parent if preset.path else None)
    return WorkloadPlayer(engine, items, closed_loop_streams(preset.workload, preset.seed, lm), speed=speed,
                          repeat_every=preset_period(preset) if loop else None, id_prefix=prefix,
                          keep_requests=False)
