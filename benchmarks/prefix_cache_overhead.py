"""CPU cost of prefix caching when nothing is shared: the block manager and scheduler per iteration, on vs off.

The all-distinct workload of benchmarks/gpu_prefix_cache.py, without a model: `--requests` prompts of
U[`--input`] tokens, all different (no two share a first block), `--output` tokens each, all arriving
at 0. A `Scheduler` over a `BlockManager` (block size 16, as the engine uses on CUDA; `--num-blocks`
small enough that the blocks of finished requests cannot all stay cached, so the cache evicts) plans
each iteration; the driver then does what `LLMEngine.step` does around the block manager: advance
every chunk's computed tokens, `commit` its full blocks, tell the policy, append a sampled token
where the chunk samples, finish requests at max_tokens (freeing their blocks) and read the KV gauges
and prefix counters an iteration record carries. The model's forward is not run.

Timed: everything above, per iteration (schedule + bookkeeping), caching off and on, each over the
whole workload, `--repeats` times alternating (the best and the median are reported). The difference
is what prefix caching adds to every iteration on the CPU when it never hits.

    .venv/bin/python benchmarks/prefix_cache_overhead.py --out benchmarks/results/prefix_cache_overhead_cpu.json
    .venv/bin/python benchmarks/prefix_cache_overhead.py --profile   # cProfile of the caching-on run
"""
from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from batchdeck.engine.block_manager import BlockManager  # noqa: E402
from batchdeck.engine.config import LiveConfig  # noqa: E402
from batchdeck.engine.request import Request, SamplingParams  # noqa: E402
from batchdeck.engine.scheduler import Scheduler  # noqa: E402
from batchdeck.policies import make_policy  # noqa: E402


