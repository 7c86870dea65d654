"""What the speculative verify buckets cost every CUDA engine at start: graphs captured, capture
seconds and GPU memory held after start, with spec_k_limit 0 (no verify buckets) against the default.

    PYTHONPATH=. python benchmarks/gpu_graph_capture_cost.py --out benchmarks/results/gpu_graph_capture_cost.json

Each setting runs in its own process (synthetic weights, bfloat16, num_blocks fixed so the KV pool
is the same size in both).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_common import argv_without, command_line, log, run_script, versions, write_json  # noqa: E402


def measure(args) -> dict:
    import torch

    from batchdeck.engine.config import EngineConfig
    from batchdeck.engine.llm_engine import LLMEngine

    cfg = EngineConfig(model=args.model, device="cuda", dtype="bfloat16", num_blocks=args.num_blocks,
                       spec_k_limit=args.phase_limit)
    engine = LLMEngine(cfg)
    stats = engine.runner.graphs.stats
    kinds: dict[str, int] = {}
    for kind, _t, _r in stats.captured:
        kinds[kind] = kinds.get(kind, 0) + 1
    res = {"spec_k_limit": args.phase_limit, "graphs": kinds, "capture_seconds": stats.capture_seconds,
           "memory_allocated_gib": torch.cuda.memory_allocated() / 2**30,
           "memory_reserved_gib": torch.cuda.memory_reserved() / 2**30, "device": torch.cuda.get_device_name()}
    log(json.dumps(res))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="synthetic:qwen3-0.6b")
    ap.add_argument("--num-blocks", type=int, default=4096)
    ap.add_argument("--limits", default="0,8")
    ap.add_argument("--out", default=None)
    ap.add_argument("--phase-limit", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--phase-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase_limit is not None:
        with open(args.phase_out, "w") as f:
            json.dump(measure(args), f)
        return
    result = {"benchmark": "gpu_graph_capture_cost", "command": command_line("benchmarks/gpu_graph_capture_cost.py"),
              "versions": versions(), "model": args.model, "num_blocks": args.num_blocks, "runs": []}
    raw = argv_without("--out")
    for limit in [int(x) for x in args.limits.split(",")]:
        run = run_script(__file__, [*raw, "--phase-limit", str(limit)])
        result["runs"].append({"spec_k_limit": limit, **run} if "error" in run else run)
    write_json(args.out, result)


if __name__ == "__main__":
    main()
