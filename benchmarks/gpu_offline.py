"""Benchmark (a)/(b)/(c): offline throughput of batchdeck against transformers, and the roofline.

    PYTHONPATH=. python benchmarks/gpu_offline.py                       # (a) qwen3-0.6b, 256 requests
    PYTHONPATH=. python benchmarks/gpu_offline.py --model synthetic:llama-3.1-8b --requests 64   # (b)

Workload: `--requests` requests with prompt lengths uniform in [100, 1024] and token ids uniform
over the vocabulary (random.Random(seed)), `--output-tokens` output tokens each (ignore_eos,
greedy), all arriving at once; bf16. In the same run:

- the two ceilings: HBM bandwidth (a large device-to-device copy, bytes read + written) and the
  bf16 matmul rate (8192^3 on random data), medians of CUDA-event timings;
- batchdeck (continuous batching, CUDA graphs, Triton attention, fused layer kernels), `--repeats`
  timed runs with telemetry records on (the reported one is the median), one more with CUDA events
  around every iteration for the per-iteration breakdown (schedule / prepare / forward / sample on
  host clocks, GPU time per iteration) and the GPU idle fraction (over the run, and between the
  iterations of the steady decode phase); all of that with overlapped iterations
  (`--async-scheduling`, the default) and again without (`--no-async-scheduling`; `--no-compare-async`
  skips the second setting), optionally one with a null sink
  (`--telemetry-check`: telemetry's cost) and one with stock HF modules (`--compare-unfused`);
- transformers `generate()` in static batches of 64 with left padding (`--hf-generate-batches`
  of them: scaled runs say so in the JSON), and `generate_batch()` continuous batching.

Roofline: every decode step k = 1 .. output_tokens-1 of an ideal schedule (all requests batched)
reads the weights once plus the KV of every request (prompt + k tokens), at the measured copy
bandwidth; every prompt token costs its matmul + causal attention FLOPs at the measured matmul
rate. roofline_tok_s = output tokens / (decode bytes / bandwidth + prefill FLOPs / rate).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_common import (argv_without, command_line, default_dtype, log, release_device_memory,  # noqa: E402
                                     run_script, tuning_env, versions, write_json)
from batchdeck.engine.config import EngineConfig, LiveConfig  # noqa: E402
from batchdeck.engine.llm_engine import LLMEngine  # noqa: E402
from batchdeck.engine.models import SYNTHETIC_SHAPES, synthetic_config  # noqa: E402
from batchdeck.engine.request import SamplingParams  # noqa: E402


def timed_median(fn, reps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def measure_ceilings() -> dict:
    n = 2 * 1024 ** 3  # bytes per buffer
    src = torch.randn(n // 2, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    t = timed_median(lambda: dst.copy_(src), 20)
    bw = 2 * n / t
    del src, dst
    m = 8192
    a = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    t_mm = timed_median(lambda: a @ b, 10)
    del a, b
    torch.cuda.empty_cache()
    return {"hbm_copy_bytes_per_s": bw, "hbm_copy_GB_s": bw / 1e9, "copy_bytes_counted": "read + written, 2 x 2 GiB",
            "bf16_matmul_flops_per_s": 2 * m ** 3 / t_mm, "bf16_matmul_TFLOP_s": 2 * m ** 3 / t_mm / 1e12,
            "matmul": f"{m}x{m}x{m} bf16 random"}


def workload(args, vocab: int):
    rng = random.Random(args.seed)
    lens = [rng.randint(args.min_prompt, args.max_prompt) for _ in range(args.requests)]
    return [[rng.randrange(vocab) for _ in range(n)] for n in lens]


def roofline(cfg, prompts, out_tokens: int, weight_bytes: int, ceilings: dict) -> dict:
    layers, h = cfg.num_hidden_layers, cfg.num_attention_heads
    kvh = getattr(cfg, "num_key_value_heads", None) or h
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // h
    kv_per_token = 2 * layers * kvh * d * 2  # K and V, bf16
    hidden, inter, vocab = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    linear_params = layers * (hidden * (h * d) * 2 + hidden * (kvh * d) * 2 + 3 * hidden * inter)
    sum_p = sum(len(p) for p in prompts)
    n = len(prompts)
    decode_steps = out_tokens - 1
    decode_bytes = sum(weight_bytes + kv_per_token * (sum_p + n * k) for k in range(1, decode_steps + 1))
    attn_flops = sum(4 * layers * h * d * len(p) * (len(p) + 1) / 2 for p in prompts)
    prefill_flops = 2 * linear_params * sum_p + attn_flops + n * 2 * hidden * vocab
    t_decode = decode_bytes / ceilings["hbm_copy_bytes_per_s"]
    t_prefill = prefill_flops / ceilings["bf16_matmul_flops_per_s"]
    total_out = n * out_tokens
    return {"roofline_tok_s": total_out / (t_decode + t_prefill), "decode_seconds": t_decode,
            "prefill_seconds": t_prefill, "decode_bytes": decode_bytes, "prefill_flops": prefill_flops,
            "weight_bytes": weight_bytes, "kv_bytes_per_token": kv_per_token, "decode_steps": decode_steps,
            "linear_params": linear_params}


def sync(args) -> None:
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()


def steady_decode_idle(records, gpu_log) -> dict:
    """Device idle time between iterations in the steady decode phase: the decode-only iterations after
    the last one with prefill tokens, over which every request decodes (a gap = the next iteration's
    upload started after the previous one's sampled ids were ready)."""
    prefill_its = [r.iteration for r in records if r.num_prefill_tokens > 0]
    last_prefill = max(prefill_its) if prefill_its else -1
    full = max((r.num_decode_tokens for r in records if r.iteration > last_prefill), default=0)
    steady = {r.iteration for r in records if r.iteration > last_prefill and r.num_decode_tokens >= 0.9 * full}
    spans = sorted((it, t.gpu_start_ms, t.gpu_end_ms) for it, t in gpu_log
                   if it in steady and t.gpu_start_ms is not None)
    if len(spans) < 2:
        return {"steady_decode_iterations": len(spans)}
    gaps = [max(0.0, b[1] - a[2]) for a, b in zip(spans, spans[1:]) if b[0] == a[0] + 1]
    span_ms = spans[-1][2] - spans[0][1]
    return {"steady_decode_iterations": len(spans), "steady_decode_rows_min": int(0.9 * full),
            "steady_decode_gpu_idle_fraction": sum(gaps) / span_ms if span_ms > 0 else None,
            "steady_decode_gap_ms_median": statistics.median(gaps) if gaps else None,
            "steady_decode_iteration_ms_median": statistics.median(
                (b[1] - a[1]) for a, b in zip(spans, spans[1:]) if b[0] == a[0] + 1)}


def run_batchdeck(args, prompts, telemetry: bool, profile: bool) -> dict:
    cfg = EngineConfig(model=args.model, device=args.device, dtype=args.dtype, block_size=args.block_size,
                       max_num_seqs_limit=args.max_num_seqs, max_batched_tokens_limit=args.max_batched_tokens,
                       gpu_memory_fraction=args.gpu_memory_fraction, cuda_graphs=not args.no_graphs,
                       async_scheduling=args.async_scheduling)
    live = LiveConfig(max_num_seqs=args.max_num_seqs, max_batched_tokens=args.max_batched_tokens,
                      chunk_size=min(args.chunk_size, args.max_batched_tokens))
    records = []
    sink = (lambda kind, obj: records.append(obj) if kind == "iteration" else None) if telemetry else None
    t0 = time.perf_counter()
    engine = LLMEngine(cfg, live, **({"sink": sink} if sink else {}))
    init_s = time.perf_counter() - t0
    graphs = engine.runner.graphs
    log(f"batchdeck engine up in {init_s:.1f}s: {engine.blocks.num_blocks} KV blocks, "
        f"{len(graphs.graphs) if graphs else 0} graphs ({graphs.stats.capture_seconds if graphs else 0:.1f}s)")
    # Warm-up (kernels for odd shapes, allocator): a few short requests, then a clean clock.
    for i in range(8):
        engine.add_request(f"warm{i}", prompts[i][:50 + 30 * i], SamplingParams(max_tokens=8, ignore_eos=True))
    engine.run_until_done()
    engine.requests.clear()
    records.clear()
    gpu_log = []
    if profile:
        engine.runner.profile_gpu = True
        orig = engine.runner.launch

        def wrapped(plan, blocks, prev=None):
            step = orig(plan, blocks, prev)
            gpu_log.append((engine.iteration, step.timings))  # filled in when the engine books it
            return step
        engine.runner.launch = wrapped
    if graphs:
        graphs.stats.replays = graphs.stats.eager = 0
    engine.restart_clock()
    sync(args)
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(max_tokens=args.output_tokens, ignore_eos=True))
    engine.run_until_done()
    sync(args)
    wall = time.perf_counter() - t0
    out_tokens = sum(len(engine.requests[str(i)].output_token_ids) for i in range(len(prompts)))
    res = {"tok_s": out_tokens / wall, "seconds": wall, "output_tokens": out_tokens, "iterations": engine.iteration,
           "async_scheduling": engine.async_scheduling,
           "engine_init_seconds": init_s, "kv_blocks": engine.blocks.num_blocks, "telemetry_records": telemetry,
           "fused_modules": dict(engine.runner.fused),
           "graphs_captured": len(graphs.graphs) if graphs else 0,
           "graph_capture_seconds": graphs.stats.capture_seconds if graphs else 0.0,
           "graph_replays": graphs.stats.replays if graphs else 0, "eager_iterations": graphs.stats.eager if graphs else None}
    if records:
        def agg(name):
            vals = [getattr(r, name) for r in records]
            return {"total_s": sum(vals), "mean_ms": 1e3 * statistics.mean(vals)}
        dec = [r for r in records if r.num_prefill_tokens == 0]
        mixed = [r for r in records if r.num_prefill_tokens > 0]
        res["breakdown"] = {k: agg(k) for k in ("step_time", "schedule_time", "prepare_time", "forward_time",
                                                "sample_time")}
        res["breakdown"]["bookkeeping"] = {"total_s": sum(r.step_time - r.schedule_time - r.prepare_time
                                                          - r.forward_time - r.sample_time for r in records)}
        res["breakdown"]["outside_step_s"] = wall - sum(r.step_time for r in records)
        res["breakdown"]["sync_wait_time"] = agg("sync_wait_time")
        res["iterations_overlapped"] = sum(1 for r in records if r.overlapped)
        res["iterations_decode_only"] = len(dec)
        res["iterations_with_prefill"] = len(mixed)
        if dec:
            res["decode_step_ms_median"] = 1e3 * statistics.median(r.step_time for r in dec)
            res["decode_step_ms_median_full_batch"] = 1e3 * statistics.median(
                [r.step_time for r in dec if r.num_decode_tokens == max(x.num_decode_tokens for x in dec)])
        if mixed:
            res["mixed_step_ms_median"] = 1e3 * statistics.median(r.step_time for r in mixed)
    if gpu_log:
        gpu_s = sum(t.gpu_ms for _, t in gpu_log if t.gpu_ms is not None) / 1e3
        res["gpu_busy_seconds"] = gpu_s
        res["gpu_idle_fraction"] = max(0.0, 1 - gpu_s / wall)
        res["graph_iterations"] = sum(1 for _, t in gpu_log if t.graph)
        per = [t.gpu_ms for _, t in gpu_log if t.gpu_ms is not None]
        if per:
            res["gpu_ms_per_iteration_median"] = statistics.median(per)
        if records and per:
            res.update(steady_decode_idle(records, gpu_log))
            gpu_ms = {it: t.gpu_ms for it, t in gpu_log}
            res["per_iteration"] = {
                "columns": ["iteration", "prefill_tokens", "decode_tokens", "step_ms", "gpu_ms"],
                "rows": [[r.iteration, r.num_prefill_tokens, r.num_decode_tokens, round(1e3 * r.step_time, 4),
                          None if gpu_ms.get(r.iteration) is None else round(gpu_ms[r.iteration], 4)]
                         for r in records]}
    del engine
    release_device_memory(args.device)
    return res


