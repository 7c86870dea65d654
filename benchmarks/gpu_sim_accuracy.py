"""How close the simulator comes to the GPU: the same presets, seed and settings replayed on the real
engine and on the simulator (a profile calibrated on this device), compared.

Scenarios (shipped presets, timelines dropped, one config throughout):
  steady  quickstart's Poisson/gamma mix, rates scaled to --load (0.8) of the profile's throughput bound
  burst   fair-noisy-tenant (a steady tenant and a 40-request burst)
  azure   azure-conversation at its real pace and real lengths (length_scale 1)
For each: output throughput (target within 5%), TTFT and e2e p50/p99 (within 10%), and an iteration
check: the busy iterations of both runs (each with the plan it executed and the gap since the previous
one), per regime (decode / mixed), with the cost model's prediction bias on the real ones, so one run
says whether the model misprices the workload's iterations or the simulated engine runs other ones.
Async scheduling (overlapped iterations) is the device's default (on for cuda) on both sides, in the
calibration too; --async-scheduling / --no-async-scheduling sets it. Then a sweep of
max_num_seqs on `steady` (4+ settings) on both, and whether the simulator orders every pair of
settings the same way as the GPU by output throughput and by TTFT p99.

With --gpu-from RESULT.json and --profile, the GPU side is read from an earlier result and only the
simulator runs (no GPU needed): a new profile is scored against recorded GPU runs, with their
duration scale, steady rate and overlap.

    PYTHONPATH=. python benchmarks/gpu_sim_accuracy.py --out benchmarks/results/gpu_sim_accuracy_qwen3-0.6b.json
    PYTHONPATH=. python benchmarks/gpu_sim_accuracy.py --profile NEW.json --gpu-from benchmarks/results/gpu_sim_accuracy_qwen3-0.6b.json --out /tmp/rescored.json
    PYTHONPATH=. python benchmarks/gpu_sim_accuracy.py --model synthetic:tiny --device cpu --smoke --out /tmp/acc.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

METRICS = {"output_throughput": (("generation_throughput",), 0.05),
           "ttft_p50": (("time_to_first_token", "p50"), 0.10), "ttft_p99": (("time_to_first_token", "p99"), 0.10),
           "e2e_p50": (("e2e_request_latency", "p50"), 0.10), "e2e_p99": (("e2e_request_latency", "p99"), 0.10)}
# reported beside the metrics, no target: where a latency gap sits (arrival -> first scheduled, or after)
DIAGNOSTICS = {"queue_p50": ("request_queue_time", "p50"), "queue_p99": ("request_queue_time", "p99")}


def pick(summary, path):
    v = summary
    for k in path:
        v = (v or {}).get(k)
    return v


def iteration_table(checks):
    """One line per side and regime: busy iterations, mean measured and predicted gap, bias, mean shape,
    and of the gap, how long the host waited for the tokens (the device bounded the iteration) and the rest."""
    lines = []
    for side, c in checks.items():
        for regime, e in (c.get("by_regime") or {}).items():
            lines.append(f"  {side:3} {regime:6} n={e['samples']:5d} gap {e['measured_mean_s'] * 1e3:7.3f} ms "
                         f"model {e['predicted_mean_s'] * 1e3:7.3f} ms bias {e['total_bias']:+7.1%} (median {e['median_bias']:+7.1%}) "
                         f"err {e['mean_rel_error']:6.1%} rows {e['mean_rows']:6.1f} tokens {e['mean_tokens']:7.1f} "
                         f"ctx {e['mean_context_k'] * 1e3:6.0f} max {e['mean_max_context_k'] * 1e3:6.0f} "
                         f"wait {e['sync_wait_mean_s'] * 1e3:6.3f} host {e['host_mean_s'] * 1e3:6.3f} ms")
        for w in c.get("wake_by_idle") or ():
            lines.append(f"  {side:3} wake after {w['idle_median_s'] * 1e3:6.0f} ms idle (n={w['samples']:3d}): "
                         f"{w['measured_wake_median_s'] * 1e3:6.3f} ms, model {w['model_wake_median_s'] * 1e3:6.3f} ms")
        if c.get("largest_gaps"):
            top = c["largest_gaps"][0]
            lines.append(f"  {side:3} longest gap {top['gap_s'] * 1e3:.1f} ms at {top['at_s']:.2f} s (model "
                         f"{top['predicted_s'] * 1e3:.1f} ms)"
                         + (f"; gc {c['gc_collections_by_generation']}, pauses >= 10 ms (s into the run, incl. "
                            f"the engine's build and start): " + (", ".join(
                                f"{p['pause_s'] * 1e3:.0f} ms at {p['at_s']:.2f}" for p in c["gc_long_pauses"])
                                or "none") if "gc_seconds" in c else ""))
    return "\n" + "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default synthetic:qwen3-0.6b (with --gpu-from: the recorded one)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--profile", default=None, help="a profile to use (default: calibrate one now, on this device)")
    ap.add_argument("--load", type=float, default=0.8, help="steady scenario: share of the throughput bound offered")
    ap.add_argument("--steady-rate-scale", type=float, default=None, metavar="K",
                    help="steady scenario: multiply quickstart's rates by K instead of deriving K from --load and the "
                         "profile's bound (to replay the load of an earlier result, its steady_rate_scale)")
    ap.add_argument("--duration-scale", type=float, default=None, help="shorten the presets (default 0.5; smoke 0.05)")
    ap.add_argument("--azure-requests", type=int, default=None, help="azure scenario: first N trace requests (before "
                                                                     "--duration-scale; default 600)")
    ap.add_argument("--sweep", default=None, help="max_num_seqs values of the ranking sweep (default 8,16,32,64; "
                                                  "smoke 1,2,4,8)")
    ap.add_argument("--calibrate-budget", type=float, default=None,
                    help="seconds of calibration workloads when no --profile is given (default: calibrate's; smoke 45)")
    ap.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                    help="overlapped iterations in the real runs, the calibration and the simulator (default: the "
                         "device's default, on for cuda)")
    ap.add_argument("--smoke", action="store_true", help="CPU smoke run: small sizes")
    ap.add_argument("--samples-dir", default=None, help="write the busy iterations (shape, gap, wait for the device) "
                    "of the calibration and of each real scenario here, as JSON lines, for analysis")
    ap.add_argument("--gpu-from", default=None, metavar="RESULT.json",
                    help="read the GPU side from an earlier result of this benchmark and run only the simulator "
                         "(needs --profile; the recorded duration scale, steady rate and overlap are used)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    recorded = None
    if args.gpu_from:
        if not args.profile:
            ap.error("--gpu-from needs --profile (the profile to score against the recorded GPU runs)")
        recorded = json.loads(Path(args.gpu_from).read_text())
        sweep_values = ",".join(str(v) for v in recorded["sweep"]["max_num_seqs"])
        for flag, key, given in (("duration-scale", "duration_scale", args.duration_scale),
                                 ("steady-rate-scale", "steady_rate_scale", args.steady_rate_scale),
                                 ("async-scheduling", "async_scheduling", args.async_scheduling),
                                 ("sweep", "sweep", args.sweep and ",".join(str(int(v)) for v in args.sweep.split(","))),
                                 ("model", "model", args.model), ("smoke", "smoke", args.smoke or None),
                                 ("azure-requests", "azure_requests", args.azure_requests)):
            was = sweep_values if key == "sweep" else recorded.get(key)
            if given is not None and was is not None and given != was:
                ap.error(f"--{flag} {given}: {args.gpu_from} was run with {was}")
        args.duration_scale, args.steady_rate_scale = recorded["duration_scale"], recorded["steady_rate_scale"]
        args.async_scheduling, args.sweep = recorded["async_scheduling"], sweep_values
        args.smoke = bool(recorded.get("smoke", False))
        args.model = args.model or recorded["model"]
        args.azure_requests = args.azure_requests or recorded.get("azure_requests")
    args.model = args.model or "synthetic:qwen3-0.6b"
    args.azure_requests = args.azure_requests or 600
    if args.steady_rate_scale is not None and not args.steady_rate_scale > 0:
        ap.error(f"--steady-rate-scale {args.steady_rate_scale}: must be a positive multiple of the preset's rates")

    import torch

    from benchmarks.bench_common import (SCENARIO_CONFIG, GCWatch, command_line, default_dtype, real_overrides,
                                         limit_overrides, release_device_memory, scenario_presets,
                                         steady_load_scale)
    from batchdeck.presets.preset_driver import scaled_rates
    from batchdeck.engine.settings import defaults_for
    from batchdeck.engine.sim.calibrate import (DEFAULT_BUDGET_S, IterationTap, calibrate, check_iterations, wake_report,
                                                write_samples)
    from batchdeck.engine.sim.profile import load_profile
    from batchdeck.presets.replay import run_preset

    t_start = time.perf_counter()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        torch.set_num_threads(1)  # shared CPUs: timings with several threads per process are noise
    dtype = default_dtype(device)
    overlap = defaults_for(device)["async_scheduling"] if args.async_scheduling is None else args.async_scheduling
    scale = args.duration_scale or (0.05 if args.smoke else 0.5)
    # the runs' start-time limits (CUDA graphs are captured up to them); the profile is calibrated up to the same
    limits = ({"max_num_seqs": 8, "max_batched_tokens": 128} if args.smoke else
              {k: SCENARIO_CONFIG[k] for k in ("max_num_seqs", "max_batched_tokens")})
    def samples_path(name: str) -> str | None:
        if not args.samples_dir:
            return None
        Path(args.samples_dir).mkdir(parents=True, exist_ok=True)
        return str(Path(args.samples_dir) / f"{name}.jsonl")

    if args.profile:
        profile = load_profile(args.profile)
        profile_path = args.profile
    else:
        from batchdeck.engine.service.calibration_driver import drive_through_service

        budget = args.calibrate_budget or (45.0 if args.smoke else DEFAULT_BUDGET_S)
        profile = calibrate(args.model, device=device, dtype=dtype, budget_s=budget,
                            num_blocks=512 if args.smoke else None, max_num_seqs=limits["max_num_seqs"],
                            max_batched_tokens=limits["max_batched_tokens"], driver=drive_through_service,
                            driver_name="serving loop (AsyncEngine)", async_scheduling=overlap,
                            samples_out=samples_path("calibration"))
        profile_path = str(Path(args.out).with_suffix(".profile.json"))
        profile.save(profile_path)
    config = {**SCENARIO_CONFIG, **limits, "chunk_size": min(SCENARIO_CONFIG["chunk_size"], limits["max_batched_tokens"])}
    presets = scenario_presets(config, args.smoke, args.azure_requests)
    real_over = real_overrides(args.model, device, profile, **limit_overrides(limits), async_scheduling=overlap)
    sim_over = {"sim": profile_path, **limit_overrides(limits), "async_scheduling": overlap}
    cost = profile.cost.for_limits(limits["max_num_seqs"], limits["max_batched_tokens"])  # as the simulator prices

    # steady: offer --load of the bound (mean lengths from a simulated run at the preset's own rates)
    k, bound = steady_load_scale(presets["steady"], sim_over, scale, args.load)
    if args.steady_rate_scale is not None:
        k = args.steady_rate_scale
    presets["steady"] = scaled_rates(presets["steady"], k)

    if recorded is None:
        from batchdeck.engine.models import load_model

        loaded = load_model(args.model, device, dtype, 0)  # one load for every real run (speed does not depend on weights)

    def run(preset, over, extra=None, check=None, samples_to=None):
        """The run's summary; `check`: a dict to fill with the iteration check of its busy iterations
        (`samples_to`: a path to write them to)."""
        kw = {"loaded": loaded} if over is real_over else {}
        taps = []
        if check is not None:
            kw["on_start"] = lambda driver: taps.append(IterationTap(driver.engine.engine))
        with GCWatch() as gc_watch:
            rep = run_preset(preset, overrides={**over, **(extra or {})}, duration_scale=scale, **kw).report()
        if taps:
            samples = taps[0].samples()
            check.update(check_iterations(cost, samples), **gc_watch.summary(), wake_by_idle=wake_report(cost, samples))
            if samples_to:
                write_samples(samples_to, samples)
            taps[0].remove()
        release_device_memory(device)  # the finished engine's KV pool, before the next run allocates its own
        return rep["summary"]

    scenarios = {}
    for name, preset in presets.items():
        checks = {"gpu": {}, "sim": {}}
        if recorded is None:
            real = run(preset, real_over, check=checks["gpu"], samples_to=samples_path(f"real-{name}"))
            real_metrics = {m: pick(real, path) for m, (path, _) in METRICS.items()}
            real_diag = {m: pick(real, path) for m, path in DIAGNOSTICS.items()}
            num_requests = real.get("num_requests")
        else:
            was = recorded["scenarios"][name]
            real_metrics = {m: was["metrics"][m]["gpu"] for m in METRICS}
            real_diag = {m: v["gpu"] for m, v in (was.get("diagnostics") or {}).items()}
            num_requests = was["num_requests"]
            checks["gpu"] = {"recorded_with_profile": recorded["profile_path"]}
        sim = run(preset, sim_over, check=checks["sim"])
        if recorded is not None and sim.get("num_requests") != num_requests:
            raise SystemExit(f"{name}: the recorded GPU run had {num_requests} requests, this replay "
                             f"{sim.get('num_requests')}: run with the flags the recorded result was made with")
        rows = {}
        for m, (path, tol) in METRICS.items():
            r, s = real_metrics[m], pick(sim, path)
            err = None if not r else abs(s - r) / r
            rows[m] = {"gpu": r, "sim": s, "rel_error": err, "target": tol, "within": err is not None and err <= tol}
        diag = {m: {"gpu": real_diag.get(m), "sim": pick(sim, path)} for m, path in DIAGNOSTICS.items()}
        scenarios[name] = {"num_requests": num_requests, "metrics": rows, "diagnostics": diag, "iterations": checks}
        print(name, json.dumps({m: (round(v["gpu"] or 0, 4), round(v["sim"] or 0, 4),
                                    None if v["rel_error"] is None else round(v["rel_error"], 3))
                                for m, v in rows.items()}), flush=True)
        ms = lambda v: float("nan") if v is None else v * 1e3  # noqa: E731 - None: no request finished
        print(f"{name} queue time (arrival -> first scheduled), gpu / sim: " + ", ".join(
            f"{m} {ms(v['gpu']):.2f} / {ms(v['sim']):.2f} ms" for m, v in diag.items()), flush=True)
        print(f"{name} iterations:", iteration_table(checks), flush=True)

    values = sorted({min(int(v), limits["max_num_seqs"]) for v in (args.sweep or ("1,2,4,8" if args.smoke
                                                                                 else "8,16,32,64")).split(",")})
    sweep = {"gpu": {}, "sim": {}}
    for v in values:
        for side, over in (("gpu", real_over), ("sim", sim_over)):
            if side == "gpu" and recorded is not None:
                sweep["gpu"][v] = recorded["sweep"]["gpu"][str(v)]
                continue
            s = run(presets["steady"], over, {"max_num_seqs": v})
            sweep[side][v] = {"output_throughput": s["generation_throughput"],
                              "ttft_p99": pick(s, ("time_to_first_token", "p99"))}
    ranking = {}
    for metric in ("output_throughput", "ttft_p99"):
        pairs = list(itertools.combinations(values, 2))
        g, m = sweep["gpu"], sweep["sim"]
        agree = [(a, b) for a, b in pairs if None not in (g[a][metric], g[b][metric], m[a][metric], m[b][metric])
                 and (g[a][metric] > g[b][metric]) == (m[a][metric] > m[b][metric])]
        ranking[metric] = {"pairs": len(pairs), "agree": len(agree), "all_agree": len(agree) == len(pairs)}
    out = {"command": command_line("benchmarks/gpu_sim_accuracy.py"), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
           "device": (recorded["device"] if recorded is not None
                      else torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"), "model": args.model,
           **({"gpu_from": args.gpu_from, "simulated_on": "cpu" if device == "cpu" else device} if recorded else {}),
           "async_scheduling": overlap,
           "profile": profile.name, "profile_path": profile_path, "profile_fit": {k: v for k, v in profile.fit.items() if k != "shapes"},
           "duration_scale": scale, "smoke": args.smoke, "azure_requests": args.azure_requests,
           "config": config, "steady_rate_scale": k, "steady_bound": bound,
           "scenarios": scenarios, "sweep": {"max_num_seqs": values, **sweep}, "ranking": ranking,
           "torch": torch.__version__, "wall_time_s": round(time.perf_counter() - t_start, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1, default=str) + "\n")
    print(json.dumps(ranking), f"wall {out['wall_time_s']} s", flush=True)


if __name__ == "__main__":
    main()
