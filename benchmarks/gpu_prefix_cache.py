"""Benchmark: prefix caching and cache-aware scheduling on multi-turn chat, and the cost when nothing is shared.

    PYTHONPATH=. python benchmarks/gpu_prefix_cache.py --out benchmarks/results/gpu_prefix_cache_qwen3-0.6b.json

CPU smoke test (tiny sizes, seconds):

    PYTHONPATH=. python benchmarks/gpu_prefix_cache.py --device cpu --model synthetic:tiny \
        --conversations 4 --turns 3 --system-tokens 64 --user-tokens 16,32 --output-tokens 8,16 \
        --distinct-requests 8 --distinct-input 64,128 --distinct-output 8 --num-blocks 256 \
        --max-num-seqs 8 --max-batched-tokens 512 --chunk-size 256 --out /tmp/prefix_smoke.json

Multi-turn workload (presets.prefix_workloads.MultiTurnStream, the `multi-turn` preset stream):
`--conversations` chats start at `--rate` per second (Poisson), each of `--turns` turns; a turn
resends the whole history (a `--system-tokens` system prompt shared by every chat, the earlier user
messages and the answers the engine gave) plus a new user message of `--user-tokens` (uniform min,max)
tokens, `--think-time` seconds (exponential mean) after the previous answer; answers are exactly
`--output-tokens` (uniform) tokens (greedy, ignore_eos). The chats run closed-loop on the engine
clock. Runs: prefix caching off with fcfs, on with fcfs, on with cache-aware. Near capacity: the
running cap (`--max-num-seqs`, 32) is below the number of chats, so turns queue and the admission
order matters, and `--num-blocks` bounds the KV pool so that the cache cannot keep every chat's
history (eviction pressure); 0 sizes it from GPU memory.

Distinct workload: `--distinct-requests` prompts of `--distinct-input` tokens, all different (no
two share a first block), `--distinct-output` tokens each, all arriving at 0; caching off vs on:
the cost of hashing and look-ups when nothing is shared (output tok/s ratio, target >= 0.98).

Every run is its own process on a fresh engine (CUDA graphs, Triton attention on CUDA) after an
untimed warm-up. Reported per run: prompt tokens computed (the iterations' num_prefill_tokens) and
served from the cache, hit rate, TTFT p50/p99, e2e p50/p99, output tok/s over the makespan (first
arrival to last finish), preemptions, evictions, the iterations' busy and scheduling seconds, and the
garbage collections during the run (count per generation, seconds).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_common import (add_async_scheduling_flag, argv_without, async_scheduling_for,  # noqa: E402
                                     command_line, default_dtype, dist, log, run_script, versions, write_json, GCWatch)

RUNS = {
    "multi-turn/off/fcfs": ("multi-turn", False, "fcfs"),
    "multi-turn/on/fcfs": ("multi-turn", True, "fcfs"),
    "multi-turn/on/cache-aware": ("multi-turn", True, "cache-aware"),
    "distinct/off": ("distinct", False, "fcfs"),
    "distinct/on": ("distinct", True, "fcfs"),
}


def _range(text: str) -> tuple[int, int]:
    parts = [int(x) for x in text.split(",")]
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or not 1 <= parts[0] <= parts[1]:
        raise argparse.ArgumentTypeError(f"expected N or MIN,MAX with 1 <= MIN <= MAX, got {text!r}")
    return parts[0], parts[1]


def _engine(args, prefix_caching: bool, policy: str, records: list):
    from batchdeck.engine.config import EngineConfig, LiveConfig
    from batchdeck.engine.llm_engine import LLMEngine

    cuda = args.device.startswith("cuda")
    ecfg = EngineConfig(model=args.model, device=args.device, dtype=default_dtype(args.device),
                        block_size=args.block_size, num_blocks=args.num_blocks or None,
                        max_num_seqs_limit=args.max_num_seqs, max_batched_tokens_limit=args.max_batched_tokens,
                        gpu_memory_fraction=args.gpu_memory_fraction, cuda_graphs=cuda,
                        async_scheduling=async_scheduling_for(args))
    live = LiveConfig(policy=policy, prefix_caching=prefix_caching, max_num_seqs=args.max_num_seqs,
                      max_batched_tokens=args.max_batched_tokens,
                      chunk_size=min(args.chunk_size, args.max_batched_tokens))
    return LLMEngine(ecfg, live, sink=lambda kind, obj: records.append(obj) if kind == "iteration" else None)


def _warm_up(engine, vocab: int) -> None:
    from batchdeck.engine.request import SamplingParams

    rng = random.Random(12345)
    for i in range(8):
        engine.add_request(f"warm{i}", [rng.randrange(min(vocab, 50000)) for _ in range(64 + 32 * i)],
                           SamplingParams(max_tokens=8, ignore_eos=True), arrival_time=0.0)
    engine.run_until_done()
    engine.blocks.clear()  # the measured run starts with an empty cache
    engine.requests.clear()


def _multi_turn_items(args, max_model_len: int):
    from batchdeck.presets.prefix_workloads import MultiTurnStream
    from batchdeck.presets.schema import LengthDist, MultiTurnSpec, SharedPrefixSpec

    lo_u, hi_u = args.user_tokens
    lo_o, hi_o = args.output_tokens
    spec = MultiTurnSpec(conversations=args.conversations, turns=args.turns, rate=args.rate,
                         think_time=args.think_time,
                         user_tokens=LengthDist("uniform", min=lo_u, max=hi_u),
                         output_tokens=LengthDist("uniform", min=lo_o, max=hi_o),
                         prefix=SharedPrefixSpec(tokens=args.system_tokens) if args.system_tokens else None)
    return MultiTurnStream(spec, 0, args.seed, max_model_len)


def _distinct_items(args):
    from batchdeck.presets.workload_streams import WorkloadItem

    rng = random.Random(args.seed)
    lo, hi = args.distinct_input
    out = []
    for i in range(args.distinct_requests):
        n = rng.randint(lo, hi)
        prompt = [i % 256, i // 256 % 256] + [rng.randrange(256) for _ in range(n - 2)]  # distinct first blocks
        out.append(WorkloadItem(arrival=0.0, prompt_token_ids=prompt, max_tokens=rng.randint(*args.distinct_output)))
    return out


def run_one(args) -> dict:
    import torch

    from batchdeck.engine.request import SamplingParams

    workload, caching, policy = RUNS[args.run]
    cuda = args.device.startswith("cuda")
    records: list = []
    t0 = time.perf_counter()
    engine = _engine(args, caching, policy, records)
    init_s = time.perf_counter() - t0
    vocab = engine.loaded.config.vocab_size
    log(f"[{args.run}] engine up in {init_s:.1f}s: {engine.blocks.num_blocks} KV blocks, max_model_len "
        f"{engine.max_model_len}")
    _warm_up(engine, vocab)
    records.clear()
    if cuda:
        torch.cuda.synchronize()

    stream = _multi_turn_items(args, engine.max_model_len) if workload == "multi-turn" else None
    pending = sorted(stream.initial() if stream else _distinct_items(args), key=lambda it: it.arrival)
    item_of: dict[str, object] = {}
    served = []
    engine.restart_clock()
    evictions0 = engine.blocks.prefix_cache_evictions
    with GCWatch() as gc_watch:
        n = 0
        t_wall = time.perf_counter()
        while pending or engine.has_unfinished:
            now = engine.clock()
            while pending and pending[0].arrival <= now:
                it = pending.pop(0)
                rid = str(n)
                n += 1
                item_of[rid] = it
                served.append(engine.add_request(rid, it.prompt_token_ids,
                                                 SamplingParams(max_tokens=it.max_tokens, ignore_eos=True),
                                                 arrival_time=it.arrival))
            result = engine.step()
            if result is None:
                time.sleep(min(max(pending[0].arrival - engine.clock(), 0.0), 0.05) + 1e-4 if pending else 1e-4)
                continue
            if stream is not None:
                for r in result.finished:
                    nxt = stream.on_finished(engine.clock(), item_of[r.request_id], r.output_token_ids)
                    if nxt is not None:
                        pending.append(nxt)
                        pending.sort(key=lambda it: it.arrival)
        wall = time.perf_counter() - t_wall
    makespan = max(r.finish_time for r in served) - min(r.arrival_time for r in served)
    ttft = [r.first_token_time - r.arrival_time for r in served]
    e2e = [r.finish_time - r.arrival_time for r in served]
    out_tok = sum(len(r.output_token_ids) for r in served)
    prompt_tok = sum(r.num_prompt_tokens for r in served)
    computed = sum(x.num_prefill_tokens for x in records)
    hits = sum(x.prefix_cache_hits for x in records)
    queries = sum(x.prefix_cache_queries for x in records)
    res = {
        "run": args.run, "workload": workload, "prefix_caching": caching, "policy": policy,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "engine_init_seconds": init_s, "kv_blocks": engine.blocks.num_blocks, "max_model_len": engine.max_model_len,
        "requests": len(served), "prompt_tokens": prompt_tok, "output_tokens": out_tok,
        "prefill_tokens_computed": computed, "prompt_tokens_cached": hits,
        "prefix_cache_hit_rate": hits / queries if queries else None,
        "prefill_tokens_computed_per_request": computed / len(served),
        "makespan_s": makespan, "wall_s": wall, "output_tok_s": out_tok / makespan,
        "ttft_s": dist(ttft), "e2e_latency_s": dist(e2e),
        "preemptions": sum(r.num_preemptions for r in served),
        "evictions": engine.blocks.prefix_cache_evictions - evictions0,
        "iterations": len(records), "busy_step_seconds": sum(x.step_time for x in records),
        "schedule_seconds": sum(x.schedule_time for x in records),
        **gc_watch.summary(),
    }
    log(f"[{args.run}] {res['output_tok_s']:.0f} out tok/s, computed {computed} of {prompt_tok} prompt tokens, "
        f"ttft p50 {res['ttft_s']['p50'] * 1e3:.1f} ms p99 {res['ttft_s']['p99'] * 1e3:.1f} ms")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="synthetic:qwen3-0.6b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--conversations", type=int, default=64)
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--rate", type=float, default=8.0, help="chats started per second (Poisson)")
    ap.add_argument("--think-time", type=float, default=0.5, help="seconds, exponential mean")
    ap.add_argument("--system-tokens", type=int, default=512, help="system prompt shared by every chat (0: none)")
    ap.add_argument("--user-tokens", type=_range, default=(64, 256), help="new message per turn: N or MIN,MAX")
    ap.add_argument("--output-tokens", type=_range, default=(64, 256), help="answer per turn: N or MIN,MAX")
    ap.add_argument("--distinct-requests", type=int, default=512)
    ap.add_argument("--distinct-input", type=_range, default=(512, 1024))
    ap.add_argument("--distinct-output", type=_range, default=(128, 128))
    ap.add_argument("--max-num-seqs", type=int, default=32,
                    help="running cap (below --conversations, so turns queue and the policy's order matters)")
    ap.add_argument("--max-batched-tokens", type=int, default=4096)
    ap.add_argument("--chunk-size", type=int, default=2048)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--num-blocks", type=int, default=8192,
                    help="KV pool (0: from GPU memory); the default keeps the cache from holding every history")
    ap.add_argument("--gpu-memory-fraction", type=float, default=0.85)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runs", default=",".join(RUNS), help="comma-separated: " + ", ".join(RUNS))
    ap.add_argument("--timeout", type=float, default=300.0, help="per-run process timeout (s)")
    add_async_scheduling_flag(ap)
    ap.add_argument("--out", default=None)
    ap.add_argument("--run", choices=list(RUNS), default=None, help=argparse.SUPPRESS)
    ap.add_argument("--phase-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run:
        res = run_one(args)
        with open(args.phase_out, "w") as f:
            json.dump(res, f, default=str)
        return
    unknown = [r for r in args.runs.split(",") if r not in RUNS]
    if unknown:
        ap.error(f"unknown run {unknown[0]!r}; choose from {', '.join(RUNS)}")

    raw_argv = argv_without("--out")
    result = {
        "benchmark": "gpu_prefix_cache", "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": command_line("benchmarks/gpu_prefix_cache.py"), "versions": versions(),
        "workload": {
            "model": args.model, "dtype": default_dtype(args.device),
            "multi_turn": {"conversations": args.conversations, "turns": args.turns, "rate": args.rate,
                           "think_time_s": args.think_time, "system_tokens": args.system_tokens,
                           "user_tokens": args.user_tokens, "output_tokens": args.output_tokens,
                           "history": "every turn resends the earlier prompts and the engine's answers"},
            "distinct": {"requests": args.distinct_requests, "input_tokens": args.distinct_input,
                         "output_tokens": args.distinct_output, "arrival": "all at 0"},
            "sampling": "greedy", "ignore_eos": True, "seed": args.seed,
        },
        "batchdeck_config": {"max_num_seqs": args.max_num_seqs, "max_batched_tokens": args.max_batched_tokens,
                             "chunk_size": min(args.chunk_size, args.max_batched_tokens),
                             "block_size": args.block_size, "num_blocks": args.num_blocks or "from memory",
                             "mixing": "stall-free", "cuda_graphs": args.device.startswith("cuda"),
                             "async_scheduling": async_scheduling_for(args)},
        "isolation": "each run in its own process on a fresh engine",
    }
    runs = {name: run_script(__file__, [*raw_argv, "--run", name], args.timeout) for name in args.runs.split(",")}
    result["device"] = next((r["device"] for r in runs.values() if "device" in r), None)
    result["runs"] = runs
    off, on = runs.get("distinct/off", {}), runs.get("distinct/on", {})
    if "output_tok_s" in off and "output_tok_s" in on:
        result["distinct_on_over_off_output_tok_s"] = on["output_tok_s"] / off["output_tok_s"]
    table = {name: {k: r.get(k) for k in ("prefill_tokens_computed", "prompt_tokens_cached", "output_tok_s",
                                          "preemptions", "evictions")}
             | {"ttft_p50_s": (r.get("ttft_s") or {}).get("p50"), "ttft_p99_s": (r.get("ttft_s") or {}).get("p99")}
             if "error" not in r else r for name, r in runs.items()}
    print(json.dumps({"runs": table, "distinct_on_over_off_output_tok_s":
                      result.get("distinct_on_over_off_output_tok_s")}, indent=1))
    write_json(args.out, result)


if __name__ == "__main__":
    main()
