"""The HTML replay report: one self-contained file (plots as base64 PNG data URIs, inline CSS, no
scripts, no links), made from the JSON report alone (`presets/report.py`).

Main figure (`main_figure`), all against engine time with the timeline's config changes marked
as dashed vertical lines (labelled with the change) and pauses shaded:
  1. throughput: prompt and generation tokens/s
  2. time to first token p50/p99, by arrival time
  3. inter-token latency (ITL, every gap between consecutive tokens) p50/p99 by the time of the
     later token, and time per output token (TPOT, per request) p50 by arrival time
  4. batch composition: prefill vs decode (and static-batching padding) tokens per iteration,
     with the running requests
  5. KV-cache usage and waiting requests
Then a per-phase bar chart (when the run has several phases) and tables: metrics for the run and
each phase side by side, the timeline, the events, and the requests.
"""
from __future__ import annotations

import base64
import html
import io
import math
from typing import Any, Mapping, Sequence

import numpy as np

from batchdeck.engine.service.metrics import percentile
from batchdeck.presets.compare import change_cell, fmt_num, fmt_s, metric_rows
from batchdeck.presets.report import phase_label

PALETTE = {"prefill": "#e07b39", "decode": "#3a7dc9", "padding": "#b9b9b9", "gen": "#3a7dc9", "prompt": "#e07b39",
           "p50": "#3a7dc9", "p99": "#c0392b", "kv": "#2e8b57", "waiting": "#8e44ad", "running": "#333333"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _bins(t_end: float, n: int = 80, min_width: float = 0.05) -> np.ndarray:
    """Edges of equal-width time bins from 0 to at least `t_end` (at most `n` bins, each >= min_width)."""
    width = max(t_end / n, min_width) if t_end > 0 else min_width
    return np.arange(max(1, math.ceil(t_end / width)) + 1) * width


def _bin_of(edges: np.ndarray, t: Any) -> np.ndarray:
    """The bin of each time in `t` (times beyond the edges go to the first / last bin)."""
    return np.clip(np.digitize(np.asarray(t, dtype=float), edges) - 1, 0, len(edges) - 2)


def _binned_percentile(edges: np.ndarray, t: Sequence[float], values: Sequence[float], q: float
                       ) -> tuple[list[float], list[float]]:
    """(bin centers, q-th percentile of the values in each bin), for the bins that hold values."""
    if not len(values):
        return [], []
    idx, v = _bin_of(edges, t), np.asarray(values, dtype=float)
    centers = (edges[:-1] + edges[1:]) / 2
    xs, ys = [], []
    for b in np.unique(idx):
        xs.append(float(centers[b]))
        ys.append(percentile(v[idx == b], q))
    return xs, ys


def _changes(report: Mapping[str, Any]) -> list[tuple[float, str]]:
    """(time, label) of each config change boundary (the phases after the first)."""
    out = []
    for ph in report.get("phases", [])[1:]:
        label = ", ".join(f"{k}={v}" for k, v in (ph.get("changes") or {}).items())
        out.append((ph["start_time"], label))
    return out


def _pauses(report: Mapping[str, Any], t_end: float) -> list[tuple[float, float]]:
    spans, start = [], None
    for e in report.get("events", []):
        if e.get("kind") == "pause" and start is None:
            start = e["time"]
        elif e.get("kind") == "resume" and start is not None:
            spans.append((start, e["time"]))
            start = None
    if start is not None:
        spans.append((start, t_end))
    return spans


def _mark(ax, changes, pauses, label: bool) -> None:
    for t, text in changes:
        ax.axvline(t, color="#444444", linestyle="--", linewidth=1.1, zorder=5)
        if label and text:
            ax.annotate(text, xy=(t, 1.0), xycoords=("data", "axes fraction"), xytext=(3, -3),
                        textcoords="offset points", va="top", ha="left", fontsize=8,
                        bbox=dict(boxstyle="round,pad=0.2", fc="white", ec="#888888", alpha=0.9), zorder=6)
    for a, b in pauses:
        ax.axvspan(a, b, color="#999999", alpha=0.2, zorder=0)


LEGEND = dict(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=4, fontsize=8, frameon=False, borderaxespad=0.2)


def main_figure(report: Mapping[str, Any]):
    """The five-panel time-series figure (a matplotlib Figure)."""
    plt = _pyplot()
    s = report.get("series") or {}
    times = s.get("time", [])
    reqs = [r for r in report.get("requests", []) if r.get("arrival") is not None and r.get("e2e_latency") is not None]
    t_end = max([*times, *(r["arrival"] + r["e2e_latency"] for r in reqs), 0.0]) or 1.0
    edges = _bins(t_end)
    centers = (edges[:-1] + edges[1:]) / 2
    width = float(edges[1] - edges[0])
    nb = len(centers)
    idx = _bin_of(edges, times)

    def per_bin(name: str) -> np.ndarray:
        return np.bincount(idx, weights=np.asarray(s[name], dtype=float), minlength=nb) if times else np.zeros(nb)

    n_it = np.bincount(idx, minlength=nb) if times else np.zeros(nb, dtype=int)
    per_it = np.maximum(n_it, 1)
    prompt = per_bin("num_prefill_tokens") / width
    gen = per_bin("num_generated_tokens") / width
    pre = per_bin("num_prefill_tokens") / per_it
    dec = per_bin("num_decode_tokens") / per_it
    pad = per_bin("num_padding_tokens") / per_it
    run = np.where(n_it > 0, per_bin("num_requests_running") / per_it, np.nan)

    lat_edges = _bins(t_end, n=30, min_width=0.1)
    with_ttft = [r for r in reqs if r.get("ttft") is not None]
    with_tpot = [r for r in reqs if r.get("tpot") is not None]
    gaps = s.get("itls") or [[] for _ in times]  # reports written before ITL was recorded have none
    gap_times = [t for t, g in zip(times, gaps) for _ in g]
    gap_values = [v * 1e3 for g in gaps for v in g]

    changes = _changes(report)
    pauses = _pauses(report, t_end)
    fig, axes = plt.subplots(5, 1, figsize=(11, 14), sharex=True, constrained_layout=True)
    name = (report.get("preset") or {}).get("name", "")
    fig.suptitle(f"batchdeck replay: {name}", fontsize=13, fontweight="bold")

    ax = axes[0]
    ax.plot(centers, gen, color=PALETTE["gen"], linewidth=1.6, label="generation tok/s (left)")
    ax.set_ylabel("generated tokens / s")
    ax.set_ylim(bottom=0)
    ax.set_title("Throughput", loc="left", fontsize=10)
    ax2 = ax.twinx()
    ax2.fill_between(centers, prompt, step="mid", color=PALETTE["prompt"], alpha=0.25, label="prompt tok/s (right)")
    ax2.set_ylabel("prompt tokens / s")
    ax2.set_ylim(bottom=0)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, **LEGEND)

    ax = axes[1]
    for q, key, style in ((50, "p50", "-o"), (99, "p99", "-s")):
        x, y = _binned_percentile(lat_edges, [r["arrival"] for r in with_ttft], [r["ttft"] for r in with_ttft], q)
        ax.plot(x, y, style, color=PALETTE[key], markersize=3, label=f"TTFT {key}")
    ax.set_ylabel("seconds")
    ax.set_title("Time to first token (by arrival time)", loc="left", fontsize=10)
    ax.legend(**LEGEND)

    ax = axes[2]
    for q, key, style in ((50, "p50", "-"), (99, "p99", "-")):
        x, y = _binned_percentile(edges, gap_times, gap_values, q)
        ax.plot(x, y, style, color=PALETTE[key], linewidth=1.3, label=f"ITL {key} (every gap, by token time)")
    x, y = _binned_percentile(lat_edges, [r["arrival"] for r in with_tpot], [r["tpot"] * 1e3 for r in with_tpot], 50)
    ax.plot(x, y, "o", color=PALETTE["p50"], markersize=3, label="TPOT p50 (per request, by arrival)")
    ax.set_ylabel("ms")
    if gap_values and max(gap_values) > 20 * max(percentile(gap_values, 50) or 1.0, 1e-3):
        ax.set_yscale("log")
    ax.set_title("Inter-token latency and time per output token", loc="left", fontsize=10)
    ax.legend(**LEGEND)

    ax = axes[3]
    stacks = [dec, pre] + ([pad] if any(pad) else [])
    labels = ["decode tokens", "prefill tokens"] + (["padding (static)"] if any(pad) else [])
    colors = [PALETTE["decode"], PALETTE["prefill"]] + ([PALETTE["padding"]] if any(pad) else [])
    ax.stackplot(centers, *stacks, labels=labels, colors=colors, alpha=0.85, step="mid")
    ax.set_ylabel("tokens / iteration")
    ax.set_title("Batch composition (mean per iteration)", loc="left", fontsize=10)
    if times:
        ax2 = ax.twinx()
        ax2.step(centers, run, where="mid", color=PALETTE["running"], linewidth=1.0, label="running requests (mean)")
        ax2.set_ylabel("running")
        ax2.set_ylim(bottom=0)
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, **LEGEND)

    ax = axes[4]
    ax.plot(times, [u * 100 for u in s.get("kv_cache_usage", [])], color=PALETTE["kv"], label="KV cache usage %")
    ax.set_ylim(0, 105)
    ax.set_ylabel("KV usage %")
    ax.set_xlabel("engine time (s)")
    ax.set_title("KV cache and queue", loc="left", fontsize=10)
    if times:
        ax2 = ax.twinx()
        ax2.plot(times, s["num_requests_waiting"], color=PALETTE["waiting"], linewidth=0.9, label="waiting requests")
        ax2.set_ylabel("waiting")
        ax2.set_ylim(bottom=0)
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, **LEGEND)

    for i, ax in enumerate(axes):
        _mark(ax, changes, pauses, label=(i == 0))
        ax.grid(True, alpha=0.3)
        ax.set_xlim(0, t_end)
    return fig


