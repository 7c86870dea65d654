"""What a CUDA graph's first replay costs against a later one, per captured bucket: the engine
replays each graph once at start-up (`CudaGraphRunner.replay_each`, timings in its
`stats.first_replays`) so that no iteration pays the first launch; this replays them all again and
reports both, synced per replay. Needs a CUDA GPU (graphs exist only there; no CPU mode).

    PYTHONPATH=. python benchmarks/gpu_graph_first_replay.py --out benchmarks/results/gpu_graph_first_replay_qwen3-0.6b.json
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_common import command_line, log, versions, write_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="synthetic:qwen3-0.6b")
    ap.add_argument("--replays", type=int, default=2, help="later replays of each graph after the first (default 2)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import torch

    from batchdeck.engine.config import resolve_configs
    from batchdeck.engine.llm_engine import LLMEngine

    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    engine = LLMEngine(*resolve_configs({"model": args.model, "device": "cuda"}))  # the settings table's CUDA defaults
    runner = engine.runner.graphs
    first = runner.stats.first_replays
    later = [runner.replay_each() for _ in range(args.replays)]
    rows = []
    for i, (kind, tokens, seconds) in enumerate(first):
        rows.append({"kind": kind, "tokens": tokens, "first_ms": seconds * 1e3,
                     "later_ms": [rep[i][2] * 1e3 for rep in later]})
        log(f"{kind:>6} {tokens:>5}: first {seconds * 1e3:7.2f} ms, later "
            + ", ".join(f"{rep[i][2] * 1e3:.2f}" for rep in later) + " ms")
    total_first = sum(r["first_ms"] for r in rows)
    total_later = sum(min(r["later_ms"]) for r in rows) if later else None
    log(f"{len(rows)} graphs: first replays {total_first:.1f} ms in all, later {total_later} ms")
    write_json(args.out, {"benchmark": "gpu_graph_first_replay", "command": command_line("benchmarks/gpu_graph_first_replay.py"),
                          "device": torch.cuda.get_device_name(), "versions": versions(), "model": args.model,
                          "graphs": rows, "first_replays_ms_total": total_first,
                          "later_replays_ms_total": total_later, "capture_seconds": runner.stats.capture_seconds})


if __name__ == "__main__":
    main()
