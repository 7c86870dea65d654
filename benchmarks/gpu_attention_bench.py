"""Triton paged-attention kernel sweep: achieved HBM bandwidth of the decode mode and throughput of
the prefill (tiles) mode on benchmark-shaped inputs, for several tile configurations.

    PYTHONPATH=. python benchmarks/gpu_attention_bench.py --out benchmarks/results/gpu_attention.json
    PYTHONPATH=. python benchmarks/gpu_attention_bench.py --shape llama-3.1-8b --rows 64 --splits 1,2,4 \
        --prefill-offline --out benchmarks/results/gpu_attention_llama-3.1-8b.json

Decode: one layer of `--shape` (qwen3-0.6b: 16 heads, 8 KV heads; llama-3.1-8b: 32 and 8; head dim
128), `--rows` rows, context lengths uniform in [228, 1280] (prompts of 100..1024 plus 128..256
outputs; `--equal-context`: all at their mean), block size 16, bf16. Bytes = every row's K and V read
once (+ q and out), over the median time (triton.testing.do_bench, whose time includes the launches'
host work when it exceeds the kernel's: on an H200, llama-3.1-8b's 64-row decode took 71 us launched
and 61 us replayed; `--graph`: do_bench_cudagraph, the kernels replayed from a CUDA graph as the
engine runs them). `--splits` also times each config with the keys cut into that many
split-KV slices (the backend's split path, whatever its rule would pick for the row count).
Unsplit decode launches start the rows longest first, as the engine's do (`--no-row-order`: in row
order); each swept tile stands in for every decode tile of the backend.
Prefill: 8 rows of 1024 new tokens, 4 of them after 512 tokens of context; with `--prefill-offline`
instead the chunks of the offline benchmark's first iteration (prompts of 100..1024 tokens, no
context, 8,192 tokens in all). FLOPs count the causal half only.
Prints the best decode config as `BEST_DECODE=BLOCK_N,warps,stages` (and prefill likewise).
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time

import torch
from triton.testing import do_bench, do_bench_cudagraph

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_common import command_line, versions, write_json  # noqa: E402

from batchdeck.engine.attention.decode_splits import MAX_DECODE_SPLITS  # noqa: E402
from batchdeck.engine.attention.triton_backend import TritonBackend  # noqa: E402
from batchdeck.engine.model_runner import longest_first  # noqa: E402

SHAPES = {"qwen3-0.6b": (16, 8), "llama-3.1-8b": (32, 8)}  # (query heads, KV heads), head dim 128


def make_pool(lens, kvh, d, bs, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    nblocks = [-(-n // bs) for n in lens]
    total = sum(nblocks)
    perm = torch.randperm(total, device="cuda", generator=gen).to(torch.int32)
    width = max(nblocks)
    bt = torch.zeros(len(lens), width, dtype=torch.int32, device="cuda")
    at = 0
    for i, n in enumerate(nblocks):
        bt[i, :n] = perm[at:at + n]
        at += n
    k = torch.randn(total, bs, kvh, d, device="cuda", dtype=dtype, generator=gen)
    v = torch.randn(total, bs, kvh, d, device="cuda", dtype=dtype, generator=gen)
    return k, v, bt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-0.6b")
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--splits", default="1", help="comma-separated split-KV slice counts to time (1: no split)")
    ap.add_argument("--equal-context", action="store_true",
                    help="every decode row at the mean context of the default spread (the kernel without imbalance)")
    ap.add_argument("--graph", action="store_true",
                    help="time decode launches replayed from a CUDA graph (as the engine runs them), not launched")
    ap.add_argument("--decode-tiles", default=None,
                    help="semicolon-separated BLOCK_N,warps,stages decode tiles to time (default: a sweep of 14)")
    ap.add_argument("--skip-prefill", action="store_true", help="time the decode launches only")
    ap.add_argument("--no-row-order", action="store_true",
                    help="start the unsplit decode programs in row order instead of longest row first (the engine's)")
    ap.add_argument("--prefill-offline", action="store_true",
                    help="prefill rows: the offline benchmark's first 8,192-token iteration (prompts 100..1024)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    rng = random.Random(0)
    h, kvh = SHAPES[args.shape]
    d, bs, dtype = 128, 16, torch.bfloat16
    splits_list = [int(x) for x in args.splits.split(",")]
    if any(n < 1 or n & (n - 1) or n > MAX_DECODE_SPLITS for n in splits_list):
        ap.error(f"--splits {args.splits}: each must be a power of two in 1..{MAX_DECODE_SPLITS} (what the "
                 "backend's split rule can pick)")
    results = {"benchmark": "gpu_attention_bench", "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
               "command": command_line("benchmarks/gpu_attention_bench.py"), "device": torch.cuda.get_device_name(),
               "versions": versions(), "shape": {"name": args.shape, "heads": h, "kv_heads": kvh, "head_dim": d, "rows": args.rows},
               "decode_contexts": "equal (the spread's mean)" if args.equal_context else "uniform in [228, 1280]",
               "decode_timing": "CUDA graph replays (do_bench_cudagraph)" if args.graph else "launches (do_bench)",
               "decode_row_order": "row order" if args.no_row_order else "longest first",
               "decode": [], "prefill": []}

    # -- decode -------------------------------------------------------------------------------
    lens = [rng.randint(100, 1024) + rng.randint(128, 256) for _ in range(args.rows)]
    if args.equal_context:
        lens = [round(sum(lens) / len(lens))] * len(lens)
    decode_tiles = ([tuple(int(v) for v in x.split(",")) for x in args.decode_tiles.split(";") if x]
                    if args.decode_tiles else
                    [(32, 4, 2), (64, 4, 2), (64, 4, 3), (64, 4, 4), (128, 4, 2), (128, 8, 2), (128, 8, 3),
                     (64, 2, 3), (32, 2, 4), (64, 2, 2), (64, 2, 4), (32, 2, 3), (128, 2, 3), (128, 4, 3)])
    bench = do_bench_cudagraph if args.graph else (
        lambda fn, return_mode: do_bench(fn, warmup=25, rep=100, return_mode=return_mode))
    k, v, bt = make_pool(lens, kvh, d, bs, dtype)
    r = len(lens)
    q = torch.randn(r, h, d, device="cuda", dtype=dtype)
    out = torch.empty_like(q)
    qsl = torch.arange(r + 1, dtype=torch.int32, device="cuda")
    seq = torch.tensor(lens, dtype=torch.int32, device="cuda")
    order = None if args.no_row_order else torch.tensor(longest_first(lens), dtype=torch.int32, device="cuda")
    kv_bytes = sum(lens) * kvh * d * 2 * q.element_size() + 2 * q.numel() * q.element_size()
    be = TritonBackend()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for splits in splits_list:
        # The split rule aims at about two programs per SM: price it at the SM count that yields `splits`.
        be.num_sms = sms if splits == 1 else splits * r * kvh // 2
        be.max_splits = max(1, splits)
        for cfg in decode_tiles:
            be.decode_cfg = be.split_cfg = be.few_waves_cfg = cfg
            try:
                be.attend(q, k, v, out, bt, qsl, seq, d ** -0.5, None, True, order)  # compile outside any capture
                torch.cuda.synchronize()
                ms = bench(lambda: be.attend(q, k, v, out, bt, qsl, seq, d ** -0.5, None, True, order),
                           return_mode="median")
            except Exception as exc:  # noqa: BLE001 - a config may not fit shared memory
                results["decode"].append({"cfg": cfg, "splits": splits, "error": repr(exc)[:300]})
                continue
            results["decode"].append({"cfg": cfg, "splits": splits, "ms": ms, "GB_s": kv_bytes / ms / 1e6})
            print(f"decode cfg {cfg} splits {splits}: {ms * 1e3:.1f} us, {kv_bytes / ms / 1e6:.0f} GB/s", flush=True)
    be.num_sms, be.max_splits = sms, TritonBackend().max_splits

    # -- prefill tiles: 8 rows of 1024 new tokens (4 with 512 tokens of prior context) ---------
    prefill_cfgs = [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 4, 2), (128, 64, 8, 2), (128, 32, 4, 2), (64, 32, 4, 2),
                    (128, 128, 8, 2), (128, 64, 8, 3), (128, 128, 8, 3), (256, 64, 8, 3), (64, 128, 4, 3),
                    (32, 64, 4, 3), (128, 32, 4, 3), (128, 32, 4, 4), (256, 32, 8, 3), (256, 64, 8, 4)]
    if args.skip_prefill:
        prefill_cfgs = []
    plens = [1024] * 8
    ctxs = [0, 512] * 4
    if args.prefill_offline:
        prng = random.Random(0)
        plens = []
        while sum(plens) < 8192:
            plens.append(min(prng.randint(100, 1024), 8192 - sum(plens)))
        ctxs = [0] * len(plens)
    seqs = [c + n for c, n in zip(ctxs, plens)]
    k, v, bt = make_pool(seqs, kvh, d, bs, dtype, seed=1)
    t = sum(plens)
    q = torch.randn(t, h, d, device="cuda", dtype=dtype)
    out = torch.empty_like(q)
    cu = [0]
    for n in plens:
        cu.append(cu[-1] + n)
    qsl = torch.tensor(cu, dtype=torch.int32, device="cuda")
    seq = torch.tensor(seqs, dtype=torch.int32, device="cuda")
    flops = sum(4 * h * d * (n * c + n * (n + 1) / 2) for c, n in zip(ctxs, plens))
    for cfg in prefill_cfgs:
        be.prefill_cfg = cfg
        try:
            ms = do_bench(lambda: be.attend(q, k, v, out, bt, qsl, seq, d ** -0.5, None, False), warmup=25, rep=100,
                          return_mode="median")
        except Exception as exc:  # noqa: BLE001
            results["prefill"].append({"cfg": cfg, "error": repr(exc)[:300]})
            continue
        results["prefill"].append({"cfg": cfg, "ms": ms, "TFLOP_s": flops / ms / 1e9})
        print(f"prefill cfg {cfg}: {ms * 1e3:.1f} us, {flops / ms / 1e9:.1f} TFLOP/s", flush=True)

    results["prefill_rows"] = {"new_tokens": plens, "context": ctxs}
    ok_d = [x for x in results["decode"] if "ms" in x]
    ok_p = [x for x in results["prefill"] if "ms" in x]
    if ok_d:
        best = min(ok_d, key=lambda x: x["ms"])
        results["best_decode"] = best["cfg"]
        results["best_decode_splits"] = best["splits"]
        print("BEST_DECODE=" + ",".join(map(str, best["cfg"])) + f" (splits {best['splits']})")
    if ok_p:
        best = min(ok_p, key=lambda x: x["ms"])
        results["best_prefill"] = best["cfg"]
        print("BEST_PREFILL=" + ",".join(map(str, best["cfg"])))
    write_json(args.out, results)


if __name__ == "__main__":
    main()
