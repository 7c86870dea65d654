"""Start-up cost of the engine, by phase: what a short `batchdeck generate` job waits for.

    python benchmarks/gpu_startup.py --out benchmarks/results/gpu_startup_qwen3-0.6b.json
    python benchmarks/gpu_startup.py --device cpu --model synthetic:tiny --out /tmp/s.json   # smoke test

Phases (imports in fresh interpreters, best of `--repeats`; the rest in this process, in the order the
engine runs them, with a fresh Triton cache directory so kernel compilation is counted as a user's
first run pays it):
- imports: torch, transformers (lazy top level), transformers.modeling_utils (what any HF model class
  needs), then batchdeck's engine plus the model's modeling module (cumulative), and the slowest
  modules of the last one from `python -X importtime`; again with a primed private bytecode cache
  (PYTHONPYCACHEPREFIX; the priming run may write it whatever PYTHONDONTWRITEBYTECODE says), and how
  many imported source modules have no bytecode file (an install made with --no-compile, used under
  PYTHONDONTWRITEBYTECODE, compiles those at every start: `benchmarks/clean_env.py` writes them);
- CUDA context: the first allocation on the device;
- model build: `load_model` (synthetic weights created on the device in the target dtype);
- KV pool: an engine without CUDA graphs (pool allocation + runner set-up, model reused);
- graph capture, cold: an engine with CUDA graphs minus the pool phase, Triton compiling every kernel;
- graph capture, warm: the same again in this process (kernels compiled): capture alone;
- first iteration: one request's prefill on the graphed engine;
- end to end: `batchdeck generate` serving one one-token request, from exec to the first result line
  written (= first iteration done) and to exit; once with an empty Triton cache, once with the cache
  the first run left (what every later start sees).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_common import command_line, default_dtype, log, release_device_memory, versions, write_json  # noqa: E402

MODEL_MODULE = {name: f"transformers.models.{name}.modeling_{name}" for name in ("qwen3", "llama", "qwen2", "mistral")}


def _seconds(cmd: list[str], env: dict | None = None) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
    return time.perf_counter() - t0


def import_phases(model_module: str, repeats: int,
                  env: dict | None = None) -> tuple[float, dict[str, float], list[dict]]:
    chain = ["import torch", "import torch, transformers", "import torch, transformers, transformers.modeling_utils",
             f"import torch, transformers, transformers.modeling_utils, batchdeck.engine.llm_engine, {model_module}"]
    names = ["torch", "transformers", "transformers_modeling_utils", "batchdeck_engine_and_model_module"]
    py = sys.executable
    baseline = min(_seconds([py, "-c", "pass"], env) for _ in range(repeats))
    out = {n: min(_seconds([py, "-c", c], env) for _ in range(repeats)) - baseline for n, c in zip(names, chain)}
    proc = subprocess.run([py, "-X", "importtime", "-c", chain[-1]], capture_output=True, text=True, check=True,
                          env=env)
    rows = []
    for line in proc.stderr.splitlines():
        m = re.match(r"import time:\s*(\d+) \|\s*(\d+) \|( *)(\S+)", line)
        if m:
            rows.append({"module": m.group(4), "self_s": int(m.group(1)) / 1e6, "cumulative_s": int(m.group(2)) / 1e6,
                         "depth": len(m.group(3)) // 2})
    top = sorted((r for r in rows if r["depth"] <= 6), key=lambda r: -r["cumulative_s"])[:25]
    return baseline, out, top


def bytecode_missing(model_module: str) -> dict[str, int]:
    """After the import runs above: of the source modules the import chain loads, how many still have no
    bytecode file (each of those is compiled again at every start)."""
    probe = (f"import sys, torch, transformers.modeling_utils, batchdeck.engine.llm_engine, {model_module}\n"
             "from batchdeck.engine.import_bytecode import without_bytecode\n"
             "src = [n for n, m in list(sys.modules.items())\n"
             "       if (getattr(getattr(m, '__spec__', None), 'origin', None) or '').endswith('.py')]\n"
             "print(len(src), len(without_bytecode(tuple(src))))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    return {"source_modules": int(out[0]), "without_bytecode_file": int(out[1])}


def generate_run(model: str, device: str, num_blocks: int | None, triton_cache: str, extra: list[str]) -> dict:
    """One `batchdeck generate` process: seconds from exec to its first result line, and to exit."""
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "in.jsonl"), os.path.join(tmp, "out.jsonl")
        with open(src, "w") as f:
            f.write(json.dumps({"prompt": "hello", "max_tokens": 1}) + "\n")
        cmd = [sys.executable, "-m", "batchdeck", "generate", "--input", src, "--output", dst,
               "--model", model, "--device", device, *extra]
        if num_blocks:
            cmd += ["--num-blocks", str(num_blocks)]
        env = dict(os.environ, TRITON_CACHE_DIR=triton_cache)
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        first = None
        while proc.poll() is None:
            if first is None and os.path.exists(dst) and os.path.getsize(dst) > 0:
                first = time.perf_counter() - t0
            time.sleep(0.002)
        total = time.perf_counter() - t0
        err = proc.stderr.read()
        if proc.returncode != 0:
            raise RuntimeError(f"generate failed ({proc.returncode}): {err[-2000:]}")
        if first is None:  # finished between two polls
            first = total
    return {"to_first_result_s": first, "to_exit_s": total, "command": " ".join(cmd)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="synthetic:qwen3-0.6b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--num-blocks", type=int, default=None, help="default: from free memory (CUDA)")
    ap.add_argument("--repeats", type=int, default=2, help="fresh interpreters per import measurement (best kept)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    tmp_root = tempfile.mkdtemp(prefix="batchdeck_startup_")
    os.environ["TRITON_CACHE_DIR"] = os.path.join(tmp_root, "triton_in_process")  # before triton is imported

    from batchdeck.engine.models import SYNTHETIC_SHAPES  # noqa: F401 - cheap after torch (config only below)

    model_type = SYNTHETIC_SHAPES[args.model.split(":", 1)[1]][0] if args.model.startswith("synthetic:") else "qwen3"
    model_module = MODEL_MODULE.get(model_type, MODEL_MODULE["qwen3"])
    baseline, imports, import_top = import_phases(model_module, args.repeats)
    log(f"imports (cumulative, s): { {k: round(v, 2) for k, v in imports.items()} }")
    # The same with a private, primed bytecode cache: tells whether this install recompiles sources
    # on every start (a read-only site-packages without .pyc files).
    pyc_env = dict(os.environ, PYTHONPYCACHEPREFIX=os.path.join(tmp_root, "pycache"))
    pyc_env.pop("PYTHONDONTWRITEBYTECODE", None)  # the priming run must write the cache
    subprocess.run([sys.executable, "-c", f"import torch, transformers.modeling_utils, batchdeck.engine.llm_engine, "
                    f"{model_module}"], check=True, env=pyc_env)  # primes the private cache
    _, imports_pyc, _ = import_phases(model_module, 1, pyc_env)
    log(f"imports, primed PYTHONPYCACHEPREFIX (cumulative, s): { {k: round(v, 2) for k, v in imports_pyc.items()} }")

    import torch
    import transformers
    import transformers.modeling_utils  # noqa: F401 - imported by load_model: counted with the imports, not the build

    from batchdeck.engine.config import EngineConfig
    from batchdeck.engine.llm_engine import LLMEngine
    from batchdeck.engine.models import load_model
    from batchdeck.engine.request import SamplingParams

    cuda = args.device.startswith("cuda")
    dtype = default_dtype(args.device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    phases: dict[str, float] = {}
    t0 = time.perf_counter()
    torch.empty(1, device=args.device)
    sync()
    phases["device_context"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    loaded = load_model(args.model, args.device, dtype)
    sync()
    phases["model_build"] = time.perf_counter() - t0
    graph_info: dict = {}
    num_blocks = None
    for label, graphs in (("kv_pool", False), ("engine_graphs_cold", True), ("engine_graphs_warm", True)):
        if graphs and not cuda:
            continue
        cfg = EngineConfig(model=args.model, device=args.device, dtype=dtype, num_blocks=args.num_blocks,
                           cuda_graphs=graphs)
        t0 = time.perf_counter()
        engine = LLMEngine(cfg, loaded=loaded)
        sync()
        phases[label] = time.perf_counter() - t0
        num_blocks = engine.blocks.num_blocks
        runner = engine.runner.graphs
        if runner is not None and label == "engine_graphs_cold":
            kinds: dict[str, int] = {}
            for kind, _, _ in runner.stats.captured:
                kinds[kind] = kinds.get(kind, 0) + 1
            graph_info = {"graphs": kinds, "decode_buckets": runner.decode_sizes, "mixed_buckets": runner.token_sizes,
                          "verify_buckets": runner.verify_sizes, "capture_seconds_cold": runner.stats.capture_seconds,
                          "per_bucket_host_s": runner.stats.per_bucket}
        if runner is not None and label == "engine_graphs_warm":
            graph_info["capture_seconds_warm"] = runner.stats.capture_seconds
        if label == "engine_graphs_cold" or not cuda:
            engine.add_request("first", list(range(1, 129)), SamplingParams(max_tokens=1, ignore_eos=True))
            t0 = time.perf_counter()
            engine.step()
            sync()
            phases["first_iteration"] = time.perf_counter() - t0
        del engine, runner
        release_device_memory(args.device)
    if cuda:
        phases["graph_capture_cold"] = phases["engine_graphs_cold"] - phases["kv_pool"]
        phases["graph_capture_warm"] = phases["engine_graphs_warm"] - phases["kv_pool"]
    log(f"in-process phases (s): { {k: round(v, 3) for k, v in phases.items()} }")
    log(f"graphs: {graph_info.get('graphs')}")

    e2e_cache = os.path.join(tmp_root, "triton_generate")
    end_to_end = {"cold_triton_cache": generate_run(args.model, args.device, args.num_blocks, e2e_cache, []),
                  "warm_triton_cache": generate_run(args.model, args.device, args.num_blocks, e2e_cache, [])}
    for k, v in end_to_end.items():
        log(f"batchdeck generate ({k}): first result at {v['to_first_result_s']:.2f}s, exit at {v['to_exit_s']:.2f}s")
    to_first = imports["batchdeck_engine_and_model_module"] + phases["device_context"] + phases["model_build"] + \
        phases.get("engine_graphs_cold", phases["kv_pool"]) + phases["first_iteration"]
    write_json(args.out, {
        "benchmark": "gpu_startup", "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": command_line("benchmarks/gpu_startup.py"), "versions": versions(),
        "device": torch.cuda.get_device_name() if cuda else "cpu", "model": args.model, "dtype": dtype,
        "kv_blocks": num_blocks, "interpreter_start_s": baseline, "imports_cumulative_s": imports,
        "imports_cumulative_primed_pycache_prefix_s": imports_pyc,
        "slowest_imports": import_top, "phases_s": phases, "graph_capture": graph_info,
        "sum_of_phases_to_first_iteration_s": to_first, "generate_one_request": end_to_end,
        "bytecode_cache_writable": {m.__name__: os.access(os.path.dirname(m.__file__), os.W_OK)
                                    for m in (torch, transformers)},
        "python_dont_write_bytecode": os.environ.get("PYTHONDONTWRITEBYTECODE"),
        "modules_without_bytecode": bytecode_missing(model_module),
    })


if __name__ == "__main__":
    main()