def hf_model(name: str):
    from transformers import AutoModelForCausalLM

    cfg = synthetic_config(name.split(":", 1)[1])
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
    model.eval().requires_grad_(False)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


@torch.inference_mode()
def run_hf_generate(model, prompts, out_tokens: int, batch: int, batches: int) -> dict:
    def go(group, n_new=out_tokens):
        width = max(len(p) for p in group)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in group], device="cuda")
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group], device="cuda")
        out = model.generate(ids, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new,
                             do_sample=False, pad_token_id=0)
        return (out.shape[1] - width) * len(group)

    groups = [prompts[i:i + batch] for i in range(0, len(prompts), batch)][:batches]
    go(groups[0], 16)  # warm-up at full batch shape (untimed)
    torch.cuda.synchronize()
    total, seconds, per = 0, 0.0, []
    for g in groups:
        t0 = time.perf_counter()
        n = go(g)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        total += n
        seconds += dt
        per.append(dt)
        log(f"hf generate batch of {len(g)}: {n / dt:.0f} tok/s")
    return {"tok_s": total / seconds, "seconds": seconds, "output_tokens": total, "batch_size": batch,
            "batches_run": len(groups), "requests_run": sum(len(g) for g in groups), "batch_seconds": per,
            "padding": "left", "attn_implementation": "sdpa", "warmup": "first batch, 16 new tokens, untimed"}


