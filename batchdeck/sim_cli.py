"""`batchdeck calibrate` and `batchdeck sweep` (registered by batchdeck/cli.py)."""
from __future__ import annotations

import argparse
import sys


def register_cli(sub: argparse._SubParsersAction) -> None:
    from batchdeck.engine.service.flags import add_setting_flag
    from batchdeck.engine.settings import BY_NAME
    from batchdeck.engine.sim.calibrate import DEFAULT_BUDGET_S
    from batchdeck.presets.cli import _key_value, _positive
    from batchdeck.presets.sweep import METRICS

    cal = sub.add_parser("calibrate", help="run designed workloads on the real engine here and fit a simulation profile",
                         description="Run designed workloads (decode batches, mixed prefill + decode, prefill, idle "
                                     "arrivals) through the real engine as it serves (CUDA graphs, fused kernels, "
                                     "chunked prefill, the serving loop), fit the simulator's cost model to the time "
                                     "its iterations take and write the profile JSON (use it with --sim PROFILE.json).")
    cal.add_argument("--model", required=True, help="synthetic:<name> or a local HF model directory")
    cal.add_argument("--out", default=None, help="profile JSON (default: NAME.json)")
    cal.add_argument("--name", default=None, help="profile name (default: <gpu>-<model>, e.g. h200-qwen3-0.6b)")
    # the engine's own settings: the table's flags and per-device defaults (the largest batch and
    # iteration run are --max-num-seqs and --max-batched-tokens, the limits the profile serves up to)
    for name in ("device", "dtype", "max_num_seqs", "max_batched_tokens", "num_blocks", "gpu_memory_fraction"):
        add_setting_flag(cal, BY_NAME[name])
    cal.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, metavar="SECONDS",
                     help=f"time for the workloads (each gets its share; default {DEFAULT_BUDGET_S:g})")
    cal.add_argument("--inline", action="store_true", help="step the engine in one thread, without the serving "
                                                            "loop around it (default: the serving loop, as replay runs)")
    add_setting_flag(cal, BY_NAME["async_scheduling"])  # the profile must come from the engine as it will serve
    cal.add_argument("--quick", action="store_true", help="a small grid (CPU smoke runs)")
    cal.add_argument("--samples-out", default=None, metavar="OUT.jsonl",
                     help="also write the iterations the fit saw (shape, gap, wait for the device), one JSON per line")
    cal.set_defaults(func=_cmd_calibrate)

    sw = sub.add_parser("sweep", help="replay a preset on the simulator for a grid of settings; table + HTML plot",
                        description="Replay PRESET on the simulator once per combination of --set values (timeline "
                                    "dropped), print throughput and latency per setting, mark those meeting the "
                                    "preset's SLOs, and write an HTML plot of throughput against tail latency.")
    sw.add_argument("preset", help="a shipped preset's name or a preset YAML file")
    sw.add_argument("--sim", required=True, metavar="PROFILE", help="simulation profile: shipped name or JSON file")
    sw.add_argument("--set", dest="set_", action="append", type=_key_value, default=[], metavar="KEY=V1,V2",
                    help="a live setting and its values, comma-separated (repeatable: the grid is their product)")
    sw.add_argument("--metric", default="goodput", choices=sorted(METRICS), help="what 'best' means (default goodput)")
    sw.add_argument("--slo-attainment", type=float, default=0.99,
                    help="a setting meets the SLOs when every class reaches this attainment (default 0.99)")
    sw.add_argument("--duration-scale", type=_positive, default=1.0, metavar="F", help="shorten (<1) the preset")
    sw.add_argument("--html", default=None, metavar="OUT.html", help="the plot (default PRESET-sweep.html)")
    sw.add_argument("--out", default=None, metavar="OUT.json", help="the sweep as JSON (default PRESET-sweep.json)")
    sw.set_defaults(func=_cmd_sweep)


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from batchdeck.engine.sim.calibrate import calibrate

    from batchdeck.engine.service.calibration_driver import drive_through_service

    if not args.budget > 0:
        raise ValueError(f"--budget must be > 0 seconds, got {args.budget}")
    driver = {} if args.inline else {"driver": drive_through_service, "driver_name": "serving loop (AsyncEngine)"}
    profile = calibrate(args.model, device=args.device, dtype=args.dtype, name=args.name,
                        max_num_seqs=args.max_num_seqs, max_batched_tokens=args.max_batched_tokens,
                        quick=args.quick, num_blocks=args.num_blocks, gpu_memory_fraction=args.gpu_memory_fraction,
                        budget_s=args.budget, samples_out=args.samples_out,
                        async_scheduling=args.async_scheduling, **driver)
    out = args.out or f"{profile.name}.json"
    profile.save(out)
    print(f"profile {profile.name}: {out}")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from batchdeck.presets.sweep import parse_grid, render_table, run_sweep, save_json, write_html

    if not 0 < args.slo_attainment <= 1:
        raise ValueError(f"--slo-attainment must be in (0, 1], got {args.slo_attainment}")
    grid = parse_grid(args.set_)

    def progress(i: int, n: int, point: dict) -> None:
        print(f"sweep: {i}/{n} {point['settings']} in {point['wall_time_s']:.1f} s", file=sys.stderr, flush=True)

    sweep = run_sweep(args.preset, args.sim, grid, duration_scale=args.duration_scale,
                      slo_attainment=args.slo_attainment, progress=progress)
    name = sweep["preset"]
    save_json(sweep, args.out or f"{name}-sweep.json")
    html_path = args.html or f"{name}-sweep.html"
    write_html(sweep, html_path, args.metric)
    print(render_table(sweep, args.metric))
    print(f"sweep: {args.out or f'{name}-sweep.json'}, plot: {html_path}")
    return 0
