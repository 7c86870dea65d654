"""The replay report: a run's telemetry turned into one JSON document (pure; no engine, no clock).

Keys (a contract, read by `batchdeck compare` and the HTML report):

- `format`: "batchdeck-report/1"
- `preset`: name, description, model, seed, path, engine, config (initial), workload, timeline
- `run`: speed, duration_scale, wall_time_s, error, engine (sizing), initial_config
- `summary`: `engine.service.metrics.summarize` over the whole run plus `num_requests`, `num_rejected`,
  `num_clamped`, `num_padding_tokens`, `mean_batch_tokens`, `mean_running`
- `phases`: the same metrics for each span between config changes (see below)
- `timeline`: what happened to each timeline entry (applied / error / skipped, applied_iteration)
- `events`: every engine event as `Event.to_dict()` (config_change with applied_iteration and
  source, pause, resume, error, request_rejected, preemption)
- `requests`: one row per submitted request: the engine's RequestRecord fields plus
  stream_index, scheduled_arrival (workload seconds), max_tokens, clamped, prompt_hash,
  output_token_ids, and `error` for a request the engine refused
- `series`: per-iteration columns (time, step_time, prefill/decode/padding tokens, running,
  waiting, KV usage, ...) for plots

Phases. Boundaries are the distinct `applied_iteration`s of the run's `config_change` events
(timeline and operator changes alike; a change applied at iteration 0, before anything ran, only
sets phase 0's config). Phase k covers exactly the iterations [applied_k, applied_{k+1}) (phase 0
starts at iteration 0, the last phase runs to the end), so its throughputs, batch composition, KV
usage and preemptions come from the iterations that ran under its config. Its time span is
[t_k, t_{k+1}) where t_k is the engine time the change took effect (between iterations
applied_k - 1 and applied_k; phase 0 starts at 0, the last phase ends with the run).

Requests are attributed to phases by ARRIVAL time: a request belongs to the phase in whose time
span it arrived, so a phase's latencies (TTFT, inter-token, e2e, queue), SLO attainment and service
per tenant describe the requests that came in under that config (a request that arrived just before
a change and finished after it counts for the phase it arrived in); `num_requests` counts them, and
every request counts in exactly one phase. Completion rates follow the iterations instead:
`num_requests_finished`, `request_throughput` and `goodput` count the requests whose last token
came in one of the phase's iterations (per second of the phase's span), like the token throughputs.
"""
from __future__ import annotations

import bisect
import dataclasses
import hashlib
from typing import Any, Iterable, Mapping, Sequence

from batchdeck.engine.service.metrics import request_finish_time, summarize
from batchdeck.engine.telemetry import Event, IterationRecord, RequestRecord

REPORT_FORMAT = "batchdeck-report/1"


def prompt_hash(token_ids: Sequence[int]) -> str:
    """A short stable digest of a prompt's token ids (reports compare workloads without the ids)."""
    return hashlib.sha1(",".join(map(str, token_ids)).encode()).hexdigest()[:16]


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "__fspath__"):
        return str(value)
    return value


def preset_info(preset: Any) -> dict[str, Any]:
    """The preset as it ran (JSON form)."""
    return {
        "name": preset.name, "description": preset.description, "model": preset.model, "seed": preset.seed,
        "path": str(preset.path) if preset.path is not None else None, "engine": _jsonable(preset.engine),
        "config": _jsonable(preset.config), "workload": _jsonable(preset.workload),
        "timeline": _jsonable(preset.timeline),
    }


@dataclasses.dataclass
class Phase:
    index: int
    start_iteration: int
    end_iteration: int | None  # exclusive; None for the last phase
    start_time: float
    end_time: float | None
    changes: dict[str, Any]  # the config changes that opened this phase (empty for phase 0)
    sources: list[str]
    config: dict[str, Any]  # the live config in effect


def phase_label(changes: Mapping[str, Any] | None, sep: str = ", ") -> str:
    """What a phase changed, as the CLI table, the report's charts and its metrics table all name it;
    phase 0 (no change yet) is "start"."""
    return sep.join(f"{k}={v}" for k, v in (changes or {}).items()) or "start"


