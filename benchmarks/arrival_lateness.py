"""How late a replay's requests reach the engine after their due time, and what it does to queue time
and TTFT: the burst and steady scenarios of benchmarks/gpu_sim_accuracy.py (fair-noisy-tenant, and
quickstart at `--steady-rate-scale` times its rates; max_num_seqs 64, max_batched_tokens 2048, chunk 512)
on the simulator, three ways: on a virtual clock (exact arrivals, no serving-loop delays), on a wall
clock (`PacedClock`: a real AsyncEngine thread and event loop, device time from the profile) with the
workload player's waits on asyncio's timers (as before engine/service/arrival_timer.py), and on a
wall clock with the ArrivalTimer. A request is stamped with its due time, so whatever delays its
submission shows up as queue time (arrival -> first scheduled) and TTFT.

    PYTHONPATH=. python benchmarks/arrival_lateness.py --out benchmarks/results/arrival_lateness_cpu.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (DEFAULT_SIM_PROFILE, RECORDED_STEADY_RATE_SCALE, SCENARIO_CONFIG, command_line,  # noqa: E402
                          scenario_presets, write_json)
from batchdeck.presets.preset_driver import scaled_rates  # noqa: E402


class AsyncioTimer:
    """The workload player's wait before the ArrivalTimer: asyncio's timer."""

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def close(self) -> None:
        pass


def run(preset, mode: str, profile: str, duration_scale: float) -> dict:
    from batchdeck.engine.sim.clock import PacedClock
    from batchdeck.presets.replay import run_preset
    from batchdeck.presets import workload_player

    original = workload_player.ArrivalTimer
    if mode == "wall clock, asyncio timers":
        workload_player.ArrivalTimer = AsyncioTimer
    try:
        kw = {} if mode == "virtual clock" else {"clock": PacedClock(1.0)}
        s = run_preset(preset, overrides={"sim": profile}, duration_scale=duration_scale, **kw).report()["summary"]
    finally:
        workload_player.ArrivalTimer = original
    def ms(section: str, q: str) -> float | None:
        v = (s.get(section) or {}).get(q)
        return None if v is None else round(v * 1e3, 3)  # None: no request finished

    return {"mode": mode, "requests": s["num_requests_finished"], "ttft_p50_ms": ms("time_to_first_token", "p50"),
            "ttft_p99_ms": ms("time_to_first_token", "p99"), "queue_p50_ms": ms("request_queue_time", "p50"),
            "queue_p99_ms": ms("request_queue_time", "p99")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sim", default=DEFAULT_SIM_PROFILE, help="profile (a shipped name or a JSON path)")
    ap.add_argument("--duration-scale", type=float, default=0.2)
    ap.add_argument("--steady-rate-scale", type=float, default=RECORDED_STEADY_RATE_SCALE,
                    help="steady: multiply quickstart's rates by this")
    ap.add_argument("--scenarios", default="burst,steady")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    presets = scenario_presets(azure_requests=200)
    presets["steady"] = scaled_rates(presets["steady"], args.steady_rate_scale)
    rows = []
    for name in args.scenarios.split(","):
        for mode in ("virtual clock", "wall clock, asyncio timers", "wall clock, ArrivalTimer"):
            row = {"scenario": name, **run(presets[name], mode, args.sim, args.duration_scale)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = {"benchmark": "arrival_lateness", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "command": command_line("benchmarks/arrival_lateness.py"),
           "device": f"CPU ({platform.processor() or platform.machine()}), simulated {args.sim}",
           "python": platform.python_version(), "config": SCENARIO_CONFIG, "duration_scale": args.duration_scale,
           "rows": rows}
    write_json(args.out, out)


if __name__ == "__main__":
    main()
