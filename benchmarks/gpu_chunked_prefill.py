"""Chunked prefill on the GPU: the decode tail while long prompts arrive.

    python benchmarks/gpu_chunked_prefill.py --out benchmarks/results/gpu_chunked_prefill_qwen3-0.6b.json
    python benchmarks/gpu_chunked_prefill.py --device cpu --model synthetic:tiny --decoders 4 \
        --long-prompt 200 --decode-prompt 16 --decode-tokens 32 --duration 2 --budget 256 --chunk-sizes 32,256

Workload (one fresh process per chunk size): a steady decode load of `--decoders` requests (closed
loop: prompt `--decode-prompt` tokens, `--decode-tokens` outputs each; a finished one is replaced at
once) while a long prompt of `--long-prompt` tokens (`--long-output` outputs) arrives every
`--long-every` seconds, for `--duration` seconds after a warm-up. Greedy, ignore_eos, bf16 on CUDA,
stall-free mixing, token budget `--budget`. Each phase sets `chunk_size` to one of `--chunk-sizes`:
the small one splits each long prompt over many iterations; `chunk_size = budget` prefills it in as
few iterations as the budget allows (whole-prompt prefill).

Reported per phase: inter-token latency (every gap between consecutive tokens, vLLM's ITL) of the
decoding requests, p50/p90/p99/max; TTFT of the long prompts; output and total (prompt + output)
tokens per second over the measured window; iteration counts. The seed's claim (and Sarathi-Serve's
measurement) is a several times lower ITL tail for chunked prefill at a small throughput cost.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_common import (add_async_scheduling_flag, argv_without, async_scheduling_for, command_line, default_dtype, dist,  # noqa: E402
                          log, run_script, versions, write_json)


def run_phase(args) -> dict:
    import torch

    from batchdeck.engine.config import EngineConfig, LiveConfig
    from batchdeck.engine.llm_engine import LLMEngine
    from batchdeck.engine.models import synthetic_config
    from batchdeck.engine.request import SamplingParams

    cuda = args.device.startswith("cuda")
    chunk = args.phase_chunk
    vocab = synthetic_config(args.model.split(":", 1)[1]).vocab_size
    max_seqs = args.decoders + 8
    ecfg = EngineConfig(model=args.model, device=args.device, dtype=default_dtype(args.device),
                        max_num_seqs_limit=max_seqs, max_batched_tokens_limit=args.budget,
                        num_blocks=None if cuda else args.cpu_num_blocks, cuda_graphs=cuda,
                        async_scheduling=async_scheduling_for(args))
    live = LiveConfig(max_num_seqs=max_seqs, max_batched_tokens=args.budget, chunk_size=chunk)
    t0 = time.perf_counter()
    engine = LLMEngine(ecfg, live)
    init_s = time.perf_counter() - t0
    rng = random.Random(args.seed)

    def prompt(n: int) -> list[int]:
        return [rng.randrange(vocab) for _ in range(n)]

    decode_sampling = SamplingParams(max_tokens=args.decode_tokens, ignore_eos=True)
    long_sampling = SamplingParams(max_tokens=args.long_output, ignore_eos=True)
    # warm-up: one long prompt beside the decoders, untimed
    engine.add_request("warm-long", prompt(args.long_prompt), long_sampling)
    for i in range(args.decoders):
        engine.add_request(f"warm{i}", prompt(args.decode_prompt), SamplingParams(max_tokens=8, ignore_eos=True))
    engine.run_until_done()
    engine.requests.clear()
    if cuda:
        torch.cuda.synchronize()

    engine.restart_clock()
    decoders = {}
    longs = []
    n = 0
    for _ in range(args.decoders):
        decoders[f"d{n}"] = engine.add_request(f"d{n}", prompt(args.decode_prompt), decode_sampling)
        n += 1
    next_long = 0.0
    iterations = 0
    t_start = engine.clock()
    done_decoders = []
    while True:
        now = engine.clock() - t_start
        if now >= args.duration:
            break
        if now >= next_long:
            longs.append(engine.add_request(f"long{len(longs)}", prompt(args.long_prompt), long_sampling))
            next_long += args.long_every
        engine.step()
        iterations += 1
        for rid in [r for r, q in decoders.items() if q.is_finished]:
            done_decoders.append(decoders.pop(rid))
            decoders[f"d{n}"] = engine.add_request(f"d{n}", prompt(args.decode_prompt), decode_sampling)
            n += 1
    window = engine.clock() - t_start
    measured = done_decoders + list(decoders.values())
    gaps = [b - a for r in measured for a, b in zip(r.token_times, r.token_times[1:])]
    out_tokens = sum(len(r.output_token_ids) for r in measured + longs)
    prompt_tokens = sum(r.num_prompt_tokens for r in measured + longs if r.num_computed_tokens >= r.num_prompt_tokens)
    ttft_long = [r.first_token_time - r.arrival_time for r in longs if r.first_token_time is not None]
    res = {
        "chunk_size": chunk, "device": torch.cuda.get_device_name() if cuda else "cpu",
        "engine_init_seconds": init_s, "window_s": window, "iterations": iterations,
        "decode_itl_s": dist(gaps), "decode_gaps": len(gaps), "long_prompts_arrived": len(longs),
        "long_prompts_started": len(ttft_long), "long_ttft_s": dist(ttft_long),
        "output_tok_s": out_tokens / window, "total_tok_s": (out_tokens + prompt_tokens) / window,
    }
    itl = res["decode_itl_s"] or {}
    log(f"[chunk {chunk}] {iterations} iterations; ITL p50 {itl.get('p50', float('nan')) * 1e3:.2f} ms p99 "
        f"{itl.get('p99', float('nan')) * 1e3:.2f} ms; {res['output_tok_s']:.0f} out tok/s, "
        f"{res['total_tok_s']:.0f} total tok/s")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="synthetic:qwen3-0.6b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--decoders", type=int, default=64)
    ap.add_argument("--decode-prompt", type=int, default=256)
    ap.add_argument("--decode-tokens", type=int, default=1024)
    ap.add_argument("--long-prompt", type=int, default=8000, help="long prompt tokens (synthetic context is 8192)")
    ap.add_argument("--long-output", type=int, default=16)
    ap.add_argument("--long-every", type=float, default=1.0, help="seconds between long prompts")
    ap.add_argument("--duration", type=float, default=20.0, help="measured seconds per phase")
    ap.add_argument("--budget", type=int, default=8192, help="max_batched_tokens")
    ap.add_argument("--chunk-sizes", default="512,8192")
    ap.add_argument("--cpu-num-blocks", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=240.0)
    add_async_scheduling_flag(ap)
    ap.add_argument("--out", default=None)
    ap.add_argument("--phase-chunk", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--phase-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase_chunk:
        with open(args.phase_out, "w") as f:
            json.dump(run_phase(args), f, default=str)
        return
    raw = argv_without("--out")
    phases = {int(c): run_script(__file__, [*raw, "--phase-chunk", c], args.timeout)
              for c in args.chunk_sizes.split(",")}
    result = {"benchmark": "gpu_chunked_prefill", "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "command": command_line("benchmarks/gpu_chunked_prefill.py"), "versions": versions(),
              "device": next((p["device"] for p in phases.values() if "device" in p), None),
              "workload": {k: getattr(args, k) for k in ("model", "decoders", "decode_prompt", "decode_tokens",
                                                        "long_prompt", "long_output", "long_every", "duration",
                                                        "budget", "seed")},
              "async_scheduling": async_scheduling_for(args), "phases": phases}
    small, whole = min(phases), max(phases)
    a, b = phases[small], phases[whole]
    if a.get("decode_itl_s") and b.get("decode_itl_s"):
        result["whole_over_chunked"] = {
            "itl_p99": b["decode_itl_s"]["p99"] / a["decode_itl_s"]["p99"],
            "itl_p50": b["decode_itl_s"]["p50"] / a["decode_itl_s"]["p50"],
            "total_tok_s": b["total_tok_s"] / a["total_tok_s"],
            "note": f"chunk_size {whole} over chunk_size {small}: >1 ITL means chunking lowers the tail"}
    print(json.dumps(result.get("whole_over_chunked"), indent=1))
    write_json(args.out, result)


if __name__ == "__main__":
    main()
