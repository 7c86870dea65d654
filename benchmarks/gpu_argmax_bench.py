"""Greedy token choice on the GPU: torch's argmax over each row of the logits against the engine's
Triton argmax (engine/greedy_argmax.py `triton_argmax`: each row cut into slices maxed in parallel,
then the first slice holding the row's maximum; timed at every row count, though the engine keeps
torch's above 64 rows), at the decode row counts, inside CUDA graphs (as a decode graph
runs it).

    PYTHONPATH=. python benchmarks/gpu_argmax_bench.py --rows 1,8,16,64,256 --out benchmarks/results/gpu_argmax_h200.json

Logits bf16 [rows, vocab] (llama-3.1-8b's 128,256 and qwen3-0.6b's 151,936 entries); each timing is
one graph of `--calls` back-to-back calls on as many distinct logits tensors (so they are not all in
L2), replayed `--replays` times between CUDA events: us per call. Both results are checked equal first.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_common import command_line, graph_us_per_call, log, versions, write_json  # noqa: E402
from batchdeck.engine.greedy_argmax import argmax_splits, triton_argmax  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="1,2,4,8,16,32,64,128,256")
    ap.add_argument("--vocabs", default="128256,151936", help="comma-separated vocabulary sizes")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--replays", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")
    vocabs = [int(v) for v in args.vocabs.split(",")]
    if any(v < 1 for v in vocabs):
        ap.error(f"--vocabs {args.vocabs}: each must be a positive size")
    points = []
    for vocab in vocabs:
        for rows in (int(r) for r in args.rows.split(",")):
            xs = [torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16) for _ in range(args.calls)]
            if not all(torch.equal(triton_argmax(x), x.argmax(dim=-1)) for x in xs):
                raise SystemExit(f"the Triton argmax differs from torch's at rows={rows}, vocab={vocab}")
            torch_us = graph_us_per_call(lambda i: xs[i].argmax(dim=-1), len(xs), args.replays)
            ours_us = graph_us_per_call(lambda i: triton_argmax(xs[i]), len(xs), args.replays)
            points.append({"vocab": vocab, "rows": rows, "slices": argmax_splits(rows), "torch_argmax_us": torch_us,
                           "triton_argmax_us": ours_us})
            log(f"vocab {vocab} rows {rows:3d}: torch argmax {torch_us:6.2f} us, Triton {ours_us:6.2f} us")
            del xs
    write_json(args.out, {"benchmark": "gpu_argmax_bench", "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                          "command": command_line("benchmarks/gpu_argmax_bench.py"), "device": torch.cuda.get_device_name(),
                          "versions": versions(), "calls_per_graph": args.calls, "replays": args.replays,
                          "points": points})


if __name__ == "__main__":
    main()
