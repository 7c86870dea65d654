"""Benchmark (d): decode tokens/s against batch size at a fixed context, with each point's roofline.

    PYTHONPATH=. python benchmarks/gpu_decode_sweep.py --out benchmarks/results/gpu_decode_sweep_qwen3-0.6b.json

For every batch size B in `--batch-sizes`: B requests with `--context`-token prompts (token ids
uniform over the vocabulary, random.Random(seed)) are prefilled (chunked, untimed); once all of them
decode, `--warmup-steps` decode iterations run untimed and `--steps` are timed one by one
(perf_counter around `engine.step()`, which returns after the sampled tokens reach the host; with
overlapped iterations, --async-scheduling, the steps run back to back without a sync between them, so a
step's time is the steady cost of one iteration, host and GPU overlapped). Every
timed iteration is checked to be decode-only with B rows. One engine (CUDA graphs, Triton attention,
fused layer kernels; the configuration of benchmark (a)) serves all points.

Per-step breakdown of every point (medians over the timed steps, from the iteration records): schedule,
prepare (host: fill the pinned mirror, upload), forward (host: launch the graph replay), sample (argmax,
and the wait for the GPU until the ids reach the host), bookkeeping (the rest of `engine.step()`) and
outside the step; then, on CUDA, the GPU time of the point's decode graph alone (CUDA events around
`--replays` back-to-back replays on the buffers of the last timed step, which rewrite the same K/V)
and of one replay followed by a sync. The step time minus the replay's GPU time is host time on the
critical path; `--kernel-profile` lists that graph's kernels by GPU time per replay. BATCHDECK_ATTN_MAX_SPLITS=1 turns split-KV decode attention off (for a before/after).
`--fusion-levels 2,1` also sweeps each further BATCHDECK_FUSED level (engine/triton_fused.py: 0 stock
modules, 1 per-module fusions, 2 across modules, 3 also the small-M linears at decode row counts) in a
child process and saves its summary beside
the main run's under "fusion_comparison" (the main run uses the first level).

Roofline of a point: a decode iteration reads the weights once (tied embeddings counted once) plus
the KV cache of every running request (its context, incl. the token being decoded), at the HBM copy
bandwidth measured in the same run (`measure_ceilings` of gpu_offline.py):
    roofline_tok_s = B / ((weight_bytes + B * kv_bytes_per_token * mean_context) / bandwidth).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_common import (add_async_scheduling_flag, async_scheduling_for, command_line,  # noqa: E402
                                     default_dtype, log, release_device_memory, replay_gpu_ms, versions,
                                     tuning_env, write_json)
from benchmarks.gpu_offline import measure_ceilings  # noqa: E402
from batchdeck.engine.attention.decode_splits import MAX_DECODE_SPLITS  # noqa: E402
from batchdeck.engine.config import EngineConfig, LiveConfig  # noqa: E402
from batchdeck.engine.llm_engine import LLMEngine  # noqa: E402
from batchdeck.engine.models import SYNTHETIC_SHAPES, synthetic_config  # noqa: E402
from batchdeck.engine.request import SamplingParams  # noqa: E402


def model_bytes(cfg, dtype_bytes: int = 2) -> tuple[int, int]:
    """(weight bytes read per decode iteration, KV bytes per token), as gpu_offline.py counts them."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        meta_model = AutoModelForCausalLM.from_config(cfg)
    weight_bytes = sum(p.numel() for p in meta_model.parameters()) * dtype_bytes
    if not getattr(cfg, "tie_word_embeddings", False):  # an untied input embedding is only gathered
        weight_bytes -= meta_model.get_input_embeddings().weight.numel() * dtype_bytes
    del meta_model
    h = cfg.num_attention_heads
    kvh = getattr(cfg, "num_key_value_heads", None) or h
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // h
    return weight_bytes, 2 * cfg.num_hidden_layers * kvh * d * dtype_bytes


