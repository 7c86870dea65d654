"""Benchmark (e): continuous vs static batching on the Azure conversation trace, on our engine.

    PYTHONPATH=. python benchmarks/gpu_static_vs_continuous.py \
        --out benchmarks/results/gpu_static_vs_continuous_qwen3-0.6b.json

Workload: the first `--requests` rows of presets/traces/azure_conv.csv (presets.trace_loader.load_trace,
TIMESTAMP / ContextTokens / GeneratedTokens, time_unit datetime), inter-arrival gaps multiplied by
`--time-scale` (small: arrivals far beyond capacity, so the engine saturates and a queue forms),
input lengths capped so input + output fits the model context; prompt token ids uniform over the
vocabulary (random.Random(seed)); exactly GeneratedTokens output tokens (ignore_eos, greedy).

Each mode (LiveConfig(batching="continuous") and LiveConfig(batching="static"), same max_num_seqs,
max_batched_tokens, chunk_size) runs in its own process on a fresh engine (CUDA graphs, Triton
attention, fused kernels): requests are added when the engine clock reaches their arrival time
(the arrival recorded is the trace's), the engine steps until all are done (sleeping through
static-batch waits, as engine/generate.py does). Reported per mode: output tokens/s over the
makespan (first arrival to last finish), requests/s, e2e latency (finish - arrival) and TTFT
(first token - arrival) percentiles, TPOT, mean rows per decode iteration, padding rows (static).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_common import (argv_without, command_line, default_dtype, dist, log, percentile, run_script,  # noqa: E402
                                     versions, write_json)

TRACE_COLUMNS = {"time": "TIMESTAMP", "input": "ContextTokens", "output": "GeneratedTokens"}


def trace_requests(args, max_model_len: int) -> list[tuple[float, int, int]]:
    from batchdeck.presets.trace_loader import load_trace

    rows = load_trace(args.trace, TRACE_COLUMNS, time_unit="datetime", time_scale=args.time_scale,
                      limit=args.requests)
    out = []
    for t, n_in, n_out in rows:
        n_out = max(1, min(n_out, max_model_len // 2))
        n_in = max(1, min(n_in, max_model_len - n_out))
        out.append((t, n_in, n_out))
    return out


def run_mode(args) -> dict:
    import torch

    from batchdeck.engine.config import EngineConfig, LiveConfig
    from batchdeck.engine.llm_engine import LLMEngine
    from batchdeck.engine.models import synthetic_config
    from batchdeck.engine.request import SamplingParams

    cuda = args.device.startswith("cuda")
    name = args.model.split(":", 1)[1]
    vocab = synthetic_config(name).vocab_size
    ecfg = EngineConfig(model=args.model, device=args.device, dtype=default_dtype(args.device),
                        block_size=args.block_size, max_num_seqs_limit=args.max_num_seqs,
                        max_batched_tokens_limit=args.max_batched_tokens, gpu_memory_fraction=args.gpu_memory_fraction,
                        cuda_graphs=cuda, num_blocks=None if cuda else args.cpu_num_blocks)
    live = LiveConfig(batching=args.phase, max_num_seqs=args.max_num_seqs, max_batched_tokens=args.max_batched_tokens,
                      chunk_size=min(args.chunk_size, args.max_batched_tokens), static_timeout=args.static_timeout)
    records = []
    t0 = time.perf_counter()
    engine = LLMEngine(ecfg, live, sink=lambda kind, obj: records.append(obj) if kind == "iteration" else None)
    init_s = time.perf_counter() - t0
    log(f"[{args.phase}] engine up in {init_s:.1f}s: {engine.blocks.num_blocks} KV blocks, max_model_len "
        f"{engine.max_model_len}")
    rows = trace_requests(args, engine.max_model_len)
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(vocab) for _ in range(n_in)] for _, n_in, _ in rows]
    # warm-up (untimed): one batch of short requests through the same mode
    for i in range(args.max_num_seqs):
        engine.add_request(f"warm{i}", prompts[i % len(prompts)][:32 + 8 * (i % 8)],
                           SamplingParams(max_tokens=4 + i % 5, ignore_eos=True), arrival_time=0.0)
    engine.run_until_done()
    engine.requests.clear()
    records.clear()
    if cuda:
        torch.cuda.synchronize()

    engine.restart_clock()
    served = []
    next_i = 0
    t_wall = time.perf_counter()
    while next_i < len(rows) or engine.has_unfinished:
        now = engine.clock()
        while next_i < len(rows) and rows[next_i][0] <= now:
            t_arr, _, n_out = rows[next_i]
            served.append(engine.add_request(str(next_i), prompts[next_i],
                                             SamplingParams(max_tokens=n_out, ignore_eos=True), arrival_time=t_arr))
            next_i += 1
        if engine.step() is None:
            waits = [engine.scheduler.pending_static_wait(now)]
            if next_i < len(rows):
                waits.append(rows[next_i][0] - now)
            waits = [w for w in waits if w is not None]
            wait = min(waits) if waits else 0.001
            time.sleep(min(max(wait, 0.0), 0.05) + 1e-4)
    wall = time.perf_counter() - t_wall
    makespan = max(r.finish_time for r in served)  # engine clock; first arrival is at 0
    e2e = [r.finish_time - r.arrival_time for r in served]
    ttft = [r.first_token_time - r.arrival_time for r in served]
    tpot = [r.tpot for r in served if r.tpot is not None]
    out_tok = sum(len(r.output_token_ids) for r in served)
    in_tok = sum(r.num_prompt_tokens for r in served)
    dec = [x for x in records if x.num_prefill_tokens == 0 and x.num_decode_tokens > 0]

    res = {
        "mode": args.phase, "device": torch.cuda.get_device_name() if cuda else "cpu",
        "engine_init_seconds": init_s, "kv_blocks": engine.blocks.num_blocks, "max_model_len": engine.max_model_len,
        "requests": len(served), "input_tokens": in_tok, "output_tokens": out_tok,
        "makespan_s": makespan, "wall_s": wall, "last_arrival_s": rows[-1][0],
        "output_tok_s": out_tok / makespan, "total_tok_s": (in_tok + out_tok) / makespan,
        "requests_per_s": len(served) / makespan,
        "e2e_latency_s": dist(e2e), "ttft_s": dist(ttft), "tpot_s": dist(tpot) if tpot else None,
        "iterations": engine.iteration, "iterations_decode_only": len(dec),
        "mean_rows_per_decode_iteration": statistics.mean(x.num_decode_tokens for x in dec) if dec else None,
        "padding_rows_total": sum(x.num_padding_tokens for x in records),
        "preemptions": sum(r.num_preemptions for r in served),
        "busy_step_seconds": sum(x.step_time for x in records),
    }
    if engine.runner.graphs:
        res["graph_replays"] = engine.runner.graphs.stats.replays
        res["eager_iterations"] = engine.runner.graphs.stats.eager
    log(f"[{args.phase}] {out_tok / makespan:.0f} out tok/s, makespan {makespan:.2f}s, e2e p50 "
        f"{res['e2e_latency_s']['p50']:.2f}s p99 {res['e2e_latency_s']['p99']:.2f}s, ttft p50 "
        f"{res['ttft_s']['p50']:.2f}s p99 {res['ttft_s']['p99']:.2f}s")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="synthetic:qwen3-0.6b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--trace", default="presets/traces/azure_conv.csv")
    ap.add_argument("--requests", type=int, default=400, help="the first N rows of the trace")
    ap.add_argument("--time-scale", type=float, default=0.02, help="inter-arrival gaps x this")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-batched-tokens", type=int, default=8192)
    ap.add_argument("--chunk-size", type=int, default=2048)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--static-timeout", type=float, default=1.0)
    ap.add_argument("--gpu-memory-fraction", type=float, default=0.85)
    ap.add_argument("--cpu-num-blocks", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--modes", default="continuous,static")
    ap.add_argument("--timeout", type=float, default=240.0, help="per-mode process timeout (s)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--phase", choices=("continuous", "static"), default=None, help=argparse.SUPPRESS)
    ap.add_argument("--phase-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        res = run_mode(args)
        with open(args.phase_out, "w") as f:
            json.dump(res, f, default=str)
        return

    from batchdeck.engine.models import SYNTHETIC_CONTEXT_CAP, SYNTHETIC_SHAPES, synthetic_config

    name = args.model.split(":", 1)[1]
    assert args.model.startswith("synthetic:") and name in SYNTHETIC_SHAPES, "a synthetic:<name> model"
    max_len = min(synthetic_config(name).max_position_embeddings, SYNTHETIC_CONTEXT_CAP)
    rows = trace_requests(args, max_len)
    span = rows[-1][0] if rows else 0.0
    raw_argv = argv_without("--out")
    result = {
        "benchmark": "gpu_static_vs_continuous", "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": command_line("benchmarks/gpu_static_vs_continuous.py"), "versions": versions(),
        "workload": {
            "model": args.model, "dtype": default_dtype(args.device),
            "trace": args.trace, "trace_columns": TRACE_COLUMNS, "time_unit": "datetime",
            "rows": f"first {args.requests} rows (load_trace limit)", "time_scale": args.time_scale,
            "arrival_span_s": span, "offered_requests_per_s": (len(rows) - 1) / span if span else None,
            "length_caps": f"output <= {max_len // 2}, input <= {max_len} - output (model context {max_len})",
            "input_tokens": sum(r[1] for r in rows), "output_tokens": sum(r[2] for r in rows),
            "input_len_mean": statistics.mean(r[1] for r in rows), "output_len_mean": statistics.mean(r[2] for r in rows),
            "output_len_p50": percentile([r[2] for r in rows], 50), "output_len_max": max(r[2] for r in rows),
            "prompt_tokens": f"uniform over the vocabulary (random.Random({args.seed}))",
            "sampling": "greedy", "ignore_eos": True, "output_len": "exactly GeneratedTokens",
        },
        "batchdeck_config": {"max_num_seqs": args.max_num_seqs, "max_batched_tokens": args.max_batched_tokens,
                             "chunk_size": min(args.chunk_size, args.max_batched_tokens), "block_size": args.block_size,
                             "mixing": "stall-free", "policy": "fcfs", "static_timeout": args.static_timeout,
                             "cuda_graphs": args.device.startswith("cuda"), "attention_backend": "auto (triton on cuda)",
                             "fused_kernels": os.environ.get("BATCHDECK_FUSED", "1") != "0"},
        "isolation": "each mode runs in its own process on a fresh engine",
    }
    log(f"{len(rows)} requests over {span:.2f}s ({result['workload']['offered_requests_per_s']:.0f} req/s offered)")
    modes = {}
    for mode in args.modes.split(","):
        modes[mode] = run_script(__file__, [*raw_argv, "--phase", mode], args.timeout)
    result["device"] = next((m["device"] for m in modes.values() if "device" in m), None)
    result["modes"] = modes
    c, s = modes.get("continuous", {}), modes.get("static", {})
    if "output_tok_s" in c and "output_tok_s" in s:
        result["continuous_over_static"] = {
            "output_tok_s": c["output_tok_s"] / s["output_tok_s"],
            "e2e_p50": s["e2e_latency_s"]["p50"] / c["e2e_latency_s"]["p50"],
            "e2e_p99": s["e2e_latency_s"]["p99"] / c["e2e_latency_s"]["p99"],
            "ttft_p50": s["ttft_s"]["p50"] / c["ttft_s"]["p50"],
            "ttft_p99": s["ttft_s"]["p99"] / c["ttft_s"]["p99"],
            "note": "throughput: continuous / static; latencies: static / continuous (>1: continuous better)"}
    table = {m: {k: (v.get(k) if k in ("output_tok_s", "requests_per_s", "makespan_s") else
                     (v.get(k.split(".")[0]) or {}).get(k.split(".")[1]))
                 for k in ("output_tok_s", "requests_per_s", "makespan_s", "e2e_latency_s.p50", "e2e_latency_s.p99",
                           "ttft_s.p50", "ttft_s.p99")} for m, v in modes.items()}
    print(json.dumps({"modes": table, "continuous_over_static": result.get("continuous_over_static")}, indent=1))
    write_json(args.out, result)


if __name__ == "__main__":
    main()