def run_hf_generate_batch(model, prompts, out_tokens: int) -> dict:
    from transformers import GenerationConfig

    if not hasattr(model, "generate_batch"):
        return {"error": "this transformers has no generate_batch()"}
    gen = GenerationConfig(max_new_tokens=out_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)
    t0 = time.perf_counter()
    results = model.generate_batch(inputs=prompts, generation_config=gen, progress_bar=False)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    total = sum(len(r.generated_tokens) for r in results.values())
    return {"tok_s": total / dt, "seconds": dt, "output_tokens": total, "requests_run": len(prompts),
            "requests_finished": len(results), "note": "timed call includes its own warm-up / graph capture",
            "attn_implementation": str(model.config._attn_implementation)}


PHASES = ("batchdeck", "hf", "profile")


def run_profile(args, prompts, path: str) -> dict:
    """A short run (all prompts, few output tokens) under torch.profiler: top kernels by GPU time."""
    from torch.profiler import ProfilerActivity, profile

    short = argparse.Namespace(**{**vars(args), "output_tokens": args.profile_output_tokens})
    cfg = EngineConfig(model=args.model, device=args.device, dtype=args.dtype, block_size=args.block_size,
                       max_num_seqs_limit=args.max_num_seqs, max_batched_tokens_limit=args.max_batched_tokens,
                       gpu_memory_fraction=args.gpu_memory_fraction, cuda_graphs=not args.no_graphs,
                       async_scheduling=args.async_scheduling)
    live = LiveConfig(max_num_seqs=args.max_num_seqs, max_batched_tokens=args.max_batched_tokens,
                      chunk_size=min(args.chunk_size, args.max_batched_tokens))
    engine = LLMEngine(cfg, live)
    engine.add_request("w", prompts[0][:64], SamplingParams(max_tokens=4, ignore_eos=True))
    engine.run_until_done()
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(max_tokens=short.output_tokens, ignore_eos=True))
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        engine.run_until_done()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    ka = prof.key_averages()
    try:
        table = ka.table(sort_by="self_cuda_time_total", row_limit=40)
    except Exception:  # noqa: BLE001 - older/newer attribute names
        table = ka.table(sort_by="cuda_time_total", row_limit=40)
    with open(path, "w") as f:
        f.write(f"profile: {len(prompts)} requests x {short.output_tokens} output tokens, graphs={not args.no_graphs}, "
                f"fused={os.environ.get('BATCHDECK_FUSED', '1')}, wall {wall:.3f}s, {engine.iteration} iterations\n")
        f.write(table)
    return {"wall_s": wall, "iterations": engine.iteration, "table": path}


