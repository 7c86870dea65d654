"""Small-M linear microbenchmark: cuBLAS against every candidate config of the Triton small-M kernel
(engine/small_m_linear.py) and the config its launch rule picks, for each per-layer linear of the
models at the decode row counts.

    PYTHONPATH=. python benchmarks/gpu_gemv_bench.py --out benchmarks/results/gpu_gemv_h200.json
    PYTHONPATH=. python benchmarks/gpu_gemv_bench.py --smoke   # CPU: the interpreter, tiny shapes, float32

Linears per layer (bf16): qkv [(H + 2 KVH) D, hidden], o_proj [hidden, H D], gate|up [2 I, hidden] (the
kernel applies SiLU-mul in its epilogue; cuBLAS is timed with the SiLU-mul kernel after it, what fusion
level 2 runs, and without), down_proj [hidden, I]; models from `--models` (synthetic shapes: qwen3-0.6b,
llama-3.1-8b), rows M from `--rows`.

Timing: one CUDA graph of `--calls` back-to-back calls (how the engine's decode graph runs them), each
on the next of enough copies of the weight that they overflow L2 four times (every call streams its
weight from HBM, as in a decode step), replayed `--replays` times between CUDA events after one warm
replay: us per call = elapsed / (replays x calls); achieved GB/s = (weight + x + out bytes) / time.
Every config's output is also checked against F.linear once (relative error, recorded). Kernels are
compiled first by `--jobs` worker processes into Triton's cache (one task per config), so the timed
process only loads them. Configs that do not build (shared memory) are recorded with their error.

The JSON names the GPU; per (model, linear, M): cuBLAS, every config, the best one, the rule's pick;
per (model, M): the four linears summed (one layer) for cuBLAS (+ SiLU-mul), the rule and the best.
`--smoke` runs the same code on the CPU through Triton's interpreter (synthetic:tiny's shapes, float32,
every `--smoke-stride`-th config and the rule's pick, each checked against F.linear; host timings).
It needs Triton installed (`pip install triton`: the CPU torch wheel has none), and Triton 3.6's
interpreter needs NumPy before 2.4 (it ran with 2.2.6 and failed with 2.4.6: "only 0-dimensional
arrays can be converted to Python scalars").
"""
from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import sys
import time

if "--smoke" in sys.argv:  # before the kernel is defined: the interpreter runs it on the CPU
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton  # noqa: F401
    except ImportError:
        sys.exit("gpu_gemv_bench.py --smoke runs the kernels in Triton's interpreter: install Triton first "
                 "(pip install triton; the CPU torch wheel does not include it)")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_common import command_line, graph_us_per_call, log, versions, write_json  # noqa: E402
from batchdeck.engine.models import synthetic_config  # noqa: E402
from batchdeck.engine.small_m_linear import counters, num_sms, small_m_linear  # noqa: E402
from batchdeck.engine.small_m_rule import MAX_ROWS, SmallMConfig, candidate_configs, pick_config  # noqa: E402


def layer_linears(model: str, lm_head: bool = False) -> list[tuple[str, int, int, bool]]:
    """(name, N, K, SiLU-mul) of one decoder layer of a synthetic model; N of gate|up is I (the weight has 2 I rows).
    lm_head: also the model's lm_head [vocab, hidden] (once per step, so left out of a layer's sums)."""
    cfg = synthetic_config(model)
    h, kvh = cfg.num_attention_heads, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // h
    hid, inter = cfg.hidden_size, cfg.intermediate_size
    out = [("qkv", (h + 2 * kvh) * d, hid, False), ("o_proj", hid, h * d, False),
           ("gate_up", inter, hid, True), ("down_proj", hid, inter, False)]
    return out + [("lm_head", cfg.vocab_size, hid, False)] if lm_head else out


def cublas(x, w, silu: bool, with_silu: bool):
    from batchdeck.engine.triton_fused import silu_mul

    y = F.linear(x, w)
    return silu_mul(y) if silu and with_silu else y


def reference(x, w, silu: bool):
    y = F.linear(x.float(), w.float())
    if silu:
        i = w.shape[0] // 2
        y = (F.silu(y[:, :i].to(x.dtype).float()).to(x.dtype).float() * y[:, i:].to(x.dtype).float())
    return y


def all_configs(shapes, rows) -> list[SmallMConfig]:
    seen: dict[SmallMConfig, None] = {}
    for _, n, k, silu in shapes:
        for m in rows:
            for c in candidate_configs(m, n, k, silu=silu):
                seen.setdefault(c, None)
    return list(seen)


