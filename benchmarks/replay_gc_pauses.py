"""Garbage-collection pauses during a replay: with and without refreezing what the replay keeps.

The steady scenario of benchmarks/gpu_sim_accuracy.py (quickstart's mix at `--steady-rate-scale` times its
rates, max_num_seqs 64, max_batched_tokens 2048, chunk 512, no timeline) replayed on a simulated engine
on a paced clock (`--sim PROFILE`: a real `AsyncEngine` in wall time, with the real scheduler, block
manager, telemetry and serving loop, device time from the profile), or on a real model (`--model`).
Each run is watched with `gc.callbacks` (bench_common.GCWatch): collections per generation, the
engine's start-up collection (`heap_freeze.hold`), and after it the longest pause, every full
collection's pause and every pause >= 10 ms. `refreeze: off` replaces heap_freeze.refreeze with a no-op (the
engine's start-up freeze only), as before the replay refroze its retained records.

    PYTHONPATH=. python benchmarks/replay_gc_pauses.py --out benchmarks/results/replay_gc_pauses_cpu.json
    PYTHONPATH=. python benchmarks/replay_gc_pauses.py --model synthetic:qwen3-0.6b --device cuda --out gpu_gc.json
    PYTHONPATH=. python benchmarks/replay_gc_pauses.py --model synthetic:tiny --device cpu --duration-scale 0.02 --steady-rate-scale 1 --out /tmp/g.json  # smoke
"""
from __future__ import annotations

import argparse
import gc
import platform
import time

from bench_common import (DEFAULT_SIM_PROFILE, RECORDED_STEADY_RATE_SCALE, SCENARIO_CONFIG as CONFIG, SCENARIO_LIMITS,
                          GCWatch, command_line, real_overrides, steady_preset, write_json)

from batchdeck.engine.sim.profile import load_profile


def run_once(preset, overrides: dict, duration_scale: float, refreeze: bool) -> dict:
    from batchdeck.engine.service import heap_freeze
    from batchdeck.engine.sim.clock import PacedClock
    from batchdeck.presets.replay import run_preset

    original, original_hold = heap_freeze.refreeze, heap_freeze.hold
    if not refreeze:
        heap_freeze.refreeze = lambda: False
    held_at = []  # perf_counter when the engine's hold (collect, freeze) began and ended

    def hold() -> None:
        held_at.append(time.perf_counter())
        original_hold()
        held_at.append(time.perf_counter())

    heap_freeze.hold = hold
    try:
        gc.collect()
        with GCWatch(long_pause_s=0.0) as watch:  # every pause
            t0 = time.perf_counter()  # (the watch's pauses are timed from its entry, microseconds before)
            clock = {"clock": PacedClock(1.0)} if "sim" in overrides else {}  # wall time, a real AsyncEngine
            result = run_preset(preset, overrides=overrides, duration_scale=duration_scale, **clock)
            wall = time.perf_counter() - t0
    finally:
        heap_freeze.refreeze, heap_freeze.hold = original, original_hold
    tee = result.driver.engine.engine.sink
    freezer = next((s for s in tee.sinks if isinstance(s, heap_freeze.RetainedFreezer)), None)
    summary = result.report()["summary"]
    pauses = watch.summary()["gc_long_pauses"]
    start, end = held_at[0] - t0, held_at[1] - t0
    later = [p for p in pauses if p["at_s"] > end]  # after the engine started
    return {"refreeze": refreeze, "wall_s": round(wall, 2), "iterations": len(result.telemetry.iterations),
            "requests": len(result.telemetry.requests),
            "retained_records": freezer.records if freezer else None,
            "refreezes": freezer.refreezes if freezer else None,
            "ttft_p99_s": (summary.get("time_to_first_token") or {}).get("p99"),
            "gc_collections_by_generation": watch.collections, "gc_seconds": round(watch.seconds, 4),
            "start_up_collection_ms": round(sum(p["pause_s"] for p in pauses if start <= p["at_s"] <= end) * 1e3, 1),
            "longest_pause_after_start_ms": round(max((p["pause_s"] for p in later), default=0) * 1e3, 1),
            "gen2_pauses_after_start": [{"at_s": round(p["at_s"], 2), "pause_ms": round(p["pause_s"] * 1e3, 1)}
                                        for p in later if p["generation"] == 2],
            "pauses_over_10ms_after_start": [{"at_s": round(p["at_s"], 2), "pause_ms": round(p["pause_s"] * 1e3, 1),
                                              "generation": p["generation"]} for p in later if p["pause_s"] >= 0.01]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sim", default=DEFAULT_SIM_PROFILE,
                    help="profile for a simulated engine on a paced clock (with --model: its KV pool size only)")
    ap.add_argument("--model", default=None, help="a real model instead of --sim (e.g. synthetic:qwen3-0.6b)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--duration-scale", type=float, default=0.5)
    ap.add_argument("--steady-rate-scale", type=float, default=RECORDED_STEADY_RATE_SCALE,
                    help="multiply quickstart's rates by this")
    ap.add_argument("--repeats", type=int, default=2, help="pairs of runs (off, on); the first pair also warms up")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    preset = steady_preset(args.steady_rate_scale)
    if args.model:  # as gpu_sim_accuracy.py's real runs: the profile's pool, the device's dtype
        overrides = real_overrides(args.model, args.device, load_profile(args.sim))
    else:
        overrides = {"sim": args.sim, **SCENARIO_LIMITS}
    runs = []
    for _ in range(args.repeats):
        for refreeze in (False, True):
            r = run_once(preset, overrides, args.duration_scale, refreeze)
            runs.append(r)
            print(f"refreeze {'on ' if refreeze else 'off'}: {r['iterations']} iterations, {r['wall_s']} s, gc "
                  f"{r['gc_collections_by_generation']}, start-up collection {r['start_up_collection_ms']} ms, "
                  f"longest pause after {r['longest_pause_after_start_ms']} ms, gen-2 after "
                  f"{[p['pause_ms'] for p in r['gen2_pauses_after_start']]} ms, refreezes {r['refreezes']}, "
                  f"TTFT p99 {r['ttft_p99_s'] * 1e3:.1f} ms")
    device_name = None
    if args.device.startswith("cuda"):
        import torch

        device_name = torch.cuda.get_device_name()
    out = {"benchmark": "replay_gc_pauses", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "command": command_line("benchmarks/replay_gc_pauses.py"), "engine": args.model or f"sim:{args.sim} (paced clock)",
           "device": args.device, "device_name": device_name, "host": platform.node(),
           "python": platform.python_version(), "duration_scale": args.duration_scale,
           "steady_rate_scale": args.steady_rate_scale, "config": CONFIG, "runs": runs}
    write_json(args.out, out)


if __name__ == "__main__":
    main()
