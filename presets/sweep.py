"""`batchdeck sweep PRESET --sim PROFILE --set KEY=V1,V2 ...`: the preset replayed on the simulator for
every combination of settings, a table and an HTML plot of throughput against tail latency, the
settings that meet the preset's SLOs marked.

Each point is one whole run (the preset's timeline dropped, one config throughout), on virtual time,
with the same seed and workload. A setting meets the SLOs when every class's attainment (share of
requests within the class's TTFT and TPOT targets, engine/slo.py) is at least `--slo-attainment`
(default 0.99).
"""
from __future__ import annotations

import dataclasses
import html
import itertools
import json
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

METRICS = {  # name -> (summary path, higher is better, label)
    "goodput": (("goodput",), True, "goodput (SLO-met req/s)"),
    "throughput": (("generation_throughput",), True, "output tok/s"),
    "request_throughput": (("request_throughput",), True, "req/s"),
    "ttft_p50": (("time_to_first_token", "p50"), False, "TTFT p50 (s)"),
    "ttft_p99": (("time_to_first_token", "p99"), False, "TTFT p99 (s)"),
    "e2e_p50": (("e2e_request_latency", "p50"), False, "e2e p50 (s)"),
    "e2e_p99": (("e2e_request_latency", "p99"), False, "e2e p99 (s)"),
    "tpot_p99": (("time_per_output_token", "p99"), False, "TPOT p99 (s)"),
}


def metric_value(summary: Mapping[str, Any], metric: str) -> float | None:
    path = METRICS[metric][0]
    v: Any = summary
    for k in path:
        v = (v or {}).get(k) if isinstance(v, Mapping) else None
    return None if v is None else float(v)


def parse_grid(items: Sequence[tuple[str, Any]]) -> dict[str, list[Any]]:
    """`--set key=v1,v2` items (values parsed as YAML scalars) into {key: [values]}."""
    import yaml

    grid: dict[str, list[Any]] = {}
    for key, raw in items:
        values = raw if isinstance(raw, list) else str(raw).split(",")
        parsed = []
        for v in values:
            try:
                parsed.append(yaml.safe_load(v) if isinstance(v, str) else v)
            except yaml.YAMLError:
                parsed.append(v)
        if key in grid:
            raise ValueError(f"--set {key}: given twice; list its values once, comma-separated")
        grid[key] = parsed
    if not grid:
        raise ValueError("sweep: give at least one --set KEY=V1,V2,...")
    return grid


def combinations(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    keys = list(grid)
    return [dict(zip(keys, vals)) for vals in itertools.product(*(grid[k] for k in keys))]


def meets_slo(summary: Mapping[str, Any], attainment: float) -> bool:
    per_class = summary.get("slo_attainment") or {}
    return bool(per_class) and all((c.get("fraction") or 0.0) >= attainment for c in per_class.values())


def run_sweep(preset: Any, sim: str, grid: Mapping[str, Sequence[Any]], *, duration_scale: float = 1.0,
              slo_attainment: float = 0.99, overrides: Mapping[str, Any] | None = None,
              progress: Callable[[int, int, dict], None] | None = None) -> dict[str, Any]:
    """Replay `preset` on the simulator for every combination; returns the sweep document (JSON)."""
    from batchdeck.engine.config import ConfigError, LiveConfig, validate_changes
    from batchdeck.engine.sim.profile import load_profile
    from batchdeck.policies import validate_policy_params
    from batchdeck.presets.replay import as_preset, run_preset
    from batchdeck.presets.schema import bounds_for

    preset = as_preset(preset)
    profile = load_profile(sim)
    base_over = {"sim": sim, **(overrides or {})}
    combos = combinations(grid)
    start = LiveConfig(**{**LiveConfig().to_dict(), **preset.config, "version": 0})
    for combo in combos:  # every point is checked before anything runs
        try:
            validate_changes(start, combo, bounds_for(preset.engine), validate_policy_params)
        except ConfigError as exc:
            raise ValueError(f"sweep --set: {exc}") from None
    points = []
    for i, combo in enumerate(combos):
        run = dataclasses.replace(preset, config={**preset.config, **combo}, timeline=[])
        result = run_preset(run, overrides=base_over, duration_scale=duration_scale)
        report = result.report()
        s = report["summary"]
        point = {"settings": combo, "meets_slo": meets_slo(s, slo_attainment),
                 "metrics": {m: metric_value(s, m) for m in METRICS},
                 "slo_attainment": s.get("slo_attainment"), "num_requests": s.get("num_requests"),
                 "num_iterations": len(result.telemetry.iterations), "wall_time_s": result.wall_time_s,
                 "simulated_iterations_per_s": result.extra.get("simulated_iterations_per_s"),
                 "analytic": report.get("analytic"), "error": result.error}
        points.append(point)
        if progress is not None:
            progress(i + 1, len(combos), point)
    return {"format": "batchdeck-sweep/1", "preset": preset.name, "duration_scale": duration_scale,
            "simulation": profile.summary(), "grid": {k: list(v) for k, v in grid.items()},
            "slo_attainment_target": slo_attainment, "points": points}


def _fmt(v: float | None, metric: str) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if "throughput" in metric else (f"{v:.2f}" if metric == "goodput" else f"{v * 1000:.0f} ms")


def render_table(sweep: Mapping[str, Any], metric: str) -> str:
    keys = list(sweep["grid"])
    cols = ["throughput", "goodput", "ttft_p50", "ttft_p99", "e2e_p99"]
    if metric not in cols:
        cols.append(metric)
    head = keys + cols + ["bound tok/s", "M/G/1 P(e2e<=T)", "SLOs"]
    rows = [[str(p["settings"][k]) for k in keys] + [_fmt(p["metrics"][c], c) for c in cols] + _analytic_cells(p)
            + ["met" if p["meets_slo"] else "missed"] for p in sweep["points"]]
    best = best_point(sweep, metric)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths))]
    for p, r in zip(sweep["points"], rows):
        mark = "  <- best " + metric if p is best else ""
        lines.append("  ".join(c.rjust(w) for c, w in zip(r, widths)) + mark)
    sim = sweep["simulation"]
    lines.append(f"SIMULATED on {sim['device_name']} (profile {sim['profile']}); SLOs met = every class at "
                 f">= {sweep['slo_attainment_target']:.0%} attainment")
    return "\n".join(lines)


