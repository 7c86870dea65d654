"""`batchdeck compare a.json b.json ...`: replay reports side by side.

One column per report (its summary), or with `--phases` one column per phase of each report.
With exactly two columns, a last column gives the change from the first to the second (ratio
for rates and latencies). The metric rows (`metric_rows`) are shared with the HTML report.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

Getter = Callable[[Mapping[str, Any]], Any]


def _get(*path: str) -> Getter:
    def get(m: Mapping[str, Any]) -> Any:
        value: Any = m
        for key in path:
            if not isinstance(value, Mapping) or key not in value:
                return None
            value = value[key]
        return value

    return get


def fmt_num(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def fmt_s(value: Any) -> str:
    """Seconds, in s above 1 s, else ms."""
    if value is None:
        return "-"
    return f"{value:.2f} s" if abs(value) >= 1.0 else f"{value * 1e3:.1f} ms"


def fmt_ms(value: Any) -> str:
    return "-" if value is None else f"{value * 1e3:.1f} ms"


def fmt_pct(value: Any) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


# (label, getter, formatter, better: "higher" | "lower" | None)
METRICS: list[tuple[str, Getter, Callable[[Any], str], str | None]] = [
    ("requests arrived", _get("num_requests"), fmt_num, None),
    ("requests finished", _get("num_requests_finished"), fmt_num, None),
    ("span", _get("span_s"), lambda v: "-" if v is None else f"{v:.2f} s", None),
    ("iterations", _get("num_iterations"), fmt_num, None),
    ("request throughput (req/s)", _get("request_throughput"), lambda v: fmt_num(v, 2), "higher"),
    ("prompt throughput (tok/s)", _get("prompt_throughput"), fmt_num, "higher"),
    ("generation throughput (tok/s)", _get("generation_throughput"), fmt_num, "higher"),
    ("goodput (SLO-met req/s)", _get("goodput"), lambda v: fmt_num(v, 2), "higher"),
    ("TTFT p50", _get("time_to_first_token", "p50"), fmt_s, "lower"),
    ("TTFT p90", _get("time_to_first_token", "p90"), fmt_s, "lower"),
    ("TTFT p99", _get("time_to_first_token", "p99"), fmt_s, "lower"),
    ("ITL p50 (every token gap)", _get("inter_token_latency", "p50"), fmt_ms, "lower"),
    ("ITL p90", _get("inter_token_latency", "p90"), fmt_ms, "lower"),
    ("ITL p99", _get("inter_token_latency", "p99"), fmt_ms, "lower"),
    ("ITL mean", _get("inter_token_latency", "mean"), fmt_ms, "lower"),
    ("ITL max", _get("inter_token_latency", "max"), fmt_ms, "lower"),
    ("TPOT p50 (per request)", _get("time_per_output_token", "p50"), fmt_ms, "lower"),
    ("TPOT p99", _get("time_per_output_token", "p99"), fmt_ms, "lower"),
    ("TPOT mean", _get("time_per_output_token", "mean"), fmt_ms, "lower"),
    ("e2e latency p50", _get("e2e_request_latency", "p50"), fmt_s, "lower"),
    ("e2e latency p90", _get("e2e_request_latency", "p90"), fmt_s, "lower"),
    ("e2e latency p99", _get("e2e_request_latency", "p99"), fmt_s, "lower"),
    ("queue time p50", _get("request_queue_time", "p50"), fmt_s, "lower"),
    ("queue time p99", _get("request_queue_time", "p99"), fmt_s, "lower"),
    ("step time p50", _get("step_time", "p50"), fmt_ms, None),
    ("step time p99", _get("step_time", "p99"), fmt_ms, None),
    ("mean tokens / iteration", _get("mean_batch_tokens"), fmt_num, None),
    ("mean running requests", _get("mean_running"), fmt_num, None),
    ("padding tokens (static)", _get("num_padding_tokens"), fmt_num, "lower"),
    ("KV cache usage peak", _get("kv_cache_usage_peak"), fmt_pct, None),
    ("preemptions", _get("num_preemptions"), fmt_num, "lower"),
    ("prefix cache hit rate", _get("prefix_cache_hit_rate"), fmt_pct, "higher"),
    ("prompt tokens computed / request", _get("mean_computed_prompt_tokens"), fmt_num, "lower"),
    ("prompt tokens cached / request", _get("mean_cached_prompt_tokens"), fmt_num, None),
    ("clamped requests", _get("num_clamped"), fmt_num, None),
    ("rejected requests", _get("num_rejected"), fmt_num, None),
    ("drafted tokens (speculation)", _get("speculation", "proposed"), fmt_num, None),
    ("draft acceptance", _get("speculation", "acceptance_rate"), fmt_pct, "higher"),
    ("generated tokens / iteration", _get("speculation", "tokens_per_iteration"), lambda v: fmt_num(v, 2), "higher"),
]
SPECULATION_ROWS = ("drafted tokens (speculation)", "draft acceptance")


def metric_rows(columns: Sequence[Mapping[str, Any]]) -> list[tuple[str, list[Any], list[str]]]:
    """(label, raw values, formatted values) for the fixed metrics plus SLO attainment per class and
    service per tenant (the union over all columns)."""
    rows = []
    for label, get, fmt, _ in METRICS:
        values = [get(c) for c in columns]
        if label in ("clamped requests", "rejected requests") and all(v in (None, 0) for v in values):
            continue
        if label in SPECULATION_ROWS and not any(_get("speculation", "proposed")(c) for c in columns):
            continue  # no column speculated
        rows.append((label, values, [fmt(v) for v in values]))
    classes = sorted({k for c in columns for k in (c.get("slo_attainment") or {})})
    for cls in classes:
        values = [_get("slo_attainment", cls, "fraction")(c) for c in columns]
        counts = [_get("slo_attainment", cls)(c) for c in columns]
        cells = [f"{fmt_pct(v)} ({n['met']}/{n['count']}" + (f", {n['rejected']} rejected" if n.get("rejected") else "")
                 + ")" if n else "-" for v, n in zip(values, counts)]
        rows.append((f"SLO met: {cls}", values, cells))
    tenants = sorted({k for c in columns for k in (c.get("service_per_tenant") or {})})
    for tenant in tenants:
        values = [_get("service_per_tenant", tenant, "window")(c) for c in columns]
        rows.append((f"service tokens: {tenant}", values, [fmt_num(v) for v in values]))
    return rows


def _better(label: str) -> str | None:
    for name, _, _, better in METRICS:
        if name == label:
            return better
    return "higher" if label.startswith("SLO met") else None


def change_cell(label: str, a: Any, b: Any) -> str:
    """How b compares with a: x ratio for positive numbers, with a marker when it is better."""
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)) or isinstance(a, bool):
        return ""
    better = _better(label)
    if label.startswith("SLO met"):
        diff = (b - a) * 100
        text = f"{diff:+.1f} pt"
    elif a > 0 and b >= 0:
        text = f"x{b / a:.2f}"
    else:
        text = f"{b - a:+g}"
    if better is not None and a != b:
        good = (b > a) if better == "higher" else (b < a)
        text += " (better)" if good else " (worse)"
    return text


def load_report(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            report = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not a JSON report ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(report, dict) or not isinstance(report.get("summary"), dict):
        raise ValueError(f"{path}: not a batchdeck replay report (no 'summary'; make one with "
                         "`batchdeck replay PRESET --headless --report FILE`)")
    return report


def _labels(paths: Sequence[str | Path]) -> list[str]:
    """Each report's column name: its file stem, or as much of its path as tells it from the others
    (a/r.json and b/r.json are `a/r` and `b/r`)."""
    parts = [Path(p).with_suffix("").parts for p in paths]
    labels = []
    for i, mine in enumerate(parts):
        depth = 1
        while depth < len(mine) and any(j != i and other[-depth:] == mine[-depth:] for j, other in enumerate(parts)):
            depth += 1
        labels.append("/".join(mine[-depth:]))
    return labels


def columns_for(paths: Sequence[str | Path], reports: Sequence[Mapping[str, Any]], phases: bool
                ) -> list[tuple[str, Mapping[str, Any]]]:
    cols: list[tuple[str, Mapping[str, Any]]] = []
    for path, report, label in zip(paths, reports, _labels(paths)):
        if phases and report.get("phases"):
            for ph in report["phases"]:
                change = ", ".join(f"{k}={v}" for k, v in (ph.get("changes") or {}).items())
                cols.append((f"{label}[{ph['index']}]" + (f" {change}" if change else ""), ph))
        else:
            cols.append((label, report["summary"]))
    return cols


def render_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def compare_text(paths: Sequence[str | Path], reports: Sequence[Mapping[str, Any]] | None = None,
                 phases: bool = False) -> str:
    """The comparison table as text."""
    reports = reports if reports is not None else [load_report(p) for p in paths]
    cols = columns_for(paths, reports, phases)
    header = ["metric", *(label for label, _ in cols)]
    two = len(cols) == 2
    if two:
        header.append("change")
    rows = []
    for label, values, cells in metric_rows([c for _, c in cols]):
        row = [label, *cells]
        if two:
            row.append(change_cell(label, values[0], values[1]))
        rows.append(row)
    lines = []
    for path, report in zip(paths, reports):
        p = report.get("preset") or {}
        run = report.get("run") or {}
        extra = ", ".join(f"{k}={run[k]}" for k in ("speed", "duration_scale") if run.get(k) not in (None, 1, 1.0))
        lines.append(f"{path}: preset {p.get('name', '?')}" + (f" ({extra})" if extra else "")
                     + (f" -- run failed: {run['error']}" if run.get("error") else ""))
    return "\n".join(lines) + "\n\n" + render_table(header, rows)


def main_compare(paths: Sequence[str], phases: bool = False, out=None) -> int:
    import sys

    out = out or sys.stdout
    out.write(compare_text(paths, phases=phases) + "\n")
    return 0
