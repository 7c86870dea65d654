"""Host time per iteration: `batchdeck calibrate`'s serving-loop driver against `replay` of a steady
Poisson load, on one engine kind, so a cost model fitted on the first can be judged on the second.

Each busy iteration's gap (between consecutive iteration time stamps) splits into the time the host
waited for the iteration's tokens (`IterationRecord.sync_wait_time`: the device was still computing)
and the rest, the host's own work (scheduling, input preparation, launch, booking, the serving loop's
deliveries and submissions, telemetry, and whatever held the GIL). With overlapped iterations an
iteration costs about max(host, device): the host is what bounds it when its wait is near 0. The host
time is fitted per driver as c0 + c_row * rows + c_arrival * admitted + c_finish * finished, and
listed by row count for decode-only iterations.

Engines: `--sim PROFILE` (default: bench_common.DEFAULT_SIM_PROFILE) runs the simulated engine on a paced
clock (wall time), whose device time is the profile's and whose host work is the real scheduler, block
manager, telemetry and serving loop (no model runner); `--model M --device D` runs the real engine
(on a GPU: the real host work, the runner's included). Calibration workloads: the designed decode and
mixed ones at the replay's limits (max_num_seqs 64, max_batched_tokens 2048), `--calibrate-budget`
seconds. Replay: quickstart's mix, rates scaled to `--load` of the profile's throughput bound, as
benchmarks/gpu_sim_accuracy.py's steady scenario.

    PYTHONPATH=. python benchmarks/sim_host_time.py --out benchmarks/results/sim_host_time_cpu.json
    PYTHONPATH=. python benchmarks/sim_host_time.py --model synthetic:qwen3-0.6b --device cuda --out gpu_host_time.json
    PYTHONPATH=. python benchmarks/sim_host_time.py --duration-scale 0.05 --calibrate-budget 8 --out /tmp/h.json  # smoke
"""
from __future__ import annotations

import argparse
import asyncio
import platform
import time

import numpy as np

from benchmarks.bench_common import (DEFAULT_SIM_PROFILE, SCENARIO_CONFIG as CONFIG, SCENARIO_LIMITS as LIMITS,
                                     command_line, real_overrides, steady_load_scale, steady_preset,
                                     write_json)
from batchdeck.presets.preset_driver import scaled_rates


class PlanTap:
    """Keeps (record, admitted, plan rows) for each booked iteration of an engine (wraps its `step`)."""

    def __init__(self, engine):
        self.engine, self._step, self.rows = engine, engine.step, []
        self.workload = 0
        engine.step = self.step

    def step(self):
        result = self._step()
        if result is not None:
            chunks = result.plan.chunks
            self.rows.append((self.workload, result.record, sum(1 for c in chunks if c.start == 0),
                              len(chunks), all(c.num_tokens == 1 for c in chunks)))
        return result

    def idle(self) -> None:
        """The calibration driver's tap interface (it sets `workload` before each workload)."""

    def remove(self) -> None:
        del self.engine.step


def analyse(rows: list) -> dict:
    """Busy gaps (same workload, < 50 ms) split into wait and host, the host fit and its by-rows table."""
    gaps = []
    for (w0, r0, *_), (w1, r1, admitted, n_rows, decode_only) in zip(rows, rows[1:]):
        gap = r1.time - r0.time
        if w0 == w1 and 0 < gap < 0.05:
            wait = min(gap, r1.sync_wait_time)
            gaps.append((gap, wait, gap - wait, n_rows, admitted, r1.num_finished, decode_only))
    if not gaps:
        return {"busy_iterations": 0}
    a = np.array(gaps, dtype=float)
    gap, wait, host, n_rows, admitted, finished, dec = a.T
    x = np.column_stack([np.ones_like(host), n_rows, admitted, finished])
    coef, *_ = np.linalg.lstsq(x, host, rcond=None)
    out = {"busy_iterations": len(a), "gap_mean_s": gap.mean(), "sync_wait_mean_s": wait.mean(),
           "host_mean_s": host.mean(), "host_bound_share": float(np.mean(wait < 0.05 * gap)),
           "mean_rows": n_rows.mean(), "admitted_per_iteration": admitted.mean(),
           "finished_per_iteration": finished.mean(),
           "host_fit_s": dict(zip(("constant", "per_row", "per_admitted", "per_finished"), map(float, coef)))}
    table = []
    for lo, hi in ((1, 4), (4, 16), (16, 32), (32, 48), (48, 65)):
        m = (dec == 1) & (n_rows >= lo) & (n_rows < hi)
        if m.sum() >= 5:
            table.append({"rows": f"{lo}-{hi - 1}", "n": int(m.sum()), "host_median_s": float(np.median(host[m])),
                          "host_mean_s": float(host[m].mean()), "gap_mean_s": float(gap[m].mean()),
                          "finished_per_iteration": float(finished[m].mean())})
    out["decode_by_rows"] = table
    return {k: (float(v) if isinstance(v, np.floating) else v) for k, v in out.items()}