def run_hf(args, prompts) -> dict:
    out = {}
    model = hf_model(args.model)
    try:
        batches = args.hf_generate_batches or -(-len(prompts) // args.hf_batch)
        hg = run_hf_generate(model, prompts, args.output_tokens, args.hf_batch, batches)
        if hg["requests_run"] < len(prompts):
            hg["scaled"] = (f"ran {hg['requests_run']} of {len(prompts)} requests ({hg['batches_run']} static "
                            f"batches of {args.hf_batch}); tok/s of those batches")
        out["hf_generate"] = hg
        log(f"hf generate: {hg['tok_s']:.0f} tok/s")
    except Exception as exc:  # noqa: BLE001 - record and carry on
        out["hf_generate"] = {"error": repr(exc), "traceback": traceback.format_exc()[-2000:]}
        log(f"hf generate failed: {exc!r}")
    release_device_memory("cuda")
    try:
        n = args.hf_generate_batch_requests or len(prompts)
        hb = run_hf_generate_batch(model, prompts[:n], args.output_tokens)
        if "tok_s" in hb:
            if n < len(prompts):
                hb["scaled"] = f"ran the first {n} of {len(prompts)} requests"
            log(f"hf generate_batch: {hb['tok_s']:.0f} tok/s")
        out["hf_generate_batch"] = hb
    except Exception as exc:  # noqa: BLE001
        out["hf_generate_batch"] = {"error": repr(exc), "traceback": traceback.format_exc()[-2000:]}
        log(f"hf generate_batch failed: {exc!r}")
    return out


def child(phase: str, argv: list[str], env_extra: dict | None = None, timeout: float | None = None) -> dict:
    """Run one phase in a fresh process (a clean GPU for each: nothing held over between phases)."""
    return run_script(__file__, [*argv, "--phase", phase], timeout, env_extra)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="synthetic:qwen3-0.6b")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--min-prompt", type=int, default=100)
    ap.add_argument("--max-prompt", type=int, default=1024)
    ap.add_argument("--output-tokens", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-num-seqs", type=int, default=None, help="default: --requests (at most 256)")
    ap.add_argument("--max-batched-tokens", type=int, default=8192)
    ap.add_argument("--chunk-size", type=int, default=2048)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--gpu-memory-fraction", type=float, default=0.85)
    ap.add_argument("--no-graphs", action="store_true")
    ap.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True,
                    help="overlapped iterations in the headline runs (default on, as on CUDA)")
    ap.add_argument("--compare-async", action=argparse.BooleanOptionalAction, default=True,
                    help="also run batchdeck with the other --async-scheduling setting (timed and GPU-idle runs)")
    ap.add_argument("--hf-batch", type=int, default=64)
    ap.add_argument("--hf-generate-batches", type=int, default=None, help="default: all")
    ap.add_argument("--hf-generate-batch-requests", type=int, default=None, help="default: all")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--telemetry-check", action="store_true", help="also run batchdeck without records/profiling")
    ap.add_argument("--compare-unfused", action="store_true", help="also run batchdeck with BATCHDECK_FUSED=0")
    ap.add_argument("--profile", default=None, help="write a torch.profiler kernel table of a short run here")
    ap.add_argument("--profile-output-tokens", type=int, default=16)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test of the batchdeck runs (no ceilings, "
                    "no roofline, no transformers baselines)")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--out", default=None)
    ap.add_argument("--phase", choices=PHASES, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--phase-out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--no-telemetry", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--gpu-events", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--repeats", type=int, default=2, help="batchdeck timed runs (fresh process each)")
    args = ap.parse_args()
    if not 1 <= args.min_prompt <= args.max_prompt:
        ap.error(f"--min-prompt {args.min_prompt} --max-prompt {args.max_prompt}: need 1 <= min <= max")
    args.max_num_seqs = args.max_num_seqs or min(args.requests, 256)
    args.dtype = args.dtype or default_dtype(args.device)
    on_cuda = args.device.startswith("cuda")
    if not on_cuda:
        args.skip_hf = True
    name = args.model.split(":", 1)[1]
    assert args.model.startswith("synthetic:") and name in SYNTHETIC_SHAPES, "a synthetic:<name> model"
    cfg = synthetic_config(name)
    prompts = workload(args, cfg.vocab_size)

    if args.phase is not None:
        if args.phase == "batchdeck":
            res = run_batchdeck(args, prompts, telemetry=not args.no_telemetry, profile=args.gpu_events)
        elif args.phase == "hf":
            res = run_hf(args, prompts)
        else:
            res = run_profile(args, prompts, args.profile)
        with open(args.phase_out, "w") as f:
            json.dump(res, f, default=str)
        return

    base_argv = [a for a in argv_without("--out", "--profile")  # parent-only options that take a value
                 if a not in ("--async-scheduling", "--no-async-scheduling")]
    mode_flag = "--async-scheduling" if args.async_scheduling else "--no-async-scheduling"
    other_flag = "--no-async-scheduling" if args.async_scheduling else "--async-scheduling"
    result = {
        "benchmark": "gpu_offline", "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": command_line("benchmarks/gpu_offline.py"),
        "device": torch.cuda.get_device_name() if on_cuda else "cpu", "versions": versions(),
        "workload": {"model": args.model, "dtype": args.dtype, "requests": args.requests,
                     "prompt_len": f"uniform integer in [{args.min_prompt}, {args.max_prompt}] (random.Random({args.seed}))",
                     "prompt_tokens": "uniform over the vocabulary", "output_tokens": args.output_tokens,
                     "ignore_eos": True, "sampling": "greedy", "arrival": "all at once",
                     "total_prompt_tokens": sum(len(p) for p in prompts)},
        "batchdeck_config": {"max_num_seqs": args.max_num_seqs, "max_batched_tokens": args.max_batched_tokens,
                             "chunk_size": min(args.chunk_size, args.max_batched_tokens), "block_size": args.block_size,
                             "mixing": "stall-free", "batching": "continuous", "cuda_graphs": not args.no_graphs,
                             "async_scheduling": args.async_scheduling,
                             "attention_backend": "triton", "fused_kernels": os.environ.get("BATCHDECK_FUSED", "1") != "0",
                             "env": tuning_env()},
        "isolation": "each of batchdeck / transformers runs in its own process (clean GPU memory)",
    }
    log(f"device {result['device']}, torch {torch.__version__}, transformers {result['versions']['transformers']}")
    roof = {"roofline_tok_s": None}
    if on_cuda:
        result["ceilings"] = measure_ceilings()
        log(f"ceilings: copy {result['ceilings']['hbm_copy_GB_s']:.0f} GB/s, "
            f"matmul {result['ceilings']['bf16_matmul_TFLOP_s']:.0f} TFLOP/s")
        torch.cuda.empty_cache()

        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            meta_model = AutoModelForCausalLM.from_config(cfg)
        # Unique parameters (tied embeddings counted once); an untied input embedding is only gathered.
        weight_bytes = sum(p.numel() for p in meta_model.parameters()) * 2
        if not getattr(cfg, "tie_word_embeddings", False):
            weight_bytes -= meta_model.get_input_embeddings().weight.numel() * 2
        del meta_model
        roof = roofline(cfg, prompts, args.output_tokens, weight_bytes, result["ceilings"])
        result["roofline"] = roof
        log(f"roofline {roof['roofline_tok_s']:.0f} tok/s")
    result["roofline_tok_s"] = roof["roofline_tok_s"]

    def of_roofline(run: dict) -> float | None:
        return run["tok_s"] / roof["roofline_tok_s"] if "tok_s" in run and roof["roofline_tok_s"] else None

    def timed_runs(flag: str) -> tuple[dict, list]:
        runs = []
        for _ in range(max(1, args.repeats)):
            one = child("batchdeck", base_argv + [flag])
            runs.append(one)
            if "tok_s" in one:
                log(f"batchdeck {flag}: {one['tok_s']:.0f} tok/s ({one['seconds']:.2f}s, {one['iterations']} iterations)")
            else:
                log(f"batchdeck {flag} failed: {one}")
        ok = sorted((r for r in runs if "tok_s" in r), key=lambda r: r["tok_s"])
        return (ok[(len(ok) - 1) // 2] if ok else runs[0]), runs  # the median run (lower middle for an even count)

    def events_run(flag: str) -> dict:
        prof = child("batchdeck", base_argv + [flag, "--gpu-events"])
        if "tok_s" in prof:
            steady = prof.get("steady_decode_gpu_idle_fraction")
            log(f"batchdeck {flag} with per-iteration GPU events: {prof['tok_s']:.0f} tok/s, GPU idle "
                f"{prof.get('gpu_idle_fraction', 0):.1%}, in the steady decode phase "
                f"{'n/a' if steady is None else f'{steady:.1%}'}")
        return prof

    bd, runs = timed_runs(mode_flag)
    result["batchdeck"] = bd
    result["batchdeck_repeats_tok_s"] = [r.get("tok_s") for r in runs]
    result["roofline_fraction"] = of_roofline(bd)
    prof = events_run(mode_flag)
    result["batchdeck_breakdown_run"] = prof
    if args.compare_async:
        other, other_runs = timed_runs(other_flag)
        key = "batchdeck_" + ("sync" if args.async_scheduling else "async")
        result[key] = other
        result[key + "_repeats_tok_s"] = [r.get("tok_s") for r in other_runs]
        result[key + "_roofline_fraction"] = of_roofline(other)
        result[key + "_breakdown_run"] = events_run(other_flag)
        on, off = (bd, other) if args.async_scheduling else (other, bd)
        if "tok_s" in on and "tok_s" in off:
            result["async_scheduling_speedup"] = on["tok_s"] / off["tok_s"]
            log(f"async scheduling: {on['tok_s']:.0f} tok/s against {off['tok_s']:.0f} synchronous "
                f"({result['async_scheduling_speedup']:.3f}x)")
    if args.compare_unfused:
        un = child("batchdeck", base_argv + [mode_flag], {"BATCHDECK_FUSED": "0"})
        result["batchdeck_unfused"] = un
        if "tok_s" in un:
            log(f"batchdeck with stock HF modules (BATCHDECK_FUSED=0): {un['tok_s']:.0f} tok/s")
    if args.telemetry_check and "tok_s" in bd:
        bd2 = child("batchdeck", base_argv + [mode_flag, "--no-telemetry"])
        if "tok_s" in bd2:
            result["batchdeck_no_telemetry"] = {k: bd2[k] for k in ("tok_s", "seconds", "iterations")}
            result["telemetry_cost_fraction"] = 1 - bd["tok_s"] / bd2["tok_s"]
            log(f"batchdeck without telemetry records (null sink): {bd2['tok_s']:.0f} tok/s")
    if args.profile:
        result["profile"] = child("profile", base_argv + [mode_flag, "--profile", args.profile])

    result["speedup_vs_hf_generate"] = None
    result["speedup_vs_hf_generate_batch"] = None
    if not args.skip_hf:
        hf = child("hf", base_argv)
        result.update({k: v for k, v in hf.items() if k.startswith("hf_")})
        if "error" in hf:
            result["hf_error"] = hf["error"]
        if "tok_s" in bd:
            if "tok_s" in result.get("hf_generate", {}):
                result["speedup_vs_hf_generate"] = bd["tok_s"] / result["hf_generate"]["tok_s"]
            if "tok_s" in result.get("hf_generate_batch", {}):
                result["speedup_vs_hf_generate_batch"] = bd["tok_s"] / result["hf_generate_batch"]["tok_s"]
    summary = {k: result.get(k) for k in ("roofline_tok_s", "roofline_fraction", "speedup_vs_hf_generate",
                                          "speedup_vs_hf_generate_batch", "async_scheduling_speedup",
                                          "batchdeck_sync_roofline_fraction", "batchdeck_async_roofline_fraction")}
    summary["steady_decode_gpu_idle_fraction"] = prof.get("steady_decode_gpu_idle_fraction")
    summary["batchdeck_tok_s"] = bd.get("tok_s")
    print(json.dumps(summary, indent=1))
    write_json(args.out, result)


if __name__ == "__main__":
    main()