def make_requests(n: int, lo: int, hi: int, output: int, seed: int) -> list[Request]:
    """All-distinct prompts: the first two tokens number the request, so no two share a first block."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.randint(lo, hi)
        prompt = [i % 256, i // 256 % 256] + [rng.randrange(32000) for _ in range(length - 2)]
        out.append(Request(f"r{i}", prompt, SamplingParams(max_tokens=output, ignore_eos=True), arrival_time=0.0))
    return out


def run(args, prefix_caching: bool) -> dict:
    """One pass over the whole workload; returns timings and counts."""
    requests = make_requests(args.requests, args.input[0], args.input[1], args.output, args.seed)
    live = LiveConfig(policy=args.policy, prefix_caching=prefix_caching, max_num_seqs=args.max_num_seqs,
                      max_batched_tokens=args.max_batched_tokens, chunk_size=args.chunk_size)
    blocks = BlockManager(args.num_blocks, args.block_size)
    sched = Scheduler(blocks, make_policy(args.policy), live)
    policy = sched.policy
    for r in requests:
        sched.add(r)
    rng = random.Random(args.seed + 1)
    token = [rng.randrange(32000) for _ in range(4096)]
    perf = time.process_time  # CPU time of this process: steadier than wall time on a shared machine
    iterations = 0
    gauges = 0
    t0 = perf()
    while sched.has_work:
        plan = sched.schedule(0.0)
        if plan.empty:
            raise RuntimeError("the scheduler planned nothing with work left (pool too small for one request?)")
        commit = blocks.commit
        for chunk in plan.chunks:  # as LLMEngine.step: computed tokens, commit, policy hook
            r = chunk.request
            r.num_computed_tokens += chunk.num_tokens
            commit(r, r.num_computed_tokens)
            prompt_part = max(0, min(chunk.start + chunk.num_tokens, r.num_prompt_tokens) - chunk.start)
            policy.on_tokens_computed(r, prompt_part, 1 if chunk.samples else 0)
        for chunk in plan.chunks:
            if not chunk.samples:
                continue
            r = chunk.request
            r.append_token(token[(iterations + len(r.token_ids)) & 4095], 0.0)
            if r.first_token_time is None:
                r.first_token_time = 0.0
            if len(r.output_token_ids) >= r.sampling.max_tokens:
                sched.finish(r)
        # what an iteration record reads
        gauges += (blocks.num_used + blocks.num_cached + blocks.num_evictable + blocks.num_empty
                   + blocks.prefix_cache_queries + blocks.prefix_cache_hits)
        iterations += 1
    elapsed = perf() - t0
    if args.check:
        blocks.check()
    return {"seconds": elapsed, "iterations": iterations, "us_per_iteration": elapsed / iterations * 1e6,
            "evictions": blocks.prefix_cache_evictions, "prefix_cache_hits": blocks.prefix_cache_hits,
            "prefix_cache_queries": blocks.prefix_cache_queries,
            "preemptions": sum(r.num_preemptions for r in requests),
            "output_tokens": sum(len(r.output_token_ids) for r in requests)}


def _pair_range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(",")
    lo_i, hi_i = int(lo), int(hi or lo)
    if not 3 <= lo_i <= hi_i:
        raise argparse.ArgumentTypeError(f"expected N or MIN,MAX with 3 <= MIN <= MAX, got {text!r}")
    return lo_i, hi_i


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--input", type=_pair_range, default=(100, 1024), help="prompt tokens, uniform MIN,MAX")
    ap.add_argument("--output", type=int, default=256, help="output tokens per request")
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--max-batched-tokens", type=int, default=4096)
    ap.add_argument("--chunk-size", type=int, default=2048)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--num-blocks", type=int, default=4096,
                    help="KV pool; the default holds the running requests but not every finished one's blocks")
    ap.add_argument("--policy", default="fcfs")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", action="store_true", help="check the block accounting after each run")
    ap.add_argument("--profile", action="store_true", help="print a cProfile of one caching-on run and exit")
    ap.add_argument("--label", default=None, help="a name for this measurement (e.g. before/after)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()

    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        res = run(args, True)
        prof.disable()
        print(json.dumps(res, indent=1))
        pstats.Stats(prof).sort_stats("tottime").print_stats(18)
        return

    runs: dict[str, list[dict]] = {"off": [], "on": []}
    load_before = os.getloadavg()
    run(args, True)  # warm-up (imports, allocator)
    for _ in range(args.repeats):
        for name, caching in (("off", False), ("on", True)):
            runs[name].append(run(args, caching))
    load_after = os.getloadavg()
    summary = {}
    for name, rs in runs.items():
        us = [r["us_per_iteration"] for r in rs]
        summary[name] = {"us_per_iteration_best": min(us), "us_per_iteration_median": statistics.median(us),
                         "us_per_iteration_all": us, **{k: rs[0][k] for k in rs[0] if k not in ("seconds", "us_per_iteration")}}
    off, on = summary["off"], summary["on"]
    summary["on_minus_off_us_per_iteration_best"] = on["us_per_iteration_best"] - off["us_per_iteration_best"]
    summary["on_over_off_best"] = on["us_per_iteration_best"] / off["us_per_iteration_best"]
    result = {
        "benchmark": "prefix_cache_overhead", "device": "cpu", "label": args.label,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": "python benchmarks/prefix_cache_overhead.py " + " ".join(a for a in sys.argv[1:]),
        "workload": {"requests": args.requests, "input_tokens": list(args.input), "output_tokens": args.output,
                     "prompts": "all distinct (no shared first block)", "arrival": "all at 0"},
        "config": {"max_num_seqs": args.max_num_seqs, "max_batched_tokens": args.max_batched_tokens,
                   "chunk_size": args.chunk_size, "block_size": args.block_size, "num_blocks": args.num_blocks,
                   "policy": args.policy, "repeats": args.repeats},
        "timed": "process CPU time of Scheduler.schedule + per-chunk commit/policy hook + token append/finish + record gauges",
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0], "cpu_count": os.cpu_count(),
                    "loadavg_before": load_before, "loadavg_after": load_after},
        "results": summary,
    }
    print(f"off: {off['us_per_iteration_best']:.1f} us/iteration (median {off['us_per_iteration_median']:.1f}), "
          f"on: {on['us_per_iteration_best']:.1f} us/iteration (median {on['us_per_iteration_median']:.1f}); "
          f"+{summary['on_minus_off_us_per_iteration_best']:.1f} us; {on['iterations']} iterations, "
          f"{on['evictions']} evictions, {on['preemptions']} preemptions with caching on")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
