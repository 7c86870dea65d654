"""Per-device default sizing: `batchdeck generate` with no sizing flags against the tuned command.

    PYTHONPATH=. python benchmarks/default_sizing.py --out benchmarks/results/default_sizing_qwen3-0.6b.json
    PYTHONPATH=. python benchmarks/default_sizing.py --model synthetic:tiny --device cpu --requests 8 \
        --output-tokens 8 --min-prompt 16 --max-prompt 64                 # CPU smoke test

Workload (a) of the offline benchmark: `--requests` prompts of uniform length in [min, max] with
random token ids (random.Random(seed)), `--output-tokens` each (greedy, ignore_eos), all at t = 0.
Each configuration runs in a fresh process (a clean GPU) through the same flag resolution as
`batchdeck generate` (engine.service.flags.engine_configs on the parsed command line):

- `defaults`: no sizing flags (the table's defaults for the device);
- `tuned`: `--max-num-seqs 256 --max-batched-tokens 8192 --chunk-size 2048` (the tuned command).

Throughput = output tokens / (first arrival -> last finish), after one untimed warm-up run of a
few requests. The JSON names the GPU, the resolved settings of each run and `defaults / tuned`.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_common import command_line, log, run_script, versions, write_json  # noqa: E402

TUNED = ["--max-num-seqs", "256", "--max-batched-tokens", "8192", "--chunk-size", "2048"]


def run_one(args) -> dict:
    import torch

    from batchdeck.cli import build_parser
    from batchdeck.engine.llm_engine import LLMEngine
    from batchdeck.engine.request import SamplingParams
    from batchdeck.engine.service.flags import engine_configs

    argv = ["generate", "--input", "-", "--output", "-", "--model", args.model]
    if args.device:
        argv += ["--device", args.device]
    if args.phase == "tuned":
        argv += TUNED
    cfg, live = engine_configs(build_parser().parse_args(argv))
    t0 = time.perf_counter()
    engine = LLMEngine(cfg, live)
    start_s = time.perf_counter() - t0
    vocab = engine.loaded.config.vocab_size
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(args.min_prompt, args.max_prompt))]
               for _ in range(args.requests)]
    sampling = SamplingParams(max_tokens=args.output_tokens, ignore_eos=True)

    def serve(batch: list[list[int]], tag: str) -> float:
        for i, p in enumerate(batch):
            engine.add_request(f"{tag}-{i}", p, sampling)
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        while engine.has_unfinished:
            engine.step()
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    serve(prompts[: min(8, len(prompts))], "warm")
    elapsed = serve(prompts, "run")
    return {"phase": args.phase, "device": cfg.device,
            "gpu": torch.cuda.get_device_name() if cfg.device.startswith("cuda") else None,
            "engine_config": {k: getattr(cfg, k) for k in ("dtype", "num_blocks", "max_num_seqs_limit",
                                                         "max_batched_tokens_limit", "cuda_graphs")},
            "num_blocks": engine.blocks.num_blocks, "live_config": live.to_dict(), "start_s": start_s,
            "elapsed_s": elapsed, "output_tokens": args.requests * args.output_tokens,
            "output_tok_s": args.requests * args.output_tokens / elapsed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="synthetic:qwen3-0.6b")
    ap.add_argument("--device", default=None, help="default: cuda when present (as generate)")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--output-tokens", type=int, default=256)
    ap.add_argument("--min-prompt", type=int, default=100)
    ap.add_argument("--max-prompt", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--out", default=None)
    ap.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--phase-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        result = run_one(args)
        with open(args.phase_out, "w") as f:
            json.dump(result, f, default=str)
        return
    base = [a for a in sys.argv[1:]]
    if "--out" in base:
        i = base.index("--out")
        del base[i:i + 2]
    runs = {}
    for phase in ("defaults", "tuned"):
        log(f"{phase} …")
        runs[phase] = run_script(__file__, base + ["--phase", phase], timeout=args.timeout)
        log(f"{phase}: {runs[phase].get('output_tok_s', runs[phase].get('error'))}")
    ratio = None
    if "output_tok_s" in runs["defaults"] and "output_tok_s" in runs["tuned"]:
        ratio = runs["defaults"]["output_tok_s"] / runs["tuned"]["output_tok_s"]
    result = {"benchmark": "default_sizing", "command": command_line("benchmarks/default_sizing.py"),
              "versions": versions(), "model": args.model, "requests": args.requests,
              "output_tokens": args.output_tokens, "runs": runs, "defaults_over_tuned": ratio}
    print(json.dumps({k: result[k] for k in ("model", "defaults_over_tuned")}))
    write_json(args.out, result)


if __name__ == "__main__":
    main()
