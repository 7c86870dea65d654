"""How fast the simulator replays: one hour of the Azure conversation trace (all ~19k requests, real
lengths, real pace) headless on virtual time; prints and saves simulated iterations per second (per
wall second, and per CPU second of the process, which is what counts when other work shares the cores).
max_num_seqs 256, max_batched_tokens 8192, chunk_size 2048, fcfs.

    PYTHONPATH=. python benchmarks/sim_speed.py --sim h200-qwen3-0.6b --out benchmarks/results/sim_speed.json
    PYTHONPATH=. python benchmarks/sim_speed.py --sim PROFILE.json --limit 500      # a short look
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sim", required=True, help="simulation profile (shipped name or JSON file)")
    ap.add_argument("--limit", type=int, default=None, help="first N requests of the trace (default: all)")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-batched-tokens", type=int, default=8192)
    ap.add_argument("--chunk-size", type=int, default=2048)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from batchdeck.presets import load_preset, resolve_preset
    from batchdeck.presets.replay import run_preset

    preset = load_preset(resolve_preset("azure-conversation"))
    trace = dataclasses.replace(preset.workload[0], start=0.0, limit=args.limit, length_scale=1.0)
    preset = dataclasses.replace(preset, workload=[trace], config={
        "policy": "fcfs", "max_num_seqs": args.max_num_seqs, "max_batched_tokens": args.max_batched_tokens,
        "chunk_size": args.chunk_size})
    t0, c0 = time.perf_counter(), time.process_time()
    result = run_preset(preset, overrides={"sim": args.sim})
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    report = result.report()
    s = report["summary"]
    n_it = len(result.telemetry.iterations)
    out = {"profile": args.sim, "requests": s["num_requests"], "simulated_s": s["span_s"], "iterations": n_it,
           "replay_wall_s": round(result.wall_time_s, 2), "total_wall_s": round(wall, 2),
           "total_cpu_s": round(cpu, 2),  # process CPU time: what the run costs when other work shares the cores
           "load_average_1m": os.getloadavg()[0],
           "simulated_iterations_per_s": round(n_it / result.wall_time_s, 1),
           "simulated_iterations_per_cpu_s": round(n_it / cpu, 1),
           "simulated_seconds_per_wall_second": round(s["span_s"] / result.wall_time_s, 1),
           "generation_throughput": s["generation_throughput"], "cpu": platform.processor() or platform.machine(),
           "cpus": os.cpu_count(), "python": platform.python_version()}
    print(json.dumps(out, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
