"""Aggregates over the engine's telemetry records: a sliding window for the live console and
`summarize()` for whole-run reports.

Pure: nothing here reads a clock or touches a model. Times are engine times (seconds since engine
start, as in `engine/telemetry.py`); the caller passes `now`. Metric names follow vLLM's where one
exists (`prompt_throughput`, `generation_throughput`, `num_requests_running`, `kv_cache_usage`,
`time_to_first_token`, `inter_token_latency`, `e2e_request_latency`, ...).

Per-request metrics (latencies, goodput, SLO attainment, service per tenant) are attributed at the
moment the request FINISHES, because a RequestRecord is emitted then; a request still running
counts nowhere yet. Its finish time is `RequestRecord.finish`, or `arrival + e2e_latency` when the
engine left `finish` at its 0.0 default.

Latency names as vLLM reads them:
- `inter_token_latency` (ITL) {p50, p90, p99, mean, max}: over EVERY gap between consecutive output
  tokens of a request, all requests together; the gaps come with the iteration that produced the
  later token (`IterationRecord.itls`), so a stall (a long prefill chunk, a preemption in the middle
  of a decode) shows up in the tail as it happens. Tokens that arrive together (the accepted drafts
  of one speculative step) are one delivery: one gap, as vLLM counts it.
- `time_per_output_token` (TPOT) {p50, p90, p99, mean}: one value per finished request,
  (e2e - TTFT) / (output tokens - 1) (`RequestRecord.tpot`; None for a single output token).

Percentiles are numpy's (q in 0..100, linear interpolation between ranks).
"""
from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from batchdeck.engine.telemetry import IterationRecord, Record, RequestRecord

LATENCY_QUANTILES: tuple[int, ...] = (50, 90, 99)
STEP_QUANTILES: tuple[int, ...] = (50, 99)


def percentile(values: Iterable[float], q: float) -> float | None:
    """The q-th percentile (q in 0..100) of `values` (numpy's, linear interpolation between ranks);
    None when there are no values."""
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be within 0..100, got {q!r}")
    xs = np.fromiter(values, dtype=float)
    return float(np.percentile(xs, q)) if xs.size else None


def quantiles(values: Iterable[float | None], qs: Sequence[int] = LATENCY_QUANTILES, *,
              mean: bool = False, maximum: bool = False) -> dict[str, float | None]:
    """{"p50": ..., "p90": ..., ...} over the values that are not None (one numpy call); with
    `mean` / `maximum` also "mean" / "max"."""
    xs = np.asarray([v for v in values if v is not None], dtype=float)  # faster than fromiter on a generator
    if xs.size:
        out = {f"p{q}": float(v) for q, v in zip(qs, np.percentile(xs, qs))}
    else:
        out = {f"p{q}": None for q in qs}
    if mean:
        out["mean"] = float(xs.mean()) if xs.size else None
    if maximum:
        out["max"] = float(xs.max()) if xs.size else None
    return out


def request_finish_time(rec: RequestRecord) -> float:
    """When the request finished: `finish` if the engine set it, else arrival + e2e latency."""
    return rec.finish if rec.finish > 0.0 else rec.arrival + rec.e2e_latency


def _rate(count: float, span_s: float) -> float:
    return count / span_s if span_s > 0.0 else 0.0


