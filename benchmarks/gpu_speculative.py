"""Benchmark: speculative decoding on and off, on the GPU engine (CUDA graphs, Triton attention).

    PYTHONPATH=. python benchmarks/gpu_speculative.py --out benchmarks/results/gpu_speculative.json

Scenarios (each configuration runs in its own process on a fresh engine; greedy, ignore_eos):
  (i)   draft = the target itself (synthetic:qwen3-0.6b drafting for itself, same seed so the same
        weights): the acceptance-near-1.0 upper bound, which shows what verification and drafting cost;
  (ii)  n-gram prompt lookup on a copy-heavy workload (prompts are one random segment repeated) with
        synthetic:qwen3-0.6b;
  (iii) a small synthetic draft (synthetic:llama-3.2-1b) for a larger synthetic target
        (synthetic:llama-3.1-8b): same vocabulary, unrelated random weights.
Every scenario also runs with k = 0 (speculation off) on the same engine configuration.

Workload: `--requests` requests, all arriving at t = 0, prompt tokens uniform over the vocabulary
(random.Random(seed)) or, for (ii), a `--segment`-token random segment repeated to the prompt length;
exactly `--output-len` output tokens each; `--concurrency` running requests at most (max_num_seqs).
Reported per configuration: output tokens/s over the makespan, per-request e2e latency and TPOT
percentiles, acceptance rate (accepted / proposed drafts), mean accepted drafts per verification,
generated tokens per decode iteration, the drafter's share of step time, graph replays vs eager.

Random-weight models give near-random acceptance for a draft model that is not the target: the
numbers in (iii) measure the cost of speculation when it does not pay; real local model pairs (a
small and a large model of one family) are where it pays.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_common import argv_without, command_line, dist, log, run_script, versions, write_json  # noqa: E402

SCENARIOS = {
    "i": dict(model="synthetic:qwen3-0.6b", drafter="model", draft_model="synthetic:qwen3-0.6b", copy_heavy=False),
    "ii": dict(model="synthetic:qwen3-0.6b", drafter="ngram", draft_model=None, copy_heavy=True),
    "iii": dict(model="synthetic:llama-3.1-8b", drafter="model", draft_model="synthetic:llama-3.2-1b",
                copy_heavy=False),
}


def prompts_for(vocab: int, args, copy_heavy: bool) -> list[list[int]]:
    rng = random.Random(args.seed)
    out = []
    for _ in range(args.requests):
        if copy_heavy:
            segment = [rng.randrange(vocab) for _ in range(args.segment)]
            out.append((segment * (args.prompt_len // args.segment + 1))[:args.prompt_len])
        else:
            out.append([rng.randrange(vocab) for _ in range(args.prompt_len)])
    return out


def run_config(args) -> dict:
    import torch

    from batchdeck.engine.config import EngineConfig, LiveConfig
    from batchdeck.engine.llm_engine import LLMEngine
    from batchdeck.engine.request import SamplingParams

    sc = SCENARIOS[args.scenario]
    k = args.phase_k
    ecfg = EngineConfig(model=sc["model"], device="cuda", dtype="bfloat16", block_size=16,
                        max_num_seqs_limit=args.concurrency, max_batched_tokens_limit=args.max_batched_tokens,
                        gpu_memory_fraction=args.gpu_memory_fraction, cuda_graphs=True, spec_k_limit=max(8, k),
                        drafter=sc["drafter"], draft_model=sc["draft_model"])
    live = LiveConfig(max_num_seqs=args.concurrency, max_batched_tokens=args.max_batched_tokens,
                      chunk_size=args.max_batched_tokens, spec_k=k)
    records = []
    t0 = time.perf_counter()
    engine = LLMEngine(ecfg, live, sink=lambda kind, obj: records.append(obj) if kind == "iteration" else None)
    init_s = time.perf_counter() - t0
    vocab = engine.loaded.config.vocab_size
    prompts = prompts_for(vocab, args, sc["copy_heavy"])
    for i in range(args.concurrency):  # warm-up (untimed)
        engine.add_request(f"warm{i}", prompts[i % len(prompts)][:48], SamplingParams(max_tokens=16, ignore_eos=True))
    engine.run_until_done()
    engine.requests.clear()
    records.clear()
    torch.cuda.synchronize()
    replays0 = engine.runner.graphs.stats.replays if engine.runner.graphs else 0
    eager0 = engine.runner.graphs.stats.eager if engine.runner.graphs else 0

    engine.restart_clock()
    served = [engine.add_request(str(i), p, SamplingParams(max_tokens=args.output_len, ignore_eos=True),
                                 arrival_time=0.0) for i, p in enumerate(prompts)]
    engine.run_until_done()
    makespan = max(r.finish_time for r in served)
    out_tok = sum(len(r.output_token_ids) for r in served)
    proposed = sum(r.spec_proposed for r in served)
    accepted = sum(r.spec_accepted for r in served)
    steps = sum(r.spec_steps for r in served)
    decode = [x for x in records if x.num_prefill_tokens == 0 and x.num_generated_tokens > 0]
    tpot = [r.tpot for r in served if r.tpot is not None]
    busy = sum(x.step_time for x in records)
    res = {
        "scenario": args.scenario, "spec_k": k, "model": sc["model"], "drafter": sc["drafter"] if k else None,
        "draft_model": sc["draft_model"] if k else None, "device": torch.cuda.get_device_name(),
        "engine_init_seconds": init_s, "kv_blocks": engine.blocks.num_blocks,
        "requests": len(served), "output_tokens": out_tok, "makespan_s": makespan, "output_tok_s": out_tok / makespan,
        "e2e_latency_s": dist([r.finish_time - r.arrival_time for r in served]),
        "ttft_s": dist([r.first_token_time - r.arrival_time for r in served]), "tpot_s": dist(tpot),
        "spec_proposed": proposed, "spec_accepted": accepted,
        "acceptance_rate": accepted / proposed if proposed else None,
        "mean_accepted_per_verification": accepted / steps if steps else None,
        "tokens_per_decode_iteration": (sum(x.num_generated_tokens for x in decode) / len(decode)) if decode else None,
        # decode rows = decode positions minus the drafted ones (a speculating row is one row)
        "tokens_per_request_per_decode_iteration": (sum(x.num_generated_tokens for x in decode) / sum(
            x.num_decode_tokens - x.spec_proposed for x in decode)) if decode else None,
        "iterations": len(records), "busy_step_seconds": busy,
        # host-side phases per iteration (ms); a graph replay returns at once, so GPU time shows in sample
        "iteration_ms": {phase: 1e3 * sum(getattr(x, phase + "_time") for x in records) / len(records)
                         for phase in ("step", "schedule", "draft", "prepare", "forward", "sample")},
        "draft_time_share": sum(x.draft_time for x in records) / busy if busy else None,
        "graph_replays": (engine.runner.graphs.stats.replays - replays0) if engine.runner.graphs else None,
        "eager_iterations": (engine.runner.graphs.stats.eager - eager0) if engine.runner.graphs else None,
    }
    log(f"[{args.scenario} k={k}] {res['output_tok_s']:.0f} out tok/s, e2e p50 {res['e2e_latency_s']['p50']:.2f}s, "
        f"tpot p50 {res['tpot_s']['p50'] * 1e3:.2f} ms, acceptance {res['acceptance_rate']}")
    return res


SUMMARY_KEYS = ("scenario", "spec_k", "output_tok_s", "acceptance_rate", "mean_accepted_per_verification",
                "tokens_per_request_per_decode_iteration", "draft_time_share", "error")


def summary_row(run: dict) -> dict:
    """The headline figures of one configuration, with the e2e and TPOT medians."""
    row = {k: run.get(k) for k in SUMMARY_KEYS}
    for key in ("e2e_latency_s", "tpot_s"):
        if isinstance(run.get(key), dict):
            row[key + "_p50"] = run[key]["p50"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scenarios", default="i,ii,iii")
    ap.add_argument("--ks", default="0,2,4", help="speculation lengths to run per scenario (0 = off)")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=8, help="max_num_seqs")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--segment", type=int, default=32, help="(ii): length of the repeated prompt segment")
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--max-batched-tokens", type=int, default=1024)
    ap.add_argument("--gpu-memory-fraction", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=300.0, help="per-configuration process timeout (s)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--scenario", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--phase-k", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--phase-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.scenario:
        with open(args.phase_out, "w") as f:
            json.dump(run_config(args), f, default=str)
        return

    result = {
        "benchmark": "gpu_speculative", "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": command_line("benchmarks/gpu_speculative.py"), "versions": versions(),
        "workload": {"requests": args.requests, "arrivals": "all at t=0", "concurrency": args.concurrency,
                     "prompt_len": args.prompt_len, "output_len": args.output_len, "sampling": "greedy",
                     "ignore_eos": True, "copy_heavy_segment": args.segment, "dtype": "bfloat16",
                     "max_batched_tokens": args.max_batched_tokens},
        "scenarios": {name: SCENARIOS[name] for name in args.scenarios.split(",")},
        "isolation": "each configuration runs in its own process on a fresh engine",
        "runs": [],
    }
    raw = argv_without("--out")
    for name in args.scenarios.split(","):
        for k in [int(x) for x in args.ks.split(",")]:
            run = run_script(__file__, [*raw, "--scenario", name, "--phase-k", str(k)], args.timeout)
            result["runs"].append({"scenario": name, "spec_k": k, **run} if "error" in run else run)
            write_json(args.out, result)  # keep what finished if a later configuration times out
    summary = [summary_row(r) for r in result["runs"]]
    result["summary"] = summary
    print(json.dumps(summary, indent=1))
    write_json(args.out, result)


if __name__ == "__main__":
    main()