def phase_boundaries(events: Iterable[Event], initial_config: Mapping[str, Any]) -> list[Phase]:
    """The phases of a run from its config_change events (see the module docstring)."""
    changes = sorted((e for e in events if e.kind == "config_change"),
                     key=lambda e: (int(e.data.get("applied_iteration", e.iteration)), e.time))
    config = {k: v for k, v in initial_config.items() if k != "version"}
    phases = [Phase(0, 0, None, 0.0, None, {}, [], dict(config))]
    for e in changes:
        applied = int(e.data.get("applied_iteration", e.iteration))
        delta = dict(e.data.get("changes") or {})
        config = {**config, **delta}
        current = phases[-1]
        if applied == current.start_iteration:  # same boundary (or iteration 0): merge into this phase
            current.changes.update(delta)
            if e.data.get("source") is not None and current.index > 0:
                current.sources.append(str(e.data["source"]))
            current.config = dict(config)
            continue
        current.end_iteration, current.end_time = applied, e.time
        phases.append(Phase(len(phases), applied, None, e.time, None, delta,
                            [str(e.data["source"])] if e.data.get("source") is not None else [], dict(config)))
    return phases


def split_phases(phases: Sequence[Phase], iterations: Sequence[IterationRecord],
                 requests: Sequence[RequestRecord]) -> list[tuple[list[IterationRecord], list[RequestRecord]]]:
    """Each phase's iterations (by iteration number) and requests (by arrival time)."""
    starts_it = [p.start_iteration for p in phases]
    starts_t = [p.start_time for p in phases]
    out: list[tuple[list[IterationRecord], list[RequestRecord]]] = [([], []) for _ in phases]
    for it in iterations:
        out[max(0, bisect.bisect_right(starts_it, it.iteration) - 1)][0].append(it)
    for r in requests:
        out[max(0, bisect.bisect_right(starts_t, r.arrival) - 1)][1].append(r)
    return out


def _extras(iterations: Sequence[IterationRecord]) -> dict[str, Any]:
    n = len(iterations)
    return {
        "num_padding_tokens": sum(it.num_padding_tokens for it in iterations),
        "mean_batch_tokens": sum(it.num_prefill_tokens + it.num_decode_tokens for it in iterations) / n if n else 0.0,
        "mean_running": sum(it.num_requests_running for it in iterations) / n if n else 0.0,
        "mean_prefill_tokens": sum(it.num_prefill_tokens for it in iterations) / n if n else 0.0,
        "mean_decode_tokens": sum(it.num_decode_tokens for it in iterations) / n if n else 0.0,
    }


def _prefix_metrics(iterations: Sequence[IterationRecord], requests: Sequence[RequestRecord]) -> dict[str, Any]:
    """Prefix cache: hit rate (cached / looked-up prompt tokens at admission, the iterations' counts)
    and, over the requests, prompt tokens served from the cache vs computed at their first admission."""
    queries = sum(it.prefix_cache_queries for it in iterations)
    hits = sum(it.prefix_cache_hits for it in iterations)
    n = len(requests)
    cached = sum(r.num_cached_tokens for r in requests)
    prompt = sum(r.prompt_tokens for r in requests)
    return {
        "prefix_cache_queries": queries, "prefix_cache_hits": hits,
        "prefix_cache_hit_rate": hits / queries if queries else None,
        "mean_cached_prompt_tokens": cached / n if n else None,
        "mean_computed_prompt_tokens": (prompt - cached) / n if n else None,
    }


def run_end_time(iterations: Sequence[IterationRecord], requests: Sequence[RequestRecord]) -> float:
    ends = [it.time for it in iterations] + [request_finish_time(r) for r in requests]
    return max(ends, default=0.0)


def count_refused_as_missed(slo_attainment: dict[str, dict[str, Any]], refused_classes: Sequence[str | None]) -> None:
    """Count requests the engine refused (rejected at admission, failed on the client) as SLO misses of
    their class, in place: attainment over finished requests alone would rise as a setting rejects
    more of the load. Each class gains `rejected` (how many of its `count` were refused)."""
    for cls in refused_classes:
        if cls is None:
            continue
        entry = slo_attainment.setdefault(cls, {"met": 0, "count": 0, "fraction": 0.0})
        entry["count"] += 1
        entry["rejected"] = entry.get("rejected", 0) + 1
        entry["fraction"] = entry["met"] / entry["count"]


