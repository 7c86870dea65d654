"""Does the in-process console slow the engine it watches? Workload (a) headless and under the console.

    PYTHONPATH=. python benchmarks/console_overhead.py --out benchmarks/results/console_overhead_qwen3-0.6b.json
    PYTHONPATH=. python benchmarks/console_overhead.py --model synthetic:tiny --device cpu --requests 8 \\
        --min-prompt 16 --max-prompt 64 --output-tokens 16 --repeats 1 --out /tmp/console_overhead_smoke.json

Workload (a) of benchmarks/gpu_offline.py: `--requests` prompts with lengths uniform in [100, 1024]
(random.Random(seed), token ids uniform over the vocabulary), `--output-tokens` each, greedy,
ignore_eos, all submitted at t=0; synthetic:qwen3-0.6b in bf16 on CUDA (float32 on CPU).

Three modes, each in a fresh process, alternated `--repeats` times (headless, console, console-process,
headless, ...; `--modes` picks some):
- headless: the engine as `batchdeck console` builds it for the UI (an `AsyncEngine` in its worker
  thread, telemetry published on a `Bus`), driven from the asyncio loop with no UI at all;
- console: the same engine behind an `InProcessClient` (bus subscription, GPU monitor thread at 1 Hz)
  under the real `ConsoleApp`, repainting at the rate `batchdeck console` uses in-process
  (console.cli.INPROCESS_HZ unless --refresh-hz) on a 180x50 screen. The app runs under Textual's
  test harness with a driver that is *not* headless: every frame is composed and turned into
  terminal output (escape sequences), which is written to nowhere, so the measured cost is the UI's
  whole cost short of the terminal emulator.
- console-process: what `batchdeck console` runs by default: the same engine and the same timed drive in
  a child process (console/engine_process.py), the same ConsoleApp in this one, behind an
  `EngineProcessClient` (telemetry batched over a pipe every 50 ms).

Both time the same thing: from submitting the requests to the last one finishing (after 8 short
warm-up requests that compile/capture what the first iterations need). Output tok/s per run, the
median per mode, and console/headless. The JSON names the GPU (or "cpu").
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_common import argv_without, command_line, default_dtype, log, run_script, write_json  # noqa: E402

MODES = ("headless", "console", "console-process")
SCREEN = (180, 50)


def workload(args, vocab: int) -> list[list[int]]:
    rng = random.Random(args.seed)
    lens = [rng.randint(args.min_prompt, args.max_prompt) for _ in range(args.requests)]
    return [[rng.randrange(vocab) for _ in range(n)] for n in lens]


def build_engine(args):
    """The LLMEngine of workload (a) (gpu_offline's sizing), its telemetry on a Bus; and the AsyncEngine."""
    from batchdeck.engine.config import EngineConfig, LiveConfig
    from batchdeck.engine.llm_engine import LLMEngine
    from batchdeck.engine.service.async_engine import AsyncEngine
    from batchdeck.engine.service.bus import Bus

    cuda = args.device.startswith("cuda")
    cfg = EngineConfig(model=args.model, device=args.device, dtype=default_dtype(args.device),
                       block_size=args.block_size, num_blocks=None if cuda else args.cpu_blocks,
                       max_num_seqs_limit=args.max_num_seqs, max_batched_tokens_limit=args.max_batched_tokens,
                       gpu_memory_fraction=args.gpu_memory_fraction, cuda_graphs=cuda and not args.no_graphs)
    live = LiveConfig(max_num_seqs=args.max_num_seqs, max_batched_tokens=args.max_batched_tokens,
                      chunk_size=min(args.chunk_size, args.max_batched_tokens))
    bus = Bus()
    llm = LLMEngine(cfg, live, sink=bus)
    return AsyncEngine(llm), bus


async def drive(engine, prompts: list[list[int]], output_tokens: int) -> dict:
    """Warm up, then submit every request at once and wait for all of them; the timed part."""
    from batchdeck.engine.request import SamplingParams

    async def run(prefix: str, batch: list[list[int]], max_tokens: int) -> list:
        streams = await asyncio.gather(*(engine.add_request(f"{prefix}{i}", p, SamplingParams(
            max_tokens=max_tokens, ignore_eos=True)) for i, p in enumerate(batch)))
        return await asyncio.gather(*(s.collect() for s in streams))

    await run("warm", [p[:50 + 30 * i] for i, p in enumerate(prompts[:8])], 8)
    llm = engine.engine
    it0 = llm.iteration
    if llm.device.type == "cuda":
        import torch

        torch.cuda.synchronize()
    t0 = time.perf_counter()
    outs = await run("r", prompts, output_tokens)
    if llm.device.type == "cuda":
        import torch

        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    tokens = sum(len(o) for o in outs)
    return {"tok_s": tokens / wall, "seconds": wall, "output_tokens": tokens, "iterations": llm.iteration - it0,
            "ms_per_iteration": 1e3 * wall / max(1, llm.iteration - it0)}


def run_headless(args, prompts) -> dict:
    engine, _bus = build_engine(args)

    async def main() -> dict:
        await engine.start()
        try:
            return await drive(engine, prompts, args.output_tokens)
        finally:
            await engine.stop()

    return asyncio.run(main())


def run_console(args, prompts) -> dict:
    from batchdeck.console.app import ConsoleApp
    from batchdeck.console.cli import INPROCESS_HZ
    from batchdeck.console.inprocess_client import InProcessClient

    DiscardingTerminal = discarding_terminal()
    engine, bus = build_engine(args)
    hz = args.refresh_hz or INPROCESS_HZ
    app = ConsoleApp(InProcessClient(engine, bus), refresh_hz=hz)
    app.driver_class = DiscardingTerminal

    async def main() -> dict:
        async with app.run_test(headless=False, size=SCREEN):
            deadline = time.monotonic() + 600
            while not engine.running:  # the app starts the client (and the engine) on mount
                if time.monotonic() > deadline:
                    raise RuntimeError("the console did not start the engine")
                await asyncio.sleep(0.01)
            paints0, t0 = app.paints, time.perf_counter()
            res = await drive(engine, prompts, args.output_tokens)
            res["paints_per_s"] = (app.paints - paints0) / (time.perf_counter() - t0)
            res["refresh_hz"] = hz
            res["terminal_bytes_written"] = DiscardingTerminal.written
            res["telemetry_dropped"] = app.client.dropped
            await app.shutdown()
        return res

    return asyncio.run(main())


def process_builder(args, prompts, result_path: str):
    """In the engine's child process: the benchmark's engine behind an InProcessClient (as the console's
    child builds it), and one driver that runs the timed drive and writes its result to `result_path`."""
    from batchdeck.console.inprocess_client import InProcessClient

    engine, bus = build_engine(args)

    async def timed() -> None:
        res = await drive(engine, prompts, args.output_tokens)
        with open(result_path + ".tmp", "w") as f:
            json.dump(res, f)
        os.replace(result_path + ".tmp", result_path)

    return InProcessClient(engine, bus), [timed], None


def run_console_process(args, prompts) -> dict:
    import functools

    from batchdeck.console.app import ConsoleApp
    from batchdeck.console.engine_process import EngineProcessClient, EngineSpec

    DiscardingTerminal = discarding_terminal()
    result_path = args.phase_out + ".child"
    spec = EngineSpec(builder=functools.partial(process_builder, args, prompts, result_path), announce=False)
    client = EngineProcessClient(spec)
    hz = args.refresh_hz or 10.0  # what `batchdeck console` uses with the engine in a child process
    app = ConsoleApp(client, refresh_hz=hz)
    app.driver_class = DiscardingTerminal

    async def main() -> dict:
        async with app.run_test(headless=False, size=SCREEN):
            t0 = time.perf_counter()
            deadline = time.monotonic() + args.timeout
            while not os.path.exists(result_path):
                if time.monotonic() > deadline or client.state != "connected":
                    raise RuntimeError(f"the engine process did not finish the drive ({client.state})")
                await asyncio.sleep(0.05)
            with open(result_path) as f:
                res = json.load(f)
            res["paints_per_s"] = app.paints / (time.perf_counter() - t0)  # over the whole run, warm-up included
            res["refresh_hz"] = hz
            res["terminal_bytes_written"] = DiscardingTerminal.written
            res["telemetry_dropped"] = client.dropped
            await app.shutdown()
        return res

    return asyncio.run(main())


def discarding_terminal():
    from textual.drivers.headless_driver import HeadlessDriver

    class DiscardingTerminal(HeadlessDriver):
        """Textual renders every frame to terminal output for a non-headless driver; this one discards it."""

        written = 0

        @property
        def is_headless(self) -> bool:
            return False

        def write(self, data: str) -> None:
            DiscardingTerminal.written += len(data)

    return DiscardingTerminal


RUNNERS = {"headless": run_headless, "console": run_console, "console-process": run_console_process}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="synthetic:qwen3-0.6b")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
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
    ap.add_argument("--cpu-blocks", type=int, default=4096, help="KV blocks on CPU")
    ap.add_argument("--no-graphs", action="store_true")
    ap.add_argument("--refresh-hz", type=float, default=None, help="console repaints/s (default: the console's)")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {', '.join(MODES)}")
    ap.add_argument("--repeats", type=int, default=2, help="runs per mode, alternated, each in a fresh process")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per run")
    ap.add_argument("--out", default=None)
    ap.add_argument("--phase", choices=MODES, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--phase-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.max_num_seqs = args.max_num_seqs or min(args.requests, 256)
    from batchdeck.engine.models import SYNTHETIC_SHAPES, synthetic_config

    name = args.model.split(":", 1)[1]
    assert args.model.startswith("synthetic:") and name in SYNTHETIC_SHAPES, "a synthetic:<name> model"
    prompts = workload(args, synthetic_config(name).vocab_size)

    if args.phase is not None:
        res = RUNNERS[args.phase](args, prompts)
        with open(args.phase_out, "w") as f:
            json.dump(res, f, default=str)
        return

    from batchdeck.console.cli import INPROCESS_HZ

    cuda = args.device.startswith("cuda")
    result = {
        "benchmark": "console_overhead", "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": command_line("benchmarks/console_overhead.py"),
        "device": torch.cuda.get_device_name() if cuda else "cpu", "cpu_count": os.cpu_count(),
        "versions": {"torch": torch.__version__, "textual": _version("textual"), "python": sys.version.split()[0]},
        "workload": {"model": args.model, "dtype": default_dtype(args.device), "requests": args.requests,
                     "prompt_len": f"uniform integer in [{args.min_prompt}, {args.max_prompt}] (random.Random({args.seed}))",
                     "output_tokens": args.output_tokens, "ignore_eos": True, "sampling": "greedy",
                     "arrival": "all at once"},
        "console": {"refresh_hz": args.refresh_hz or INPROCESS_HZ, "screen": f"{SCREEN[0]}x{SCREEN[1]}",
                    "driver": "every frame rendered to terminal output, written to nowhere"},
        "runs": {m: [] for m in MODES},
    }
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or "headless" not in modes:
        ap.error(f"--modes {args.modes!r}: give headless and any of {', '.join(MODES[1:])}")
    result["runs"] = {m: [] for m in modes}
    base = argv_without("--out")
    for _ in range(max(1, args.repeats)):
        for mode in modes:
            one = run_script(__file__, [*base, "--phase", mode], args.timeout)
            result["runs"][mode].append(one)
            if "tok_s" in one:
                log(f"{mode}: {one['tok_s']:.1f} tok/s ({one['seconds']:.2f} s, {one['iterations']} iterations"
                    + (f", {one['paints_per_s']:.1f} paints/s" if "paints_per_s" in one else "") + ")")
            else:
                log(f"{mode} failed: {one}")
    medians = {}
    for mode in modes:
        ok = [r["tok_s"] for r in result["runs"][mode] if "tok_s" in r]
        medians[mode] = statistics.median(ok) if ok else None
    result["tok_s_median"] = medians
    keys = []
    for mode, key in (("console", "console"), ("console-process", "console_process")):
        if medians.get("headless") and medians.get(mode):
            result[f"{key}_over_headless"] = medians[mode] / medians["headless"]
            result[f"{key}_cost_percent"] = 100 * (1 - medians[mode] / medians["headless"])
            keys += [f"{key}_over_headless", f"{key}_cost_percent"]
            log(f"{mode}/headless = {result[f'{key}_over_headless']:.3f} (cost {result[f'{key}_cost_percent']:.1f}%)")
    print(json.dumps({k: result[k] for k in ("device", "tok_s_median") if k in result}
                     | {k: result.get(k) for k in keys}))
    write_json(args.out, result)


def _version(package: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:
        return None


if __name__ == "__main__":
    main()
