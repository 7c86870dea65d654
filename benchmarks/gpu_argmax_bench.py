"""Greedy token choice on the GPU: torch's argmax over each row of the logits against a two-stage
argmax (each row's vocabulary cut into 16 slices maxed in parallel, then the first slice holding the
row's maximum), at the decode row counts, inside CUDA graphs (as a decode graph runs it).

    PYTHONPATH=. python benchmarks/gpu_argmax_bench.py --rows 1,8,16,64,256 --out benchmarks/results/gpu_argmax_h200.json

The engine keeps torch's argmax: on an H200 the two stages were slower at every row count up to 64
(64 rows of llama-3.1-8b's 128,256 logits: 50.4 against 37.6 us) and equal at 256.
Logits bf16 [rows, vocab] (llama-3.1-8b's 128,256 and qwen3-0.6b's 151,936 entries); each timing is
one graph of `--calls` back-to-back calls on as many distinct logits tensors, replayed `--replays`
times between CUDA events: us per call. Both results are checked equal first.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_common import command_line, graph_us_per_call, log, versions, write_json  # noqa: E402

SLICES = 16


def two_stage_argmax(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(dim=-1) of [rows, V] (V a multiple of SLICES): the first maximal element lies in the
    first slice whose maximum is the row's, so the index is torch's."""
    rows, vocab = x.shape
    width = vocab // SLICES
    slice_max, slice_idx = x.reshape(rows, SLICES, width).max(dim=-1)
    best = slice_max.argmax(dim=-1, keepdim=True)
    return (slice_idx.gather(-1, best) + best * width).squeeze(-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="1,2,4,8,16,32,64,128,256")
    ap.add_argument("--vocabs", default="128256,151936", help=f"comma-separated, each a multiple of {SLICES}")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--replays", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")
    vocabs = [int(v) for v in args.vocabs.split(",")]
    if any(v % SLICES for v in vocabs):
        ap.error(f"--vocabs {args.vocabs}: each must be a multiple of {SLICES}")
    points = []
    for vocab in vocabs:
        for rows in (int(r) for r in args.rows.split(",")):
            xs = [torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16) for _ in range(args.calls)]
            if not all(torch.equal(two_stage_argmax(x), x.argmax(dim=-1)) for x in xs):
                raise SystemExit(f"the two-stage argmax differs from torch's at rows={rows}, vocab={vocab}")
            torch_us = graph_us_per_call(lambda i: xs[i].argmax(dim=-1), len(xs), args.replays)
            ours_us = graph_us_per_call(lambda i: two_stage_argmax(xs[i]), len(xs), args.replays)
            points.append({"vocab": vocab, "rows": rows, "torch_argmax_us": torch_us, "two_stage_argmax_us": ours_us})
            log(f"vocab {vocab} rows {rows:3d}: torch argmax {torch_us:6.2f} us, two stages {ours_us:6.2f} us")
            del xs
    write_json(args.out, {"benchmark": "gpu_argmax_bench", "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                          "command": command_line("benchmarks/gpu_argmax_bench.py"), "device": torch.cuda.get_device_name(),
                          "versions": versions(), "calls_per_graph": args.calls, "replays": args.replays,
                          "points": points})


if __name__ == "__main__":
    main()