def build_report(
    *,
    preset: Mapping[str, Any],
    iterations: Sequence[IterationRecord],
    requests: Sequence[RequestRecord],
    events: Sequence[Event],
    initial_config: Mapping[str, Any],
    request_rows: Sequence[Mapping[str, Any]] | None = None,
    timeline: Sequence[Mapping[str, Any]] = (),
    run: Mapping[str, Any] | None = None,
    num_clamped: int = 0,
) -> dict[str, Any]:
    """The report document (see the module docstring).

    `request_rows`: one dict per submitted request (the driver's view: id, workload fields,
    tokens, error); the engine's RequestRecord fields are merged in by `request_id`. Without it,
    the rows are the RequestRecords alone.
    """
    iterations = sorted(iterations, key=lambda it: it.iteration)
    records = {r.request_id: r for r in requests}
    if request_rows is None:
        rows = [r.to_dict() for r in requests]
    else:
        rows = []
        for extra in request_rows:
            rec = records.get(extra["request_id"])
            row = rec.to_dict() if rec is not None else {"request_id": extra["request_id"]}
            row.update({k: v for k, v in extra.items() if k not in row or v is not None})
            rows.append(row)
    rejected = sum(1 for row in rows if row.get("error"))

    summary = summarize(iterations, requests)
    summary.update(_extras(iterations))
    summary.update(_prefix_metrics(iterations, requests))
    count_refused_as_missed(summary["slo_attainment"], [row.get("slo_class") for row in rows if row.get("error")])
    summary.update({"num_requests": len(rows), "num_rejected": rejected, "num_clamped": num_clamped,
                    "num_unfinished": sum(1 for row in rows if "e2e_latency" not in row and not row.get("error"))})

    phases = phase_boundaries(events, initial_config)
    end = run_end_time(iterations, requests)
    phase_docs = []
    for phase, (its, reqs) in zip(phases, split_phases(phases, iterations, requests)):
        stop = phase.end_time if phase.end_time is not None else max(end, phase.start_time)
        span = max(0.0, stop - phase.start_time)
        metrics = summarize(its, reqs, duration_s=span)
        metrics.update(_extras(its))
        metrics.update(_prefix_metrics(its, reqs))
        done = [r for r in requests if r.finish_iteration is not None
                and phase.start_iteration <= r.finish_iteration
                and (phase.end_iteration is None or r.finish_iteration < phase.end_iteration)]
        metrics.update({"num_requests_finished": len(done), "request_throughput": len(done) / span if span else 0.0,
                        "goodput": sum(1 for r in done if r.slo_met) / span if span else 0.0})
        phase_docs.append({
            "index": phase.index, "start_iteration": phase.start_iteration, "end_iteration": phase.end_iteration,
            "start_time": phase.start_time, "end_time": stop, "changes": phase.changes, "sources": phase.sources,
            "config": phase.config, "iterations": [its[0].iteration, its[-1].iteration] if its else None,
            "num_requests": len(reqs), **metrics,
        })

    return {
        "format": REPORT_FORMAT,
        "preset": dict(preset),
        "run": _jsonable(dict(run or {})) | {"initial_config": dict(initial_config)},
        "summary": summary,
        "phases": phase_docs,
        "timeline": [dict(t) for t in timeline],
        "events": [e.to_dict() for e in sorted(events, key=lambda e: (e.time, e.iteration))],
        "requests": rows,
        "series": iteration_series(iterations),
    }


SERIES_FIELDS = ("iteration", "time", "step_time", "num_prefill_tokens", "num_decode_tokens", "num_padding_tokens",
                 "num_generated_tokens", "num_requests_running", "num_requests_waiting", "num_preemptions",
                 "kv_cache_usage", "config_version", "spec_proposed", "spec_accepted", "itls", "prefix_cache_queries",
                 "prefix_cache_hits")


def iteration_series(iterations: Sequence[IterationRecord]) -> dict[str, list[Any]]:
    """Per-iteration columns (one list per field, in iteration order) for plots."""
    return {name: [getattr(it, name) for it in iterations] for name in SERIES_FIELDS}
