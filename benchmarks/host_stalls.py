"""Host stalls of the real engine under the steady scenario of the simulator's accuracy benchmark (its
load, settings and, unless --free-memory-pool, its KV pool: the profile's), with the replay's GPU
monitor (NVML sampling, on by default on CUDA) on and off.

A host stall is a busy iteration whose host part (gap since the previous iteration less the host's
wait for the device) exceeds --threshold-ms: the engine's thread was late, not the device. Reports,
per variant and repeat: host stalls (count, excess over the threshold, largest, and the largest in
the first 100 iterations), TTFT p50/p99 and output throughput; and on CUDA how long each NVML query
the monitor makes takes, the first time in this process and after.

    PYTHONPATH=. python benchmarks/host_stalls.py --repeats 3 --out benchmarks/results/host_stalls_qwen3-0.6b.json
    PYTHONPATH=. python benchmarks/host_stalls.py --model synthetic:tiny --device cpu --free-memory-pool --monitor off \
        --repeats 1 --duration-scale 0.05 --steady-rate-scale 0.5 --threshold-ms 20 --stacks 1   # CPU smoke run
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_common import (DEFAULT_SIM_PROFILE, RECORDED_STEADY_RATE_SCALE, command_line,  # noqa: E402
                                     default_dtype, log, real_overrides, release_device_memory, steady_preset,
                                     versions, write_json)
from batchdeck.engine.sim.calibrate import busy_gaps, host_part  # noqa: E402


def stalls(samples, threshold_s: float) -> dict:
    """Busy iterations (not after an idle wait) whose host part exceeds threshold_s."""
    hosts = [host_part(s, gap) for s, gap in busy_gaps(samples)]
    late = [h for h in hosts if h > threshold_s]
    return {"busy_iterations": len(hosts), "host_stalls": len(late),
            "excess_ms": round(sum(h - threshold_s for h in late) * 1e3, 2),
            "largest_host_ms": round(max(hosts, default=0.0) * 1e3, 2),
            "largest_host_first_100_ms": round(max(hosts[:100], default=0.0) * 1e3, 2),
            "host_mean_ms": round(sum(hosts) / len(hosts) * 1e3, 4) if hosts else None}


class StackSampler:
    """Samples every other thread's Python stack every `period_s` for the first `window_s` seconds
    after `start()` (time.monotonic stamps): where the threads were while the engine's thread stalled."""

    def __init__(self, period_s: float = 0.0005, window_s: float = 0.5, depth: int = 10):
        import threading

        self.period_s, self.window_s, self.depth = period_s, window_s, depth
        self.samples: list[tuple[float, dict[str, str]]] = []
        self._thread = threading.Thread(target=self._run, name="stack-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        import threading
        import traceback

        me = threading.get_ident()
        end = time.monotonic() + self.window_s
        while (now := time.monotonic()) < end:
            names = {t.ident: t.name for t in threading.enumerate()}
            stacks = {}
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
                frames = traceback.extract_stack(frame)[-self.depth:]
                stacks[names.get(ident, str(ident))] = " <- ".join(
                    f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in reversed(frames))
            self.samples.append((now, stacks))
            time.sleep(self.period_s)

    def during(self, t0: float, t1: float) -> dict[str, list[tuple[int, str]]]:
        """Per thread, its distinct stacks sampled in [t0, t1] (monotonic), most frequent first."""
        from collections import Counter

        per: dict[str, Counter] = {}
        for t, stacks in self.samples:
            if t0 <= t <= t1:
                for name, stack in stacks.items():
                    per.setdefault(name, Counter())[stack] += 1
        return {name: c.most_common(4) for name, c in per.items()}


def stall_stacks(samples, sampler: StackSampler, offset: float, first: int = 300, top: int = 2) -> list[dict]:
    """The `top` largest host parts among the first `first` busy iterations, with the stacks sampled
    during each (`offset`: time.monotonic() minus the engine clock)."""
    rows = [(host_part(s, gap), s.time - gap, s.time) for s, gap in busy_gaps(samples)[:first]]
    out = []
    for host, t0, t1 in sorted(rows, reverse=True)[:top]:
        out.append({"host_ms": round(host * 1e3, 2), "at_s": round(t1, 4),
                    "stacks": sampler.during(t0 + offset, t1 + offset)})
    return out


def nvml_query_times(device_index: int = 0, later: int = 5) -> dict:
    """Milliseconds of each NVML query GpuMonitor makes: the first call in this process, and the
    median of `later` calls after it (nvmlInit included as the first entry)."""
    import statistics

    import pynvml as nvml

    t = time.perf_counter()
    nvml.nvmlInit()
    out = {"nvmlInit": {"first_ms": (time.perf_counter() - t) * 1e3}}
    h = nvml.nvmlDeviceGetHandleByIndex(device_index)
    queries = {"name": lambda: nvml.nvmlDeviceGetName(h),
               "memory_v2": lambda: nvml.nvmlDeviceGetMemoryInfo(h, version=nvml.nvmlMemory_v2),
               "utilization": lambda: nvml.nvmlDeviceGetUtilizationRates(h),
               "power": lambda: nvml.nvmlDeviceGetPowerUsage(h),
               "power_limit": lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(h),
               "temperature": lambda: nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU),
               "sm_clock": lambda: nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_SM),
               "mem_clock": lambda: nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_MEM)}
    for name, q in queries.items():
        times = []
        for _ in range(later + 1):
            t = time.perf_counter()
            try:
                q()
            except Exception as exc:  # noqa: BLE001 - a query the device does not support
                out[name] = {"error": f"{type(exc).__name__}: {exc}"}
                break
            times.append((time.perf_counter() - t) * 1e3)
        else:
            out[name] = {"first_ms": times[0], "later_median_ms": statistics.median(times[1:])}
    nvml.nvmlShutdown()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="synthetic:qwen3-0.6b")
    ap.add_argument("--device", default=None)
    ap.add_argument("--monitor", default="on,off", help="GPU monitor variants to compare (default on,off)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--duration-scale", type=float, default=0.2)
    ap.add_argument("--steady-rate-scale", type=float, default=RECORDED_STEADY_RATE_SCALE)
    ap.add_argument("--threshold-ms", type=float, default=3.0)
    ap.add_argument("--stacks", type=float, default=0.0, metavar="SECONDS",
                    help="sample every thread's stack in each run's first SECONDS and report those sampled during "
                         "its two largest host stalls in the first 300 iterations")
    ap.add_argument("--sim", default=DEFAULT_SIM_PROFILE,
                    help="the profile whose KV pool (num_blocks, block_size) the engine takes, as the accuracy "
                         f"benchmark's real runs do (default {DEFAULT_SIM_PROFILE})")
    ap.add_argument("--free-memory-pool", action="store_true",
                    help="size the KV pool from free memory instead (the engine's default; the saved "
                         "host_stalls_*_qwen3-0.6b.json runs did so)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    variants = args.monitor.split(",")
    if any(v not in ("on", "off") for v in variants):
        ap.error(f"--monitor {args.monitor!r}: each variant is on or off")

    import torch

    from batchdeck.engine.models import load_model
    from batchdeck.engine.sim.calibrate import IterationTap
    from batchdeck.engine.sim.profile import load_profile
    from batchdeck.presets.replay import run_preset

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    nvml = nvml_query_times() if device.startswith("cuda") else None
    if nvml:
        log(f"NVML queries (ms): {nvml}")
    dtype = default_dtype(device)
    steady = steady_preset(args.steady_rate_scale)
    loaded = load_model(args.model, device, dtype, 0)
    over = real_overrides(args.model, device, None if args.free_memory_pool else load_profile(args.sim))
    runs = []
    for rep in range(args.repeats):
        for monitor in variants:
            taps = []
            sampler = StackSampler(window_s=args.stacks) if args.stacks else None

            def on_start(driver):
                taps.append(IterationTap(driver.engine.engine))
                if sampler is not None:
                    sampler.start()

            summary = run_preset(steady, overrides=over, duration_scale=args.duration_scale, loaded=loaded,
                                 gpu_monitor=monitor == "on", on_start=on_start).report()["summary"]
            offset = time.monotonic() - taps[0].engine.clock()
            row = {"monitor": monitor, "repeat": rep, "num_blocks": taps[0].engine.blocks.num_blocks, **stalls(taps[0].samples(), args.threshold_ms / 1e3),
                   **{f"ttft_{q}_ms": None if v is None else v * 1e3  # None: no request finished
                      for q, v in ((q, summary["time_to_first_token"][q]) for q in ("p50", "p99"))},
                   "output_throughput": summary["generation_throughput"]}
            if sampler is not None:
                row["stall_stacks"] = stall_stacks(taps[0].samples(), sampler, offset)
                for st in row["stall_stacks"]:
                    log(f"host stall {st['host_ms']} ms at {st['at_s']} s:")
                    for name, stacks in st["stacks"].items():
                        for stack, n in stacks:
                            log(f"  {name} x{n}: {stack}")
            taps[0].remove()
            release_device_memory(device)
            log(" ".join(f"{k}={round(v, 3) if isinstance(v, float) else v}" for k, v in row.items()
                         if k != "stall_stacks"))
            runs.append(row)
    write_json(args.out, {"benchmark": "host_stalls", "command": command_line("benchmarks/host_stalls.py"),
                          "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
                          "versions": versions(), "model": args.model, "threshold_ms": args.threshold_ms,
                          "steady_rate_scale": args.steady_rate_scale, "duration_scale": args.duration_scale,
                          "kv_pool": "engine's own sizing" if args.free_memory_pool else f"profile {args.sim}",
                          "nvml_query_ms": nvml, "runs": runs})


if __name__ == "__main__":
    main()