def _aggregate(
    iterations: Sequence[IterationRecord],
    requests: Sequence[RequestRecord],
    span_s: float,
    latest: IterationRecord | None,
    service_total: dict[str, int],
) -> dict[str, Any]:
    """The metrics over the given records, rates divided by `span_s`."""
    prompt_tokens = sum(it.num_prefill_tokens for it in iterations)
    generated_tokens = sum(it.num_generated_tokens for it in iterations)
    met = [r for r in requests if r.slo_met]

    slo: dict[str, dict[str, Any]] = {}
    for r in requests:
        entry = slo.setdefault(r.slo_class, {"met": 0, "count": 0, "fraction": 0.0})
        entry["count"] += 1
        entry["met"] += int(r.slo_met)
    for entry in slo.values():
        entry["fraction"] = entry["met"] / entry["count"]

    service_window: dict[str, int] = {}
    for r in requests:
        service_window[r.tenant] = service_window.get(r.tenant, 0) + r.prompt_tokens + r.output_tokens
    service = {
        tenant: {"window": service_window.get(tenant, 0), "cumulative": service_total.get(tenant, 0)}
        for tenant in sorted(set(service_window) | set(service_total))
    }

    return {
        "span_s": span_s,
        "prompt_throughput": _rate(prompt_tokens, span_s),
        "generation_throughput": _rate(generated_tokens, span_s),
        "num_prompt_tokens": prompt_tokens,
        "num_generation_tokens": generated_tokens,
        "num_iterations": len(iterations),
        "iterations_per_s": _rate(len(iterations), span_s),
        "num_requests_running": latest.num_requests_running if latest else 0,
        "num_requests_waiting": latest.num_requests_waiting if latest else 0,
        "kv_cache_usage": latest.kv_cache_usage if latest else 0.0,
        "kv_cache_usage_peak": max((it.kv_cache_usage for it in iterations), default=0.0),
        "num_preemptions": sum(it.num_preemptions for it in iterations),
        "num_requests_finished": len(requests),
        "request_throughput": _rate(len(requests), span_s),
        "time_to_first_token": quantiles(r.ttft for r in requests),
        "inter_token_latency": quantiles([g for it in iterations for g in it.itls], mean=True, maximum=True),
        "time_per_output_token": quantiles((r.tpot for r in requests), mean=True),
        "e2e_request_latency": quantiles(r.e2e_latency for r in requests),
        "request_queue_time": quantiles(r.queue_time for r in requests),
        "goodput": _rate(len(met), span_s),
        "slo_attainment": dict(sorted(slo.items())),
        "service_per_tenant": service,
        "step_time": quantiles((it.step_time for it in iterations), STEP_QUANTILES),
        "speculation": _speculation(iterations, generated_tokens),
        "prefix_cache": _prefix_cache(iterations, latest),
    }


def _prefix_cache(iterations: Sequence[IterationRecord], latest: IterationRecord | None) -> dict[str, Any]:
    """Prompt tokens looked up at admission and served from the cache over the window (vLLM's
    prefix_cache_queries / prefix_cache_hits, in tokens), and the KV pool's states at the latest iteration."""
    queries = sum(it.prefix_cache_queries for it in iterations)
    hits = sum(it.prefix_cache_hits for it in iterations)
    return {"queries": queries, "hits": hits, "hit_rate": hits / queries if queries else None,
            "blocks_cached": latest.kv_blocks_cached if latest else 0,
            "blocks_evictable": latest.kv_blocks_evictable if latest else 0,
            "blocks_free": latest.kv_blocks_free if latest else 0}


def _speculation(iterations: Sequence[IterationRecord], generated_tokens: int) -> dict[str, Any]:
    """Drafted tokens verified and accepted; tokens per iteration (1 per running request without it)."""
    proposed = sum(it.spec_proposed for it in iterations)
    accepted = sum(it.spec_accepted for it in iterations)
    return {"proposed": proposed, "accepted": accepted,
            "acceptance_rate": accepted / proposed if proposed else None,
            "tokens_per_iteration": generated_tokens / len(iterations) if iterations else None}