def compile_task(args) -> str:
    """Worker: build the config's kernels for every (shape, M) it fits (each specialization once)."""
    config, shapes, rows, dtype_name = args
    dtype = getattr(torch, dtype_name)
    counters("cuda")
    errors = 0
    for _, n, k, silu in shapes:
        w = torch.empty(2 * n if silu else n, k, device="cuda", dtype=dtype).normal_(0, k ** -0.5)
        for m in rows:
            if config not in candidate_configs(m, n, k, silu=silu):
                continue
            try:
                small_m_linear(torch.randn(m, k, device="cuda", dtype=dtype), w, silu_mul=silu, config=config)
            except Exception:  # noqa: BLE001 - recorded by the timed run
                errors += 1
        del w
    torch.cuda.synchronize()
    return f"{config.label()}: {errors} errors"


def precompile(configs, shapes, rows, dtype_name: str, jobs: int) -> float:
    t0 = time.perf_counter()
    tasks = [(c, shapes, rows, dtype_name) for c in configs]
    try:
        if jobs <= 1:
            for t in tasks:
                compile_task(t)
        else:
            with mp.get_context("spawn").Pool(jobs) as pool:
                for _ in pool.imap_unordered(compile_task, tasks):
                    pass
    except Exception as exc:  # noqa: BLE001 - only a head start: the timed run compiles what is missing
        log(f"precompile failed ({exc!r:.200}); kernels compile in the timed run")
    return time.perf_counter() - t0


def time_host(fn, calls: int, replays: int, stream) -> float:
    """The smoke run's stand-in for graph_us_per_call on the CPU: host us per call (no meaning but the code path)."""
    fn(0)
    t0 = time.perf_counter()
    for _ in range(replays):
        for i in range(calls):
            fn(i)
    return (time.perf_counter() - t0) * 1e6 / (replays * calls)


