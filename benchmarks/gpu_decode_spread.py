"""Does a decode batch cost what its longest row costs? Decode iterations of R rows whose contexts are
equal, or of the same total with a few long rows (a serving load's batch: short chats beside a few
long jobs), or all at the long length; the iteration time (overlapped steps back to back, as the
engine serves: max of host and GPU) and, on CUDA, the decode graph's GPU time (CUDA events around
back-to-back replays on the buffers of the last step, benchmarks/gpu_decode_sweep.py's
`replay_gpu_time`), beside what a simulation profile prices them at.

The decode attention kernel runs one program per (row, KV head, KV slice) and, while they do not fill
the GPU, ends with the longest: if so, `few_long` costs about what `uniform_long` costs, not what
`uniform` (same total context) costs, and a cost model with only the sum of contexts underprices it
(engine/sim/cost_model.py `max_context`).

    PYTHONPATH=. python benchmarks/gpu_decode_spread.py --out benchmarks/results/gpu_decode_spread_qwen3-0.6b.json
    PYTHONPATH=. python benchmarks/gpu_decode_spread.py --model synthetic:tiny --device cpu --rows 4,8 --mean-context 48 --long 160 --steps 4 --out /tmp/spread.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from batchdeck.engine.config import EngineConfig, LiveConfig  # noqa: E402
from benchmarks.bench_common import (DEFAULT_SIM_PROFILE, add_async_scheduling_flag, async_scheduling_for,  # noqa: E402
                                     default_dtype)
from batchdeck.engine.llm_engine import LLMEngine  # noqa: E402
from batchdeck.engine.request import SamplingParams  # noqa: E402
from batchdeck.engine.settings import defaults_for  # noqa: E402
from batchdeck.engine.sim.cost_model import IterationShape  # noqa: E402
from batchdeck.engine.sim.profile import load_profile  # noqa: E402


MAX_TOKENS = 2048  # the engine's token budget and limit (its mixed graph buckets); decode rows are --rows


def patterns(rows: int, mean: int, long: int) -> dict[str, list[int]]:
    """Prompt lengths per row: equal; the same total with rows // 8 (at least 1) at `long`; all at `long`."""
    k = max(1, rows // 8)
    short = max(8, (rows * mean - k * long) // max(1, rows - k))
    return {"uniform": [mean] * rows, "few_long": [long] * k + [short] * (rows - k), "uniform_long": [long] * rows}


def run_case(engine: LLMEngine, name: str, prompts: list[int], args, vocab: int, rng: random.Random) -> dict:
    ids = [f"{name}-{len(prompts)}-{i}" for i in range(len(prompts))]
    budget = args.warmup_steps + args.steps + 8 + sum(prompts) // 128
    for rid, p in zip(ids, prompts):
        engine.add_request(rid, [rng.randrange(3, vocab - 1) for _ in range(p)],
                           SamplingParams(max_tokens=budget, ignore_eos=True))
    reqs = [engine.requests[rid] for rid in ids]
    while any(r.first_token_time is None for r in reqs):
        engine.step()
    for _ in range(args.warmup_steps):
        engine.step()
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    times, shapes = [], []
    for _ in range(args.steps):
        shapes.append(IterationShape.of_rows([(r.num_tokens - 1, 1) for r in reqs]))
        t = time.perf_counter()
        res = engine.step()
        times.append(time.perf_counter() - t)
        assert res.record.num_prefill_tokens == 0 and res.record.num_decode_tokens == len(prompts), res.record
    out = {"rows": len(prompts), "pattern": name, "prompt_tokens": sorted(set(prompts)),
           "mean_context": statistics.mean(s.decode_context for s in shapes) * 1e3 / len(prompts),
           "max_context": statistics.mean(s.decode_max_context for s in shapes) * 1e3,
           "step_ms_median": 1e3 * statistics.median(times), "step_ms_mean": 1e3 * statistics.mean(times)}
    if engine.device.type == "cuda" and getattr(engine.runner, "graphs", None) is not None:
        from benchmarks.gpu_decode_sweep import replay_gpu_time

        out.update(replay_gpu_time(engine, len(prompts), args.replays))
    for rid in ids:
        engine.abort(rid)
    while engine.has_unfinished:
        engine.step()
    return {**out, "shape": shapes[len(shapes) // 2]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="synthetic:qwen3-0.6b")
    ap.add_argument("--device", default=None)
    ap.add_argument("--rows", default="8,16,24,32,48,64", help="decode rows per case")
    ap.add_argument("--mean-context", type=int, default=380, help="prompt tokens per row of `uniform`")
    ap.add_argument("--long", type=int, default=1100, help="prompt tokens of a long row")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--warmup-steps", type=int, default=4)
    ap.add_argument("--replays", type=int, default=50)
    ap.add_argument("--profile", default=DEFAULT_SIM_PROFILE, help="simulation profile whose prices are shown beside")
    add_async_scheduling_flag(ap)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    device = args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = default_dtype(device)
    rows = sorted({int(r) for r in args.rows.split(",")})
    max_rows = max(rows)
    t0 = time.perf_counter()
    block_size = defaults_for(device)["block_size"]
    pool = max_rows * (args.long + args.steps + args.warmup_steps + 64) // block_size + 64
    cfg = EngineConfig(model=args.model, device=device, dtype=dtype, num_blocks=pool, max_num_seqs_limit=max_rows,
                       max_batched_tokens_limit=MAX_TOKENS, spec_k_limit=0, seed=0,
                       async_scheduling=async_scheduling_for(args))
    engine = LLMEngine(cfg, LiveConfig(max_num_seqs=max_rows, max_batched_tokens=MAX_TOKENS, chunk_size=512))
    cost = load_profile(args.profile).cost.for_limits(max_rows, MAX_TOKENS)  # the buckets this engine captured
    vocab = engine.loaded.config.vocab_size
    rng = random.Random(0)
    cases = []
    for r in rows:
        for name, prompts in patterns(r, args.mean_context, args.long).items():
            c = run_case(engine, name, prompts, args, vocab, rng)
            shape = c.pop("shape")
            _, device_s, host_s = cost.device_and_host(shape)
            # the price, max(host, device), and its two terms: the graph's GPU time compares with the device's
            c["profile_ms"] = 1e3 * cost.predict(shape)
            c["profile_device_ms"] = 1e3 * device_s
            c["profile_host_ms"] = None if host_s is None else 1e3 * host_s
            cases.append(c)
            print(f"rows {r:3d} {name:12} ctx mean {c['mean_context']:6.0f} max {c['max_context']:6.0f}: step "
                  f"{c['step_ms_median']:.3f} ms" + (f", graph GPU {c['graph_replay_gpu_ms']:.3f} ms"
                                                     if "graph_replay_gpu_ms" in c else "")
                  + f"; profile {args.profile} {c['profile_ms']:.3f} ms (device {c['profile_device_ms']:.3f})",
                  flush=True)
    out = {"benchmark": "gpu_decode_spread", "device": torch.cuda.get_device_name() if device.startswith("cuda")
           else f"CPU ({platform.processor() or platform.machine()})", "model": args.model, "dtype": dtype,
           "async_scheduling": engine.async_scheduling, "profile": args.profile, "mean_context": args.mean_context,
           "long": args.long, "steps": args.steps, "cases": cases, "torch": torch.__version__,
           "python": platform.python_version(), "wall_time_s": round(time.perf_counter() - t0, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
