"""Start-up cost of the engine, by phase: what a short `batchdeck generate` job waits for.

    python benchmarks/gpu_startup.py --out benchmarks/results/gpu_startup_qwen3-0.6b.json
    python benchmarks/gpu_startup.py --device cpu --model synthetic:tiny      # smoke test

Phases (each import in a fresh interpreter; the rest in one process, in the order the engine runs them):
- imports: `import torch`, then transformers, then batchdeck's engine (cumulative, fresh processes);
- model build: `load_model` (synthetic weights are created on the target device in the target dtype);
- engine without CUDA graphs: KV pool allocation + runner set-up (`cuda_graphs=False`, model reused);
- engine with CUDA graphs: the same plus capturing every bucket (the difference is graph capture);
- first iteration: one request's prefill on the graphed engine;
- end to end: a `batchdeck generate` process serving one request, from exec to exit.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_common import command_line, log, versions, write_json  # noqa: E402

IMPORTS = {"torch": "import torch", "transformers": "import torch, transformers",
           "batchdeck_engine": "import torch, transformers, batchdeck.engine.llm_engine"}


def _seconds(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="synthetic:qwen3-0.6b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--num-blocks", type=int, default=None, help="default: from free memory (CUDA)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    baseline = _seconds([sys.executable, "-c", "pass"])
    imports = {name: _seconds([sys.executable, "-c", code]) - baseline for name, code in IMPORTS.items()}
    log(f"imports (cumulative, s): {imports}")

    import torch

    from batchdeck.engine.config import EngineConfig
    from batchdeck.engine.llm_engine import LLMEngine
    from batchdeck.engine.models import load_model
    from batchdeck.engine.request import SamplingParams

    cuda = args.device.startswith("cuda")
    dtype = "bfloat16" if cuda else "float32"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    phases: dict[str, float] = {}
    t0 = time.perf_counter()
    loaded = load_model(args.model, args.device, dtype)
    sync()
    phases["model_build"] = time.perf_counter() - t0
    for graphs in (False, True) if cuda else (False,):
        cfg = EngineConfig(model=args.model, device=args.device, dtype=dtype, num_blocks=args.num_blocks,
                           cuda_graphs=graphs)
        t0 = time.perf_counter()
        engine = LLMEngine(cfg, loaded=loaded)
        sync()
        phases["engine_with_graphs" if graphs else "engine_without_graphs"] = time.perf_counter() - t0
        if graphs or not cuda:
            engine.add_request("first", list(range(1, 129)), SamplingParams(max_tokens=1, ignore_eos=True))
            t0 = time.perf_counter()
            engine.step()
            sync()
            phases["first_iteration"] = time.perf_counter() - t0
            num_blocks = engine.blocks.num_blocks
        del engine
        if cuda:
            torch.cuda.empty_cache()
    if cuda:
        phases["graph_capture"] = phases["engine_with_graphs"] - phases["engine_without_graphs"]
    log(f"in-process phases (s): {phases}")

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "in.jsonl"), os.path.join(tmp, "out.jsonl")
        with open(src, "w") as f:
            f.write(json.dumps({"prompt": "hello", "max_tokens": 1}) + "\n")
        cmd = [sys.executable, "-m", "batchdeck", "generate", "--input", src, "--output", dst,
               "--model", args.model, "--device", args.device]
        if args.num_blocks:
            cmd += ["--num-blocks", str(args.num_blocks)]
        end_to_end = _seconds(cmd)
    log(f"batchdeck generate, one request, exec to exit: {end_to_end:.2f}s")
    to_first = sum(imports[k] for k in ("batchdeck_engine",)) + phases["model_build"] + \
        phases.get("engine_with_graphs", phases["engine_without_graphs"]) + phases["first_iteration"]
    write_json(args.out, {
        "benchmark": "gpu_startup", "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": command_line("benchmarks/gpu_startup.py"), "versions": versions(),
        "device": torch.cuda.get_device_name() if cuda else "cpu", "model": args.model, "dtype": dtype,
        "kv_blocks": num_blocks, "interpreter_start_s": baseline, "imports_cumulative_s": imports,
        "phases_s": phases, "estimated_to_first_iteration_s": to_first, "generate_one_request_wall_s": end_to_end,
    })


if __name__ == "__main__":
    main()