def show(name: str, r: dict) -> None:
    if not r.get("busy_iterations"):
        print(f"{name}: no busy iterations")
        return
    f = r["host_fit_s"]
    print(f"{name}: n={r['busy_iterations']} gap {r['gap_mean_s'] * 1e3:.3f} ms = wait {r['sync_wait_mean_s'] * 1e3:.3f} "
          f"+ host {r['host_mean_s'] * 1e3:.3f} ms (host-bound {r['host_bound_share']:.0%}); rows {r['mean_rows']:.1f}, "
          f"admitted {r['admitted_per_iteration']:.2f}, finished {r['finished_per_iteration']:.2f} per iteration\n"
          f"    host = {f['constant'] * 1e6:.0f} us + {f['per_row'] * 1e6:.1f} us/row + {f['per_admitted'] * 1e6:.0f} us/admitted"
          f" + {f['per_finished'] * 1e6:.0f} us/finished")
    for t in r["decode_by_rows"]:
        print(f"    decode rows {t['rows']:>5}: n={t['n']:5d} host median {t['host_median_s'] * 1e3:.3f} ms "
              f"(mean {t['host_mean_s'] * 1e3:.3f}), gap {t['gap_mean_s'] * 1e3:.3f} ms, finished {t['finished_per_iteration']:.2f}/it")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sim", default=DEFAULT_SIM_PROFILE, help="profile of the simulated engine (and of the steady rate)")
    ap.add_argument("--model", default=None, help="run the real engine on this model instead of the simulated one")
    ap.add_argument("--device", default=None)
    ap.add_argument("--load", type=float, default=0.8, help="steady replay: share of the profile's throughput bound")
    ap.add_argument("--duration-scale", type=float, default=0.2)
    ap.add_argument("--calibrate-budget", type=float, default=40.0, help="seconds of calibration workloads")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import torch

    from batchdeck.engine.config import EngineConfig, LiveConfig
    from batchdeck.engine.service.calibration_driver import drive_through_service
    from batchdeck.engine.sim.calibrate import design_workloads
    from batchdeck.engine.sim.clock import PacedClock
    from batchdeck.engine.sim.engine import make_engine
    from batchdeck.engine.sim.profile import load_profile
    from batchdeck.presets.replay import run_preset_async

    t_start = time.perf_counter()
    profile = load_profile(args.sim)
    real = args.model is not None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if real:
        from batchdeck.engine.models import load_model

        over = real_overrides(args.model, device, num_blocks=min(profile.num_blocks, 8192), async_scheduling=True)
        loaded = load_model(args.model, device, over["dtype"], 0)
        engine_kw = lambda: {"loaded": loaded}  # noqa: E731
    else:
        over = {"sim": args.sim, "async_scheduling": True, **LIMITS}
        engine_kw = lambda: {"clock": PacedClock(1.0)}  # noqa: E731

    # calibration workloads through the serving-loop driver
    cfg = EngineConfig(**over, seed=0, spec_k_limit=0)
    llm = make_engine(cfg, LiveConfig(**CONFIG), **engine_kw())
    workloads = [w for w in design_workloads(CONFIG["max_num_seqs"], CONFIG["max_batched_tokens"], llm.max_model_len,
                                             llm.blocks.num_blocks * cfg.block_size)
                 if w.kind in ("decode", "mixed")]
    tap = PlanTap(llm)
    drive_through_service(llm, workloads, tap, lambda line: None, args.calibrate_budget)
    tap.remove()
    calibration = analyse(tap.rows)
    show("calibration driver (decode + mixed workloads)", calibration)
    del llm

    # steady replay at --load of the bound
    preset = steady_preset()
    k, _bound = steady_load_scale(preset, {"sim": args.sim, **LIMITS}, args.duration_scale, args.load)
    preset = scaled_rates(preset, k)
    taps = []
    kw = engine_kw()
    asyncio.run(run_preset_async(preset, overrides=over, duration_scale=args.duration_scale,
                                 on_start=lambda d: taps.append(PlanTap(d.engine.engine)), gpu_monitor=False,
                                 **({"loaded": kw["loaded"]} if real else {"clock": kw["clock"]})))
    replay = analyse(taps[0].rows)
    show(f"replay steady (quickstart x{k:.1f})", replay)
    out = {"benchmark": "sim_host_time", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "command": command_line("benchmarks/sim_host_time.py"), "engine": f"real {args.model}" if real else f"simulated (profile {args.sim}, paced)",
           "device": torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU ({platform.processor() or platform.machine()})",
           "python": platform.python_version(), "config": CONFIG, "limits": LIMITS, "steady_rate_scale": k,
           "duration_scale": args.duration_scale, "calibrate_budget_s": args.calibrate_budget,
           "calibration_driver": calibration, "replay_steady": replay,
           "wall_time_s": round(time.perf_counter() - t_start, 1)}
    write_json(args.out, out)


if __name__ == "__main__":
    main()
