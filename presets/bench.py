"""`batchdeck bench`: play a preset's workload against any OpenAI-compatible server and measure it
from the client side, like `vllm bench serve`.

    batchdeck bench PRESET --base-url http://127.0.0.1:8000/v1 [--model NAME] [--request-rate R|inf]
                    [--max-concurrency C] [--duration-scale S] [--report out.json] [--sweep-rates r1,r2,...]
                    [--api-key KEY] [--max-model-len N]

The requests are the ones `replay` submits (presets/workload_streams.py: the same arrivals,
lengths, token-id prompts, tenants and classes from the preset's seed; the tuning timeline is not
played: a remote server is not ours to steer). Each goes to `POST /v1/completions` with the prompt
as token ids, `max_tokens`, `ignore_eos` and `temperature` 0, streamed with usage; batchdeck's
`tenant`, `slo_class` and `priority` ride along (other servers ignore them). `--request-rate`
replaces the open-loop streams' arrival times with a Poisson process of that rate (`inf`: all at
once) keeping their order and lengths; `--max-concurrency` caps requests in flight.

Measured per request on the client (time.perf_counter): TTFT (send -> first streamed chunk with a
choice, as vLLM's bench counts it), ITL (every gap between consecutive such chunks), TPOT
((e2e - TTFT) / (output tokens - 1)) and e2e (send -> last byte). The report has the replay report's shape (`format`, `preset`, `run`,
`summary`, `requests`), so `batchdeck compare` reads it beside replay reports: its
`inter_token_latency` holds the client's gaps (every gap, vLLM's ITL; also under
`inter_token_latency_gaps`, the key of earlier bench reports) where a replay's holds the engine's. `--sweep-rates` runs the
workload once per rate, writes one report per rate (`out-rate<R>.json`) and a sweep document with
TTFT and ITL p50/p99 against rate (`out.json`).
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

BENCH_FORMAT = "batchdeck-report/1"
SWEEP_FORMAT = "batchdeck-bench-sweep/1"
DEFAULT_MAX_MODEL_LEN = 4096


def register_cli(sub: Any) -> None:
    p = sub.add_parser("bench", help="play a preset's workload against an OpenAI-compatible server (client-side "
                                     "TTFT/ITL/TPOT/e2e, a report compare reads)",
                       description=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("preset", help="a shipped preset's name or a preset YAML file")
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="the server's OpenAI base URL")
    p.add_argument("--model", default=None, help="model name to send (default: the first of GET /v1/models)")
    p.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    p.add_argument("--request-rate", type=parse_rate, default=None,
                   help="requests/s for the open-loop streams (Poisson), or inf for all at once "
                        "(default: the preset's own arrivals)")
    p.add_argument("--max-concurrency", type=_positive_int, default=None, help="at most this many requests in flight")
    p.add_argument("--duration-scale", type=float, default=1.0, help="shorten (<1) or stretch the preset")
    p.add_argument("--max-model-len", type=_positive_int, default=None,
                   help="clamp prompt + output to this (default: the server's max_model_len from /v1/models)")
    p.add_argument("--sweep-rates", type=parse_rates, default=None, metavar="R1,R2,...",
                   help="run once per request rate and report TTFT/ITL p50/p99 against rate")
    p.add_argument("--report", default=None, help="write the JSON report here (default: PRESET-bench.json)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a single request may take")
    p.set_defaults(func=cmd_bench)


def parse_rate(text: str) -> float:
    if text.strip().lower() in ("inf", "infinity"):
        return math.inf
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected requests/s > 0 or inf, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected requests/s > 0 or inf, got {text!r}")
    return value


def parse_rates(text: str) -> list[float]:
    rates = [parse_rate(part) for part in text.split(",") if part.strip()]
    if not rates:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of rates, got {text!r}")
    return rates


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


# ---------------------------------------------------------------------------------------------
# One request


@dataclass
class BenchResult:
    """What the client saw of one request (times in seconds since the bench started)."""

    index: int
    stream_index: int
    tenant: str
    slo_class: str
    priority: int
    scheduled_arrival: float  # workload time (after --request-rate)
    prompt_tokens: int
    max_tokens: int
    clamped: bool
    arrival: float = 0.0  # when it was sent
    response_id: str | None = None
    ttft: float | None = None
    e2e: float | None = None
    output_tokens: int = 0
    finish_reason: str | None = None
    itl: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.e2e is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


async def send_one(client: Any, url: str, headers: dict[str, str], model: str, item: Any, result: BenchResult,
                   t0: float) -> None:
    payload = {"model": model, "prompt": list(item.prompt_token_ids), "max_tokens": item.max_tokens,
               "temperature": 0.0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
               "tenant": item.tenant, "slo_class": item.slo_class, "priority": item.priority}
    start = time.perf_counter()
    result.arrival = start - t0
    last = None
    chunks = 0
    try:
        async with client.stream("POST", url, json=payload, headers=headers) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode(errors="replace")
                result.error = f"HTTP {resp.status_code}: {_error_message(body)}"
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                now = time.perf_counter()
                obj = json.loads(data)
                result.response_id = result.response_id or obj.get("id")
                for choice in obj.get("choices") or ():
                    if choice.get("text") is not None:  # "" too: a token whose text is not out yet
                        chunks += 1
                        if last is None:
                            result.ttft = now - start
                        else:
                            result.itl.append(now - last)
                        last = now
                    if choice.get("finish_reason"):
                        result.finish_reason = choice["finish_reason"]
                usage = obj.get("usage")
                if usage:
                    result.output_tokens = int(usage.get("completion_tokens") or 0)
        result.e2e = time.perf_counter() - start
        if not result.output_tokens:
            result.output_tokens = chunks  # a server that sends no usage: one token per chunk
    except Exception as exc:  # the server went away, timed out, sent garbage: a failed request, not a crash
        result.error = f"{type(exc).__name__}: {exc}"


def _error_message(body: str) -> str:
    try:
        return str(json.loads(body)["error"]["message"])
    except Exception:
        return body[:200]


# ---------------------------------------------------------------------------------------------
# The workload


def workload(preset: Any, max_model_len: int, request_rate: float | None) -> tuple[list[Any], list[Any]]:
    """(open-loop items with their arrivals, closed-loop streams) as replay builds them."""
    from batchdeck.presets.workload_streams import closed_loop_streams, generate_open_loop

    items = generate_open_loop(preset.workload, preset.seed, max_model_len, preset.base_dir)
    if request_rate is not None:
        rng = random.Random(f"batchdeck:bench:{preset.seed}:{request_rate}")
        t = 0.0
        timed = []
        for item in items:
            if math.isfinite(request_rate):
                t += rng.expovariate(request_rate)
            timed.append(dataclasses.replace(item, arrival=t if math.isfinite(request_rate) else 0.0))
        items = timed
    return items, closed_loop_streams(preset.workload, preset.seed, max_model_len)


async def run_bench(preset: Any, base_url: str, *, model: str | None = None, api_key: str | None = None,
                    request_rate: float | None = None, max_concurrency: int | None = None,
                    max_model_len: int | None = None, timeout: float = 600.0, progress: Any = None
                    ) -> dict[str, Any]:
    """Play the workload against `base_url`; returns the report."""
    import httpx

    base_url = base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=30.0), limits=limits) as client:
        served = await _served_model(client, base_url, headers)
        model = model or served.get("id")
        if not model:
            raise ValueError(f"{base_url}/models lists no model; give --model")
        max_len = max_model_len or served.get("max_model_len") or DEFAULT_MAX_MODEL_LEN
        items, closed = workload(preset, int(max_len), request_rate)
        url = base_url + "/completions"
        await _warm_up(client, url, headers, model)
        gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        results: list[BenchResult] = []
        t0 = time.perf_counter()

        def new_result(item: Any) -> BenchResult:
            r = BenchResult(len(results), item.stream_index, item.tenant, item.slo_class, item.priority, item.arrival,
                            item.num_prompt_tokens, item.max_tokens, item.clamped)
            results.append(r)
            return r

        async def fire(item: Any) -> BenchResult:
            result = new_result(item)
            if gate is None:
                await send_one(client, url, headers, model, item, result, t0)
            else:
                async with gate:
                    await send_one(client, url, headers, model, item, result, t0)
            if progress is not None:
                progress(result)
            return result

        async def open_loop() -> None:
            tasks = []
            for item in items:
                delay = t0 + item.arrival - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(fire(item)))
            await asyncio.gather(*tasks)

        async def client_loop(stream: Any, item: Any) -> None:
            while item is not None:
                await fire(item)
                item = stream.on_finished(time.perf_counter() - t0)

        jobs = [open_loop()] + [client_loop(s, item) for s in closed for item in s.initial()]
        await asyncio.gather(*jobs)
        wall = time.perf_counter() - t0
    run = {"kind": "bench", "base_url": base_url, "model": model, "request_rate": _rate_json(request_rate),
           "max_concurrency": max_concurrency, "max_model_len": int(max_len), "wall_time_s": wall}
    return build_bench_report(preset, results, run)


async def _warm_up(client: Any, url: str, headers: dict[str, str], model: str) -> None:
    """One short request before the clock starts (as vLLM's bench sends a test prompt): it checks that
    the server answers and opens a connection, so the first timed request pays for neither."""
    payload = {"model": model, "prompt": [1, 2, 3, 4], "max_tokens": 2, "temperature": 0.0, "ignore_eos": True,
               "stream": True}
    try:
        async with client.stream("POST", url, json=payload, headers=headers) as resp:
            body = await resp.aread()
    except Exception as exc:
        raise ValueError(f"cannot reach {url}: {type(exc).__name__}: {exc}") from None
    if resp.status_code != 200:
        raise ValueError(f"{url} refused the test request: HTTP {resp.status_code}: "
                         f"{_error_message(body.decode(errors='replace'))}")


async def _served_model(client: Any, base_url: str, headers: dict[str, str]) -> dict[str, Any]:
    try:
        resp = await client.get(base_url + "/models", headers=headers)
    except Exception as exc:
        raise ValueError(f"cannot reach {base_url}/models: {type(exc).__name__}: {exc}") from None
    if resp.status_code != 200:
        raise ValueError(f"{base_url}/models answered HTTP {resp.status_code}: {_error_message(resp.text)}")
    data = resp.json().get("data") or []
    return data[0] if data else {}


def _rate_json(rate: float | None) -> float | str | None:
    return "inf" if rate is not None and math.isinf(rate) else rate


# ---------------------------------------------------------------------------------------------
# The report


def _records(results: Sequence[BenchResult]) -> list[Any]:
    """Client-side RequestRecords of the requests that completed (the shape summarize() reads)."""
    from batchdeck.engine.slo import DEFAULT_SLO_TARGETS, slo_met
    from batchdeck.engine.telemetry import RequestRecord
    from batchdeck.engine.service.metrics import percentile

    out = []
    for r in results:
        if r.error is not None or r.e2e is None:
            continue
        gaps = r.itl
        out.append(RequestRecord(
            request_id=r.response_id or str(r.index), tenant=r.tenant, slo_class=r.slo_class, priority=r.priority,
            prompt_tokens=r.prompt_tokens, output_tokens=r.output_tokens, arrival=r.arrival, queue_time=0.0,
            ttft=r.ttft, tpot=r.tpot, itl_p50=percentile(gaps, 50), itl_p99=percentile(gaps, 99),
            itl_max=max(gaps, default=None), e2e_latency=r.e2e, finish_reason=r.finish_reason or "stop",
            num_preemptions=0, slo_met=slo_met(DEFAULT_SLO_TARGETS, r.slo_class, r.ttft, r.tpot),
            first_token_iteration=None, finish_iteration=None, finish=r.arrival + r.e2e))
    return out


ENGINE_ONLY_METRICS = ("num_iterations", "iterations_per_s", "num_requests_running", "num_requests_waiting",
                       "kv_cache_usage", "kv_cache_usage_peak", "num_preemptions", "request_queue_time",
                       "step_time", "speculation", "prefix_cache")


def build_bench_report(preset: Any, results: Sequence[BenchResult], run: dict[str, Any]) -> dict[str, Any]:
    from batchdeck.engine.service.metrics import quantiles, summarize
    from batchdeck.presets.report import count_refused_as_missed, preset_info

    records = _records(results)
    starts = [r.arrival for r in results]
    ends = [r.arrival + r.e2e for r in results if r.e2e is not None]
    span = max(ends) - min(starts) if ends and starts else 0.0
    summary = summarize([], records, duration_s=span)
    count_refused_as_missed(summary["slo_attainment"], [r.slo_class for r in results if r.error is not None])
    gaps = quantiles((g for r in results if r.error is None and r.e2e is not None for g in r.itl), mean=True,
                     maximum=True)
    prompt = sum(r.prompt_tokens for r in records)
    output = sum(r.output_tokens for r in records)
    summary.update({
        "prompt_throughput": prompt / span if span else 0.0,
        "generation_throughput": output / span if span else 0.0,
        "num_prompt_tokens": prompt, "num_generation_tokens": output,
        "inter_token_latency": gaps, "inter_token_latency_gaps": gaps,
        "num_requests": len(results), "num_rejected": sum(1 for r in results if r.error is not None),
        "num_clamped": sum(1 for r in results if r.clamped),
        "num_unfinished": 0, "mean_batch_tokens": None, "mean_running": None,
    })
    # What only the engine sees (its iterations, KV cache, queueing, preemptions, speculation and prefix
    # cache) is not measured by a client: unknown, not zero.
    summary.update(dict.fromkeys(ENGINE_ONLY_METRICS))
    info = preset_info(preset)
    info["timeline"] = []  # not played against a server we do not steer
    rows = []
    for r in results:
        row = {k: v for k, v in dataclasses.asdict(r).items() if k != "itl"}
        row.update({"request_id": r.response_id, "tpot": r.tpot, "e2e_latency": r.e2e,
                    "itl_p50": _q(r.itl, 50), "itl_p99": _q(r.itl, 99), "itl_max": max(r.itl, default=None)})
        rows.append(row)
    return {"format": BENCH_FORMAT, "preset": info, "run": dict(run),
            "summary": summary, "phases": [], "timeline": [], "events": [], "requests": rows, "series": {}}


def _q(values: Sequence[float], q: float) -> float | None:
    from batchdeck.engine.service.metrics import percentile

    return percentile(values, q)


def sweep_row(rate: float, report: dict[str, Any]) -> dict[str, Any]:
    s = report["summary"]
    return {"request_rate": _rate_json(rate), "request_throughput": s["request_throughput"],
            "generation_throughput": s["generation_throughput"],
            "ttft_p50": s["time_to_first_token"]["p50"], "ttft_p99": s["time_to_first_token"]["p99"],
            "itl_p50": s["inter_token_latency"]["p50"], "itl_p99": s["inter_token_latency"]["p99"],
            "tpot_p50": s["time_per_output_token"]["p50"], "e2e_p50": s["e2e_request_latency"]["p50"],
            "num_requests": s["num_requests"], "num_rejected": s["num_rejected"]}


def sweep_text(rows: Sequence[dict[str, Any]]) -> str:
    from batchdeck.presets.compare import render_table

    def ms(v: Any) -> str:
        return "-" if v is None else f"{v * 1e3:.1f}"

    header = ["rate (req/s)", "req/s", "gen tok/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms",
              "failed"]
    body = [[str(r["request_rate"]), f"{r['request_throughput']:.2f}", f"{r['generation_throughput']:.1f}",
             ms(r["ttft_p50"]), ms(r["ttft_p99"]), ms(r["itl_p50"]), ms(r["itl_p99"]), str(r["num_rejected"])]
            for r in rows]
    return render_table(header, body)


def summary_text(report: dict[str, Any]) -> str:
    s = report["summary"]

    def ms(q: dict, k: str) -> str:
        return "-" if q.get(k) is None else f"{q[k] * 1e3:.1f}"

    ttft, itl, tpot, e2e = (s["time_to_first_token"], s["inter_token_latency"], s["time_per_output_token"],
                            s["e2e_request_latency"])
    return (f"requests: {s['num_requests_finished']} finished, {s['num_rejected']} failed, in {s['span_s']:.2f} s\n"
            f"request throughput: {s['request_throughput']:.2f} req/s; output {s['generation_throughput']:.1f} tok/s; "
            f"prompt {s['prompt_throughput']:.1f} tok/s\n"
            f"TTFT p50/p90/p99: {ms(ttft, 'p50')}/{ms(ttft, 'p90')}/{ms(ttft, 'p99')} ms\n"
            f"ITL  p50/p90/p99: {ms(itl, 'p50')}/{ms(itl, 'p90')}/{ms(itl, 'p99')} ms\n"
            f"TPOT p50/p90/p99: {ms(tpot, 'p50')}/{ms(tpot, 'p90')}/{ms(tpot, 'p99')} ms\n"
            f"e2e  p50/p90/p99: {ms(e2e, 'p50')}/{ms(e2e, 'p90')}/{ms(e2e, 'p99')} ms")


def _write(path: Path, doc: dict[str, Any]) -> None:
    path.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")


def rate_path(report: Path, rate: float) -> Path:
    tag = "inf" if math.isinf(rate) else f"{rate:g}"
    return report.with_name(f"{report.stem}-rate{tag}{report.suffix or '.json'}")


def cmd_bench(args: argparse.Namespace, out: Any = None) -> int:
    from batchdeck.presets import load_preset, resolve_preset
    from batchdeck.presets.preset_driver import scale_preset

    out = out or sys.stdout
    if not args.duration_scale > 0:
        raise ValueError(f"--duration-scale must be > 0, got {args.duration_scale!r}")
    if args.sweep_rates and args.request_rate is not None:
        raise ValueError("--sweep-rates and --request-rate exclude each other (the sweep sets the rate)")
    preset = scale_preset(load_preset(resolve_preset(args.preset)), args.duration_scale)
    report_path = Path(args.report or f"{preset.name}-bench.json")
    common = dict(model=args.model, api_key=args.api_key, max_concurrency=args.max_concurrency,
                  max_model_len=args.max_model_len, timeout=args.timeout)
    if not args.sweep_rates:
        report = asyncio.run(run_bench(preset, args.base_url, request_rate=args.request_rate, **common))
        report["run"]["duration_scale"] = args.duration_scale
        _write(report_path, report)
        out.write(summary_text(report) + f"\nreport: {report_path}\n")
        return 0
    rows = []
    for rate in args.sweep_rates:
        report = asyncio.run(run_bench(preset, args.base_url, request_rate=rate, **common))
        report["run"]["duration_scale"] = args.duration_scale
        path = rate_path(report_path, rate)
        _write(path, report)
        rows.append({**sweep_row(rate, report), "report": str(path)})
        out.write(f"rate {_rate_json(rate)}: {report['summary']['num_requests_finished']} finished -> {path}\n")
        out.flush()
    _write(report_path, {"format": SWEEP_FORMAT, "preset": preset.name, "base_url": args.base_url, "sweep": rows})
    out.write(sweep_text(rows) + f"\nsweep: {report_path}\n")
    return 0