def sweep_point(engine: LLMEngine, b: int, args, vocab: int, rng: random.Random) -> dict:
    steps, warm = args.steps, args.warmup_steps
    ids = [f"b{b}_{i}" for i in range(b)]
    # requests prefilled early decode while later ones prefill: leave room so none finishes before
    # the timed steps end (every timed step must have B rows)
    max_tokens = warm + steps + 4 + -(-b * args.context // args.max_batched_tokens)
    for rid in ids:
        prompt = [rng.randrange(vocab) for _ in range(args.context)]
        engine.add_request(rid, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    reqs = [engine.requests[rid] for rid in ids]
    t0 = time.perf_counter()
    prefill_iters = 0
    while any(r.first_token_time is None for r in reqs):
        engine.step()
        prefill_iters += 1
    prefill_s = time.perf_counter() - t0
    times, bad, ctx = [], 0, []
    parts: dict[str, list[float]] = {k: [] for k in ("schedule", "draft", "prepare", "forward", "sample",
                                                      "bookkeeping", "outside_step")}
    # Synchronous steps are timed one by one from an idle GPU. Overlapped steps are not synced between:
    # step() returns once the previous iteration's ids are read and the next one is launched, so the
    # time between two returns is one iteration's cost in a steady decode (max of host and GPU).
    sync_each = engine.device.type == "cuda" and not engine.async_scheduling
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    for k in range(warm + steps):
        if sync_each:
            torch.cuda.synchronize()
        tokens_in_context = sum(r.num_tokens for r in reqs)  # incl. the token this step decodes
        t = time.perf_counter()
        res = engine.step()
        dt = time.perf_counter() - t
        rec = res.record
        ok = rec.num_prefill_tokens == 0 and rec.num_decode_tokens == b and rec.num_generated_tokens == b
        if k >= warm:
            times.append(dt)
            ctx.append(tokens_in_context / b)
            bad += not ok
            known = rec.schedule_time + rec.draft_time + rec.prepare_time + rec.forward_time + rec.sample_time
            for name, v in (("schedule", rec.schedule_time), ("draft", rec.draft_time), ("prepare", rec.prepare_time),
                            ("forward", rec.forward_time), ("sample", rec.sample_time),
                            ("bookkeeping", rec.step_time - known), ("outside_step", dt - rec.step_time)):
                parts[name].append(v)
    breakdown = {f"{name}_ms_median": 1e3 * statistics.median(v) for name, v in parts.items()}
    breakdown.update(replay_gpu_time(engine, b, args.replays, args.kernel_profile))
    mean_ctx = statistics.mean(ctx)
    engine.run_until_done()
    for rid in ids:
        del engine.requests[rid]
    return {"batch_size": b, "timed_steps": steps, "warmup_steps": warm, "step_ms": [1e3 * t for t in times],
            "step_ms_median": 1e3 * statistics.median(times), "step_ms_mean": 1e3 * statistics.mean(times),
            "tok_s": b * steps / sum(times), "tok_s_median_step": b / statistics.median(times),
            "context_tokens_first_timed_step": ctx[0], "context_tokens_mean": mean_ctx,
            "non_decode_only_timed_steps": bad, "prefill_iterations": prefill_iters, "prefill_seconds": prefill_s,
            "breakdown": breakdown}


def replay_gpu_time(engine: LLMEngine, b: int, replays: int, kernel_profile: bool = False) -> dict:
    """GPU ms of the decode graph for b rows (events around back-to-back replays), and the wall ms of
    one replay + copy of the ids to the host (the graph's own argmax, as the engine reads it), on the
    buffers the last step left."""
    graphs = engine.runner.graphs
    hit = graphs.lookup(b, b, True) if graphs is not None else None
    if hit is None or replays <= 0:
        return {}
    graph, logits, bucket = hit.graph, hit.logits, hit.rows
    torch.cuda.synchronize()
    gpu_ms = replay_gpu_ms(graph, replays)
    walls = []
    for _ in range(replays):
        t = time.perf_counter()
        graph.replay()
        (hit.greedy_ids[:b] if hit.greedy_ids is not None else logits[:b].argmax(dim=-1)).tolist()
        walls.append(time.perf_counter() - t)
    out = {"graph_bucket_rows": bucket, "graph_replay_gpu_ms": gpu_ms,
           "replay_argmax_to_host_wall_ms_median": 1e3 * statistics.median(walls)}
    if kernel_profile:
        out["kernels_per_replay"] = graph_kernels(graph, replays)
    return out


def graph_kernels(graph, replays: int, top: int = 25) -> list[dict]:
    """The kernels of one decode-graph replay, by GPU time (torch.profiler over `replays` replays):
    name, launches and microseconds per replay, the largest first; the rest summed as "(other)"."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    rows = sorted(((e.key, e.count, e.device_time_total) for e in prof.key_averages() if e.device_time_total > 0),
                  key=lambda r: -r[2])
    table = [{"kernel": k[:90], "launches_per_replay": n / replays, "us_per_replay": t / replays}
             for k, n, t in rows[:top]]
    rest = rows[top:]
    if rest:
        table.append({"kernel": "(other)", "launches_per_replay": sum(r[1] for r in rest) / replays,
                      "us_per_replay": sum(r[2] for r in rest) / replays})
    return table


def default_fusion_level(cuda: bool) -> str:
    """The engine's BATCHDECK_FUSED default (the fused kernels run on CUDA only: 0 elsewhere)."""
    if not cuda:
        return "0"
    from batchdeck.engine.triton_fused import DEFAULT_FUSION_LEVEL

    return str(DEFAULT_FUSION_LEVEL)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="synthetic:qwen3-0.6b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch-sizes", default="1,2,4,8,16,32,64,128,256")
    ap.add_argument("--context", type=int, default=1024, help="prompt tokens of every request")
    ap.add_argument("--steps", type=int, default=16, help="timed decode iterations per point")
    ap.add_argument("--warmup-steps", type=int, default=3)
    ap.add_argument("--replays", type=int, default=50, help="graph replays timed per point (CUDA)")
    ap.add_argument("--max-batched-tokens", type=int, default=8192)
    ap.add_argument("--chunk-size", type=int, default=2048)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--gpu-memory-fraction", type=float, default=0.85)
    ap.add_argument("--no-graphs", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    add_async_scheduling_flag(ap)
    ap.add_argument("--kernel-profile", action="store_true",
                    help="also list each point's decode-graph kernels by GPU time per replay (torch.profiler)")
    ap.add_argument("--attn-max-splits", default=None, metavar="CAPS",
                    help="comma-separated BATCHDECK_ATTN_MAX_SPLITS values: the first is the main run, each further "
                         "one a fresh engine in this process (splits_comparison)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--fusion-levels", default=None,
                    help="comma-separated BATCHDECK_FUSED levels (0-3); the first is this run's, each "
                         "further one is swept in a child process (default: the environment's, else the engine's)")
    args = ap.parse_args()
    command, given_env = command_line("benchmarks/gpu_decode_sweep.py"), tuning_env()  # before the sweep sets any
    cuda = args.device.startswith("cuda")
    levels = (args.fusion_levels.split(",") if args.fusion_levels
              else [os.environ.get("BATCHDECK_FUSED") or default_fusion_level(cuda)])
    if any(lv not in ("0", "1", "2", "3") for lv in levels):
        ap.error(f"--fusion-levels {args.fusion_levels!r}: allowed levels 0, 1, 2, 3")
    os.environ["BATCHDECK_FUSED"] = levels[0]
    caps = args.attn_max_splits.split(",") if args.attn_max_splits else [os.environ.get("BATCHDECK_ATTN_MAX_SPLITS")]
    if args.attn_max_splits and any(not c.isdigit() or not 1 <= int(c) <= MAX_DECODE_SPLITS for c in caps):
        ap.error(f"--attn-max-splits {args.attn_max_splits!r}: integers in [1, {MAX_DECODE_SPLITS}]")
    if caps[0] is not None:
        os.environ["BATCHDECK_ATTN_MAX_SPLITS"] = caps[0]
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    name = args.model.split(":", 1)[1]
    assert args.model.startswith("synthetic:") and name in SYNTHETIC_SHAPES, "a synthetic:<name> model"
    cfg = synthetic_config(name)
    dtype = default_dtype(args.device)

    result = {
        "benchmark": "gpu_decode_sweep", "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": command,
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "versions": versions(),
        "workload": {"model": args.model, "dtype": dtype, "batch_sizes": sizes, "context_tokens": args.context,
                     "prompt_tokens": f"uniform over the vocabulary (random.Random({args.seed}))",
                     "timed_decode_steps_per_point": args.steps, "warmup_decode_steps_per_point": args.warmup_steps,
                     "sampling": "greedy", "ignore_eos": True,
                     "timing": "perf_counter around each engine.step() (returns after sampled tokens reach the host); "
                               "tok_s = B * steps / sum(step times)"},
        "batchdeck_config": {"max_num_seqs": max(sizes), "max_batched_tokens": args.max_batched_tokens,
                             "chunk_size": args.chunk_size, "block_size": args.block_size, "batching": "continuous",
                             "cuda_graphs": cuda and not args.no_graphs, "attention_backend": "auto (triton on cuda)",
                             "async_scheduling": async_scheduling_for(args),
                             "fused_kernels": levels[0] != "0", "fusion_level": int(levels[0]),
                             "attention_max_splits": os.environ.get("BATCHDECK_ATTN_MAX_SPLITS",
                                                                    f"default ({MAX_DECODE_SPLITS})"),
                             "programmatic_dependent_launch": os.environ.get("BATCHDECK_PDL", "default (1: on Hopper)"),
                             "env": given_env},
    }
    weight_bytes, kv_per_token = model_bytes(cfg, 2 if cuda else 4)
    result["model_bytes"] = {"weight_bytes": weight_bytes, "kv_bytes_per_token": kv_per_token}
    if cuda:
        result["ceilings"] = measure_ceilings()
        bw = result["ceilings"]["hbm_copy_bytes_per_s"]
        log(f"copy bandwidth {bw / 1e9:.0f} GB/s")
        torch.cuda.empty_cache()
    else:
        result["ceilings"] = None
        bw = None

    result["engine"], points = run_points(args, sizes, cfg, bw, weight_bytes, kv_per_token)
    result["points"] = points
    summary = points_summary(points)
    print(json.dumps(summary, indent=1))
    if len(caps) > 1:  # each further split cap: a fresh engine in this process (its graphs captured under it)
        result["splits_comparison"] = {caps[0]: summary}
        for cap in caps[1:]:
            os.environ["BATCHDECK_ATTN_MAX_SPLITS"] = cap
            result["splits_comparison"][cap] = points_summary(
                run_points(args, sizes, cfg, bw, weight_bytes, kv_per_token)[1])
        os.environ["BATCHDECK_ATTN_MAX_SPLITS"] = caps[0]
        log("graph replay GPU ms / step ms by split cap: " + "; ".join(
            f"cap {c}: " + ", ".join(f"B={p['batch_size']} {p['graph_replay_gpu_ms'] or 0:.3f}/{p['step_ms_median']:.3f}"
                                     for p in pts) for c, pts in result["splits_comparison"].items()))
    if len(levels) > 1:
        result["fusion_comparison"] = {levels[0]: summary}
        for lv in levels[1:]:
            result["fusion_comparison"][lv] = fusion_level_run(lv, args)
        log("graph replay GPU ms by fusion level: " + "; ".join(
            f"level {lv}: " + ", ".join(f"B={p['batch_size']} {p['graph_replay_gpu_ms']}" for p in pts)
            for lv, pts in result["fusion_comparison"].items()))
    write_json(args.out, result)


def run_points(args, sizes: list[int], cfg, bw: float | None, weight_bytes: int, kv_per_token: int) -> tuple[dict, list[dict]]:
    """Build an engine (the environment's kernel settings), sweep `sizes`: (engine facts, points)."""
    dtype = default_dtype(args.device)
    cuda = args.device.startswith("cuda")
    ecfg = EngineConfig(model=args.model, device=args.device, dtype=dtype, block_size=args.block_size,
                        max_num_seqs_limit=max(sizes), max_batched_tokens_limit=args.max_batched_tokens,
                        gpu_memory_fraction=args.gpu_memory_fraction, cuda_graphs=cuda and not args.no_graphs,
                        num_blocks=None if cuda else max(sizes) * (-(-(args.context + 64) // args.block_size)) + 64,
                        async_scheduling=async_scheduling_for(args))
    live = LiveConfig(max_num_seqs=max(sizes), max_batched_tokens=args.max_batched_tokens,
                      chunk_size=min(args.chunk_size, args.max_batched_tokens))
    t0 = time.perf_counter()
    engine = LLMEngine(ecfg, live)
    graphs = engine.runner.graphs
    engine_info = {"init_seconds": time.perf_counter() - t0, "kv_blocks": engine.blocks.num_blocks,
                   "graphs_captured": len(graphs.graphs) if graphs else 0, "fused_modules": dict(engine.runner.fused)}
    log(f"engine up: {engine.blocks.num_blocks} KV blocks, {engine_info['graphs_captured']} graphs")
    rng = random.Random(args.seed)
    # warm-up: a short mixed run so first-call costs (allocator, odd shapes) are paid untimed
    for i in range(4):
        engine.add_request(f"warm{i}", [rng.randrange(cfg.vocab_size) for _ in range(64 + 32 * i)],
                           SamplingParams(max_tokens=8, ignore_eos=True))
    engine.run_until_done()
    engine.requests.clear()
    points = []
    for b in sizes:
        eager0 = graphs.stats.eager if graphs else 0
        p = sweep_point(engine, b, args, cfg.vocab_size, rng)
        p["eager_iterations_in_point"] = (graphs.stats.eager - eager0) if graphs else None
        if bw:
            bytes_per_iter = weight_bytes + b * kv_per_token * p["context_tokens_mean"]
            p["bytes_per_iteration"] = bytes_per_iter
            p["roofline_step_ms"] = 1e3 * bytes_per_iter / bw
            p["roofline_tok_s"] = b * bw / bytes_per_iter
            p["roofline_fraction"] = p["tok_s"] / p["roofline_tok_s"]
            p["achieved_GB_s"] = bytes_per_iter / (p["step_ms_mean"] / 1e3) / 1e9
        points.append(p)
        log(f"B={b:4d}: {p['step_ms_median']:.2f} ms/step, {p['tok_s']:.0f} tok/s"
            + (f", roofline {p['roofline_tok_s']:.0f} tok/s ({p['roofline_fraction']:.0%})" if bw else "")
            + "; " + ", ".join(f"{k.replace('_ms_median', '').replace('_ms', '')} {v:.3f}"
                               for k, v in p["breakdown"].items() if isinstance(v, float)))
        for k in p["breakdown"].get("kernels_per_replay", [])[:12]:
            log(f"    {k['us_per_replay']:9.1f} us  x{k['launches_per_replay']:6.1f}  {k['kernel']}")
    del engine, graphs
    release_device_memory(args.device)  # the pool goes back before another engine allocates its own
    return engine_info, points


def fusion_level_run(level: str, args) -> list[dict]:
    """The sweep's summary at another BATCHDECK_FUSED level, from a child process (a fresh engine and pool)."""
    argv = sys.argv[1:]
    drop = {"--out", "--fusion-levels"}
    kept, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in drop:
            skip = True
            continue
        if a.split("=", 1)[0] in drop:
            continue
        kept.append(a)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "child.json")
        log(f"fusion level {level}: child run")
        subprocess.run([sys.executable, os.path.abspath(__file__), *kept, "--fusion-levels", level, "--out", out],
                       env={**os.environ, "BATCHDECK_FUSED": level}, check=True)
        with open(out) as f:
            child = json.load(f)
    return points_summary(child["points"])


def points_summary(points: list[dict]) -> list[dict]:
    """The per-point lines printed and kept under fusion_comparison."""
    keys = ("batch_size", "step_ms_median", "tok_s", "roofline_tok_s", "roofline_fraction")
    return [{**{k: p.get(k) for k in keys}, "graph_replay_gpu_ms": p["breakdown"].get("graph_replay_gpu_ms")}
            for p in points]


if __name__ == "__main__":
    main()