def rel_err(got, want) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def bench(args, shapes_by_model, device: str) -> dict:
    """Every (model, linear, M) point; on the CPU (the smoke run) the same code with host timing."""
    cuda = device == "cuda"
    dtype = getattr(torch, args.dtype)
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2 ** 20) if cuda else 0
    sms = num_sms(torch.device(device))
    counters(device)
    stream = torch.cuda.Stream() if cuda else None
    timer = graph_us_per_call if cuda else time_host
    results, layer_sums = [], []
    for model, shapes in shapes_by_model.items():
        per_m: dict[int, dict[str, float]] = {}
        for name, n, k, silu in shapes:
            rows_w = 2 * n if silu else n
            w_bytes = rows_w * k * dtype.itemsize
            copies = max(2, min(args.calls, math.ceil(4 * l2 / w_bytes)))
            ws = [torch.empty(rows_w, k, device=device, dtype=dtype).normal_(0, k ** -0.5) for _ in range(copies)]
            for m in args.rows:
                x = torch.randn(m, k, device=device, dtype=dtype)
                io_bytes = (m * k + m * n) * dtype.itemsize
                gbs = lambda us: (w_bytes + io_bytes) / (us * 1e-6) / 1e9  # noqa: E731
                want = reference(x, ws[0], silu)
                point = {"model": model, "linear": name, "M": m, "N": n, "K": k, "silu_mul": silu,
                         "weight_bytes": w_bytes, "weight_copies": copies}
                us = timer(lambda i: cublas(x, ws[i % copies], silu, False), args.calls, args.replays, stream)
                point["cublas_us"], point["cublas_GB_s"] = us, gbs(us)
                if silu:
                    point["cublas_plus_silu_mul_us"] = timer(
                        lambda i: cublas(x, ws[i % copies], silu, True), args.calls, args.replays, stream)
                base = point.get("cublas_plus_silu_mul_us", us)
                configs = []
                pick = pick_config(m, n, k, sms, silu=silu)
                for c in candidate_configs(m, n, k, silu=silu)[:: 1 if cuda else args.smoke_stride]:
                    row = {"config": c.label(), "mode": c.mode, "block_n": c.block_n, "block_k": c.block_k,
                           "split_k": c.split_k, "num_warps": c.num_warps, "num_stages": c.num_stages}
                    try:
                        row["rel_err"] = rel_err(small_m_linear(x, ws[0], silu_mul=silu, config=c), want)
                        row["us"] = timer(lambda i: small_m_linear(x, ws[i % copies], silu_mul=silu, config=c),
                                               args.calls, args.replays, stream)
                        row["GB_s"] = gbs(row["us"])
                        row["speedup_vs_cublas"] = base / row["us"]
                    except Exception as exc:  # noqa: BLE001 - a config may not build (shared memory)
                        row["error"] = repr(exc)[:300]
                    configs.append(row)
                if pick is not None and all(r["config"] != pick.label() for r in configs):
                    configs.append({"config": pick.label(), "us": timer(
                        lambda i: small_m_linear(x, ws[i % copies], silu_mul=silu, config=pick), args.calls,
                        args.replays, stream), "rel_err": rel_err(small_m_linear(x, ws[0], silu_mul=silu, config=pick),
                                                                  want)})
                    configs[-1]["GB_s"] = gbs(configs[-1]["us"])
                ok = [r for r in configs if "us" in r and r["rel_err"] < 2e-2]
                if not cuda and any(r.get("error") or r["rel_err"] > 1e-5 for r in configs):
                    raise SystemExit(f"smoke: {model} {name} M={m}: " + "; ".join(
                        f"{r['config']}: {r.get('error') or r['rel_err']}" for r in configs))
                point["configs"] = configs
                point["best"] = min(ok, key=lambda r: r["us"]) if ok else None
                point["rule_pick"] = pick.label() if pick else None
                picked = next((r for r in configs if r["config"] == point["rule_pick"]), None)
                point["rule_us"] = picked.get("us") if picked else None
                results.append(point)
                best = point["best"]
                log(f"{model} {name:9s} M={m:2d}: cuBLAS {us:7.2f} us ({gbs(us):5.0f} GB/s)"
                    + (f" +silu {point['cublas_plus_silu_mul_us']:.2f}" if silu else "")
                    + (f" | best {best['us']:7.2f} us ({best['GB_s']:5.0f} GB/s) {best['config']}" if best else " | none ran")
                    + (f" | rule {point['rule_us']:7.2f} us {point['rule_pick']}" if point["rule_us"] else ""))
                if name == "lm_head":
                    continue
                sums = per_m.setdefault(m, {"cublas_us": 0.0, "rule_us": 0.0, "best_us": 0.0})
                sums["cublas_us"] += base
                sums["rule_us"] += point["rule_us"] or float("nan")
                sums["best_us"] += best["us"] if best else float("nan")
            del ws
            torch.cuda.empty_cache()
        for m, s in sorted(per_m.items()):
            layer_sums.append({"model": model, "M": m, **s})
            log(f"{model} M={m:2d}: one layer's linears: cuBLAS(+SiLU-mul) {s['cublas_us']:.1f} us, "
                f"rule {s['rule_us']:.1f} us, best {s['best_us']:.1f} us")
    return {"points": results, "layer_sums": layer_sums}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="qwen3-0.6b,llama-3.1-8b", help="comma-separated synthetic model names")
    ap.add_argument("--rows", default="1,2,4,8,16", help=f"comma-separated M (1..{MAX_ROWS})")
    ap.add_argument("--lm-head", action="store_true", help="also time each model's lm_head (not in the layer sums)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--calls", type=int, default=50, help="calls per CUDA graph")
    ap.add_argument("--replays", type=int, default=5, help="timed replays of each graph")
    ap.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1), help="compile worker processes")
    ap.add_argument("--smoke", action="store_true", help="CPU: Triton's interpreter, tiny shapes, no timing")
    ap.add_argument("--smoke-stride", type=int, default=5, help="smoke: every n-th candidate config")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    args.rows = [int(r) for r in args.rows.split(",")]
    if any(r < 1 or r > MAX_ROWS for r in args.rows):
        ap.error(f"--rows {args.rows}: each must be in 1..{MAX_ROWS}")
    models = args.models.split(",")
    shapes_by_model = {}
    for name in models:
        try:
            shapes_by_model[name] = layer_linears(name, args.lm_head)
        except Exception as exc:  # noqa: BLE001 - an unknown name: the models module names the allowed ones
            ap.error(f"--models {name!r}: {exc}")
    if args.smoke:  # the same code path on shapes a CPU interpreter runs in seconds
        shapes_by_model = {"tiny": layer_linears("tiny")}
    result = {"benchmark": "gpu_gemv_bench", "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "command": command_line("benchmarks/gpu_gemv_bench.py"), "versions": versions(),
              "dtype": args.dtype, "rows": args.rows, "calls_per_graph": args.calls, "replays": args.replays,
              "shapes": {m: [dict(zip(("linear", "N", "K", "silu_mul"), s)) for s in sh]
                         for m, sh in shapes_by_model.items()}}
    if args.smoke:
        result["device"] = "cpu (Triton interpreter; host timings of the smoke run mean nothing)"
        args.dtype, args.calls, args.replays = "float32", 2, 1
        result.update(dtype="float32", calls_per_graph=2, replays=1)
        result.update(bench(args, shapes_by_model, "cpu"))
    else:
        if not torch.cuda.is_available():
            ap.error("needs a CUDA GPU (--smoke runs the kernels on the CPU through Triton's interpreter)")
        result["device"] = torch.cuda.get_device_name()
        result["sms"] = num_sms(torch.device("cuda"))
        configs = all_configs([s for sh in shapes_by_model.values() for s in sh], args.rows)
        secs = precompile(configs, [s for sh in shapes_by_model.values() for s in sh], args.rows, args.dtype,
                          args.jobs)
        result["compile_seconds"] = secs
        log(f"{len(configs)} configs compiled in {secs:.1f}s ({args.jobs} jobs)")
        result.update(bench(args, shapes_by_model, "cuda"))
    write_json(args.out, result)


if __name__ == "__main__":
    main()