def _analytic_cells(point: Mapping[str, Any]) -> list[str]:
    a = point.get("analytic") or {}
    bound = (a.get("throughput_bound") or {}).get("output_tokens_per_s")
    mg = a.get("mg1") or {}
    est = mg.get("estimate")
    return [f"{bound:,.0f}" if bound else "-",
            (f"{est:.1%}" if est is not None else f"n/a rho={mg['rho']:.2f}" if "rho" in mg else "-")]


def best_point(sweep: Mapping[str, Any], metric: str) -> Mapping[str, Any] | None:
    """The best point by `metric` among those meeting the SLOs (all points if none does)."""
    higher = METRICS[metric][1]
    pts = [p for p in sweep["points"] if p["metrics"][metric] is not None]
    ok = [p for p in pts if p["meets_slo"]] or pts
    if not ok:
        return None
    return (max if higher else min)(ok, key=lambda p: p["metrics"][metric])


def write_html(sweep: Mapping[str, Any], path: str | Path, metric: str, latency: str = "ttft_p99") -> None:
    """One self-contained page: output throughput against tail latency, one point per setting
    (filled: SLOs met), labelled with its settings, and the table."""
    import base64

    from batchdeck.presets.html_report import _pyplot, figure_png  # the HTML report's figure helpers

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for p in sweep["points"]:
        x, y = p["metrics"][latency], p["metrics"]["throughput"]
        if x is None or y is None:
            continue
        ax.scatter([x], [y], s=60, color="#2e8b57" if p["meets_slo"] else "#c0392b",
                   facecolors=None if p["meets_slo"] else "none", linewidths=1.5)
        ax.annotate(", ".join(f"{k}={v}" for k, v in p["settings"].items()), (x, y), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel(METRICS[latency][2])
    ax.set_ylabel("output tokens/s")
    sim = sweep["simulation"]
    ax.set_title(f"{sweep['preset']}: SIMULATED {sim['device_name']} ({sim['profile']}) — filled: SLOs met")
    ax.grid(alpha=0.3)
    img = base64.b64encode(figure_png(fig)).decode()
    plt.close(fig)
    table = html.escape(render_table(sweep, metric))
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>sweep {html.escape(sweep['preset'])}</title>"
            "<style>body{font-family:sans-serif;margin:2em}pre{font-size:13px}</style></head><body>"
            f"<h1>Sweep: {html.escape(sweep['preset'])} (simulated)</h1>"
            f"<p>SIMULATED on {html.escape(sim['device_name'])}, profile {html.escape(sim['profile'])}. "
            f"Each point is one whole run of the preset with one setting. Filled green: every SLO class at "
            f"&ge; {sweep['slo_attainment_target']:.0%} attainment; hollow red: missed.</p>"
            f"<img alt='throughput vs {latency}' src='data:image/png;base64,{img}'/>"
            f"<pre>{table}</pre></body></html>")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(page, encoding="utf-8")


def save_json(sweep: Mapping[str, Any], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(sweep, indent=1, default=str) + "\n", encoding="utf-8")