class MetricsWindow:
    """Sliding-window aggregates over the last `window_s` seconds of engine time.

    Feed it records (`add_iteration`, `add_request`, or `add(topic, record)` as a bus listener) and
    ask `snapshot(now)`. Records older than the window are dropped as new ones arrive, so memory
    stays bounded by the window. Rates divide by the window length, or by `now - start` while the
    engine has run for less than one window (so the first seconds are not under-reported).
    Not thread-safe: feed and read it from one thread (the console's event loop).
    """

    def __init__(self, window_s: float = 10.0, start: float = 0.0) -> None:
        if not window_s > 0.0:
            raise ValueError(f"window_s must be > 0 seconds, got {window_s!r}")
        self.window_s = window_s
        self.start = start
        self._iterations: deque[IterationRecord] = deque()
        self._requests: deque[tuple[float, RequestRecord]] = deque()
        self._latest: IterationRecord | None = None
        self._service_total: dict[str, int] = {}

    def add_iteration(self, rec: IterationRecord) -> None:
        """Take one IterationRecord; it becomes the 'latest' for running/waiting/KV usage."""
        self._iterations.append(rec)
        if self._latest is None or rec.time >= self._latest.time:
            self._latest = rec
        self._prune(rec.time - self.window_s)

    def add_request(self, rec: RequestRecord) -> None:
        """Take one finished request's RequestRecord."""
        finish = request_finish_time(rec)
        self._requests.append((finish, rec))
        self._service_total[rec.tenant] = self._service_total.get(rec.tenant, 0) + rec.prompt_tokens + rec.output_tokens
        self._prune(finish - self.window_s)

    def add(self, topic: str, record: Record) -> None:
        """Sink/listener form: routes "iteration" and "request" records, ignores other topics."""
        if topic == "iteration" and isinstance(record, IterationRecord):
            self.add_iteration(record)
        elif topic == "request" and isinstance(record, RequestRecord):
            self.add_request(record)

    def _prune(self, cutoff: float) -> None:
        while self._iterations and self._iterations[0].time <= cutoff:
            self._iterations.popleft()
        while self._requests and self._requests[0][0] <= cutoff:
            self._requests.popleft()

    def snapshot(self, now: float) -> dict[str, Any]:
        """Metrics over records with time in (now - window_s, now]; see the module docstring.

        `num_requests_running`, `num_requests_waiting` and `kv_cache_usage` come from the latest
        IterationRecord seen, even if it is older than the window (an idle engine keeps its state).
        """
        cutoff = now - self.window_s
        self._prune(cutoff)
        iterations = [it for it in self._iterations if cutoff < it.time <= now]
        requests = [r for t, r in self._requests if cutoff < t <= now]
        span_s = max(0.0, min(self.window_s, now - self.start))
        snap = _aggregate(iterations, requests, span_s, self._latest, self._service_total)
        return {"window_s": self.window_s, "time": now, **snap}


def summarize(
    iterations: Sequence[IterationRecord],
    requests: Sequence[RequestRecord],
    duration_s: float | None = None,
) -> dict[str, Any]:
    """The same metrics over a whole run (no window), for reports.

    Rates divide by `duration_s`, or by the span from the first record (start of the first
    iteration or first arrival) to the last (end of the last iteration or last finish).
    `service_per_tenant` then has window == cumulative == the run's total.
    """
    if duration_s is None:
        starts = [it.time - it.step_time for it in iterations] + [r.arrival for r in requests]
        ends = [it.time for it in iterations] + [request_finish_time(r) for r in requests]
        duration_s = max(ends) - min(starts) if starts else 0.0
    latest = max(iterations, key=lambda it: it.time) if iterations else None
    totals: dict[str, int] = {}
    for r in requests:
        totals[r.tenant] = totals.get(r.tenant, 0) + r.prompt_tokens + r.output_tokens
    return {"window_s": None, **_aggregate(iterations, requests, max(0.0, duration_s), latest, totals)}


def _fmt(value: float | None, scale: float = 1.0, digits: int = 2) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def _fmt_ms(value: float | None) -> str:
    if value is None:
        return "-"
    ms = value * 1e3
    return f"{ms:.0f}" if ms >= 10 else f"{ms:.1f}"


def status_line(snapshot: dict[str, Any]) -> str:
    """A one-line periodic status in the spirit of vLLM's log line, from a snapshot/summary."""
    ttft = snapshot["time_to_first_token"]
    itl = snapshot["inter_token_latency"]
    return (
        f"Avg prompt throughput: {snapshot['prompt_throughput']:.1f} tokens/s, "
        f"Avg generation throughput: {snapshot['generation_throughput']:.1f} tokens/s, "
        f"Running: {snapshot['num_requests_running']} reqs, "
        f"Waiting: {snapshot['num_requests_waiting']} reqs, "
        f"KV cache usage: {snapshot['kv_cache_usage'] * 100:.1f}%, "
        f"Preemptions: {snapshot['num_preemptions']}, "
        f"TTFT p50/p99: {_fmt(ttft['p50'])}/{_fmt(ttft['p99'])} s, "
        f"ITL p50/p99: {_fmt_ms(itl['p50'])}/{_fmt_ms(itl['p99'])} ms"
    )