def phase_figure(report: Mapping[str, Any]):
    """Bars per phase: generation throughput, TTFT p99, ITL p99, e2e p99; None with one phase."""
    phases = report.get("phases") or []
    if len(phases) < 2:
        return None
    plt = _pyplot()
    panels = [("generation tok/s", lambda p: p.get("generation_throughput"), 1.0),
              ("TTFT p99 (s)", lambda p: (p.get("time_to_first_token") or {}).get("p99"), 1.0),
              ("ITL p99 (ms)", lambda p: (p.get("inter_token_latency") or {}).get("p99"), 1e3),
              ("e2e latency p99 (s)", lambda p: (p.get("e2e_request_latency") or {}).get("p99"), 1.0)]
    fig, axes = plt.subplots(1, len(panels), figsize=(11, 3.2), constrained_layout=True)
    labels = [f"{p['index']}: " + phase_label(p.get("changes"), "\n") for p in phases]
    colors = ["#7f8c8d"] + ["#3a7dc9", "#e07b39", "#2e8b57", "#8e44ad"] * len(phases)
    for ax, (title, get, scale) in zip(axes, panels):
        values = [(get(p) or 0.0) * scale for p in phases]
        ax.bar(range(len(values)), values, color=colors[: len(values)])
        ax.set_xticks(range(len(values)), labels, fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
        for x, v in enumerate(values):
            ax.annotate(f"{v:.3g}", (x, v), ha="center", va="bottom", fontsize=8)
    fig.suptitle("Per phase", fontsize=11)
    return fig


def figure_png(fig, dpi: int = 100) -> bytes:
    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1150px;color:#222}
h1{margin-bottom:.2em} h2{margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}
p.desc{white-space:pre-wrap;background:#f6f8fa;padding:.8em;border-radius:6px}
table{border-collapse:collapse;margin:.6em 0;font-size:13px}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:right} th{background:#f0f3f6}
td:first-child,th:first-child{text-align:left}
img{max-width:100%} .meta td{text-align:left} .err{color:#b00020;font-weight:bold}
details summary{cursor:pointer;margin:.5em 0}
"""


def render_html(report: Mapping[str, Any], title: str | None = None) -> str:
    """The whole report page as a string."""
    preset = report.get("preset") or {}
    run = report.get("run") or {}
    engine = run.get("engine") or {}
    name = preset.get("name", "replay")
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title or name)} report"
             f"</title><style>{CSS}</style></head><body>"]
    parts.append(f"<h1>{html.escape(name)}</h1>")
    if preset.get("description"):
        parts.append(f"<p class='desc'>{html.escape(preset['description'].strip())}</p>")
    if run.get("error"):
        parts.append(f"<p class='err'>The run failed: {html.escape(str(run['error']))}</p>")
    meta = [("model", preset.get("model")), ("device / dtype", f"{engine.get('device')} / {engine.get('dtype')}"),
            ("KV blocks", f"{engine.get('num_blocks')} x {engine.get('block_size')} tokens"),
            ("seed", preset.get("seed")), ("speed", run.get("speed")), ("duration scale", run.get("duration_scale")),
            ("wall time", fmt_s(run.get("wall_time_s"))),
            ("initial config", ", ".join(f"{k}={v}" for k, v in (run.get("initial_config") or {}).items()
                                         if k not in ("version", "policy_params")))]
    parts.append(_table(["run", ""], [(k, "-" if v is None else v) for k, v in meta], "meta"))

    sim = engine.get("simulation")
    if sim:
        parts.append(f"<p class='err'>SIMULATED: no model ran. Iteration times come from the cost model of profile "
                     f"{html.escape(str(sim.get('profile')))} ({html.escape(str(sim.get('device_name')))}).</p>")
    analytic = report.get("analytic")
    if analytic:
        from batchdeck.presets.analytic import analytic_lines

        lines = analytic_lines(analytic)
        if lines:
            parts.append("<h2>Queueing theory beside the run</h2><ul>"
                         + "".join(f"<li>{html.escape(line)}</li>" for line in lines) + "</ul>")
    parts.append("<h2>Over time</h2>")
    parts.append(_img(figure_png(main_figure(report)), f"{name}: throughput, latency, batch composition, KV usage"))
    pf = phase_figure(report)
    if pf is not None:
        parts.append(_img(figure_png(pf), f"{name}: per-phase comparison"))

    phases = report.get("phases") or []
    cols = [("whole run", report["summary"])]
    for ph in phases if len(phases) > 1 else []:
        cols.append((f"phase {ph['index']}: {phase_label(ph.get('changes'))}", ph))
    parts.append("<h2>Metrics</h2>")
    if len(phases) > 1:
        parts.append("<p>Phase k runs from the iteration where the k-th config change was applied to the next "
                     "change; its throughputs come from those iterations, its latencies from the requests that "
                     "arrived during it.</p>")
    header = ["metric", *(c for c, _ in cols)]
    show_change = len(cols) == 3
    if show_change:
        header.append("phase 1 vs phase 0")
    rows = []
    for label, values, cells in metric_rows([c for _, c in cols]):
        row = [label, *cells]
        if show_change:
            row.append(change_cell(label, values[1], values[2]))
        rows.append(row)
    parts.append(_table(header, rows))
    if phases:
        prow = [(ph["index"], ph["start_iteration"], "-" if ph.get("end_iteration") is None else ph["end_iteration"],
                 f"{ph['start_time']:.2f}", f"{ph['end_time']:.2f}", ph.get("num_requests", 0),
                 ", ".join(f"{k}={v}" for k, v in (ph.get("changes") or {}).items()) or "-") for ph in phases]
        parts.append(_table(["phase", "from iteration", "to iteration (excl.)", "from (s)", "to (s)", "requests",
                             "changes"], prow))

    parts.append("<h2>Timeline</h2>")
    tl = report.get("timeline") or []
    if tl:
        trows = [(t["index"], t["action"], _trigger(t), _what(t), t["status"],
                  "-" if t.get("applied_iteration") is None else t["applied_iteration"],
                  "-" if t.get("time") is None else f"{t['time']:.2f}", t.get("error") or "") for t in tl]
        parts.append(_table(["#", "action", "trigger", "what", "status", "applied iteration", "sent at (s)", "error"],
                            trows))
    else:
        parts.append("<p>No timeline: nothing scripted.</p>")

    parts.append("<h2>Events</h2>")
    events = report.get("events") or []
    shown = [e for e in events if e.get("kind") != "preemption"]
    n_pre = len(events) - len(shown)
    if n_pre:
        parts.append(f"<p>{n_pre} preemption event(s) not listed.</p>")
    if shown:
        erows = [(f"{e['time']:.3f}", e["iteration"], e["kind"], e.get("source", ""), _event_detail(e))
                 for e in shown[:500]]
        parts.append(_table(["time (s)", "iteration", "kind", "source", "detail"], erows))
    else:
        parts.append("<p>No events.</p>")

    reqs = report.get("requests") or []
    parts.append(f"<h2>Requests</h2><details><summary>{len(reqs)} request(s)</summary>")
    rrows = [(r.get("request_id"), r.get("tenant"), r.get("slo_class"), r.get("prompt_tokens"), r.get("output_tokens"),
              _f3(r.get("arrival")), fmt_s(r.get("ttft")), fmt_s(r.get("tpot")), fmt_s(r.get("itl_max")),
              fmt_s(r.get("e2e_latency")), r.get("num_preemptions"), fmt_num(r.get("slo_met")),
              r.get("finish_reason") or "") for r in reqs[:2000]]
    parts.append(_table(["id", "tenant", "class", "prompt", "output", "arrival (s)", "TTFT", "TPOT", "ITL max", "e2e",
                         "preempt.", "SLO met", "finish"], rrows))
    parts.append("</details></body></html>")
    return "\n".join(parts)


def _f3(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}"


def _trigger(t: Mapping[str, Any]) -> str:
    return f"at {t['at']:g} s" if t.get("at") is not None else f"at iteration {t.get('at_iteration')}"


def _what(t: Mapping[str, Any]) -> str:
    if t.get("action") == "set":
        return ", ".join(f"{k}={v}" for k, v in (t.get("changes") or {}).items())
    if t.get("action") == "pause":
        return f"pause {t.get('pause'):g} s"
    return "resume"


def _event_detail(e: Mapping[str, Any]) -> str:
    skip = {"kind", "time", "iteration", "source"}
    return ", ".join(f"{k}={v}" for k, v in e.items() if k not in skip)


def write_html(report: Mapping[str, Any], path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(render_html(report))


def save_main_figure(report: Mapping[str, Any], path: str, dpi: int = 100) -> None:
    """The main figure as a PNG file (for the README)."""
    with open(path, "wb") as f:
        f.write(figure_png(main_figure(report), dpi=dpi))
