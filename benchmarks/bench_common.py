"""Helpers the GPU benchmark scripts share: logging, percentiles, versions, writing results.

Importing it stays light (no torch, transformers or engine at module level): a benchmark's spawned
helper processes (gpu_serve.py's HTTP clients) re-import their script and this module."""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time

from batchdeck.engine.service.metrics import percentile, quantiles  # noqa: F401 - shared with the scripts

# The accuracy scenarios' settings (gpu_sim_accuracy.py; also the start-time limits its engines capture
# graphs up to, SCENARIO_LIMITS), which the scripts that replay its scenarios share: replay_gc_pauses.py,
# sim_host_time.py, arrival_lateness.py, host_stalls.py.
SCENARIO_CONFIG = {"policy": "fcfs", "max_num_seqs": 64, "max_batched_tokens": 2048, "chunk_size": 512}


def limit_overrides(limits: dict) -> dict:
    """The start-time limits (what CUDA graphs are captured up to) at `limits`' max_num_seqs and
    max_batched_tokens."""
    return {"max_num_seqs_limit": limits["max_num_seqs"], "max_batched_tokens_limit": limits["max_batched_tokens"]}


SCENARIO_LIMITS = limit_overrides(SCENARIO_CONFIG)
RECORDED_STEADY_RATE_SCALE = 36.84  # the steady load of the saved H200 accuracy results (their steady_rate_scale)
DEFAULT_SIM_PROFILE = "h200-qwen3-0.6b"  # the shipped profile the scripts' simulated engines default to
# The engine's kernel-tuning variables: a result records those set, its command repeats them (never
# other BATCHDECK_* variables, which hold secrets such as BATCHDECK_API_KEY).
TUNING_ENV = ("BATCHDECK_ATTN_DECODE", "BATCHDECK_ATTN_DECODE_FEW", "BATCHDECK_ATTN_DECODE_SPLIT",
              "BATCHDECK_ATTN_PREFILL", "BATCHDECK_ATTN_MAX_SPLITS", "BATCHDECK_FUSED", "BATCHDECK_PDL")


def _as_scenario(preset, config: dict):
    """The preset without its timeline, under `config`, and without its KV pool size: the pool is the
    caller's (a profile's, through the overrides) or else the engine's own sizing."""
    engine = {k: v for k, v in preset.engine.items() if k != "num_blocks"}
    return dataclasses.replace(preset, timeline=[], config={**preset.config, **config}, engine=engine)


def steady_preset(rate_scale: float = 1.0, config: dict = SCENARIO_CONFIG):
    """The accuracy benchmark's steady scenario: quickstart's Poisson/gamma mix without its timeline,
    under `config`, its rates multiplied by `rate_scale`."""
    from batchdeck.presets.preset_driver import scaled_rates
    from batchdeck.presets.replay import as_preset

    return scaled_rates(_as_scenario(as_preset("quickstart"), config), rate_scale)


def scenario_presets(config: dict = SCENARIO_CONFIG, smoke: bool = False, azure_requests: int = 600) -> dict:
    """The accuracy benchmark's scenarios at their presets' own rates, timelines dropped, `config`
    throughout: steady (`steady_preset`), burst (fair-noisy-tenant) and azure (the conversation trace's
    first `azure_requests`, at real lengths; smoke: 40 of them at a quarter of their lengths)."""
    from batchdeck.presets.replay import as_preset

    burst, azure = as_preset("fair-noisy-tenant"), as_preset("azure-conversation")
    trace = dataclasses.replace(azure.workload[0], length_scale=0.25 if smoke else 1.0,
                                limit=40 if smoke else azure_requests)
    return {"steady": steady_preset(1.0, config), "burst": _as_scenario(burst, config),
            "azure": _as_scenario(dataclasses.replace(azure, workload=[trace]), config)}


def steady_load_scale(preset, sim_overrides: dict, duration_scale: float, load: float) -> tuple[float, dict]:
    """The factor on `preset`'s rates that offers `load` of the simulated engine's throughput bound, and
    that bound: the analytic section of a simulated run of the preset at its own rates."""
    from batchdeck.presets.replay import run_preset

    bound = run_preset(preset, overrides=sim_overrides, duration_scale=duration_scale).report()["analytic"][
        "throughput_bound"]
    offered = sum(s.rate for s in preset.workload if getattr(s, "rate", None))
    return load * bound["requests_per_s"] / offered, bound


def real_overrides(model: str, device: str, profile=None, **extra) -> dict:
    """Replay overrides for the real engine as the accuracy benchmark's real runs take them: the model,
    the device and its default dtype, SCENARIO_LIMITS and, given a profile, its KV pool (None: the
    engine sizes the pool from free memory); `extra` on top (other limits, async_scheduling)."""
    over = {"model": model, "device": device, "dtype": default_dtype(device), **SCENARIO_LIMITS, **extra}
    if profile is not None:
        over.update(num_blocks=profile.num_blocks, block_size=profile.block_size)
    return over


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def dist(values: list[float]) -> dict | None:
    """mean, p50, p90, p99 and max (the engine's own percentiles: numpy's, q in 0..100); None if empty."""
    if not values:
        return None
    return quantiles(values, (50, 90, 99), mean=True, maximum=True)


def versions() -> dict:
    import torch
    import transformers
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
            "triton": triton_version, "python": platform.python_version()}


def argv_without(*flags: str) -> list[str]:
    """sys.argv[1:] without each of `flags` (options that take a value) and the value after it."""
    argv = list(sys.argv[1:])
    for flag in flags:
        if flag in argv:
            i = argv.index(flag)
            del argv[i:i + 2]
    return argv


def tuning_env() -> dict[str, str]:
    """The TUNING_ENV variables this run has set."""
    return {k: os.environ[k] for k in TUNING_ENV if k in os.environ}


def command_line(script: str) -> str:
    """The command that reproduces this run (without --out), with the tuning variables it had set."""
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in tuning_env().items())
    return (f"{env} " if env else "") + f"PYTHONPATH=. python {script} " + " ".join(argv_without("--out"))


def write_json(path: str | None, result: dict) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)
    log(f"wrote {path}")


def run_script(script: str, argv: list[str], timeout: float | None = None, env: dict | None = None) -> dict:
    """Run `script argv --phase-out FILE` in a fresh process (a clean GPU for each configuration) and
    return the JSON object it wrote to FILE, or {"error": "exited with N" | "timed out after Ts"}."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
        path = tmp.name
    cmd = [sys.executable, os.path.abspath(script), *argv, "--phase-out", path]
    try:
        proc = subprocess.run(cmd, timeout=timeout, env=None if env is None else {**os.environ, **env})
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout}s"}
    if proc.returncode != 0:
        return {"error": f"exited with {proc.returncode}"}
    with open(path) as f:
        return json.load(f)


def add_async_scheduling_flag(ap: argparse.ArgumentParser) -> None:
    """`--async-scheduling/--no-async-scheduling` for scripts that build their EngineConfig directly
    (the settings table's per-device defaults apply only through the command line's resolver)."""
    ap.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                    help="overlapped iterations (default: the device's, from the settings table: on for cuda)")


def release_device_memory(device: str) -> None:
    """Collect what a finished engine left (its KV pool, graphs) and hand the cached device memory back,
    before the next engine allocates its own (call after dropping the references)."""
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def default_dtype(device: str) -> str:
    """The engine's dtype default on `device` ("cpu", "cuda", "cuda:N"): the settings table's (bfloat16 on
    cuda, float32 on cpu), for scripts that build their EngineConfig or load a model directly."""
    from batchdeck.engine.settings import defaults_for

    return defaults_for(device)["dtype"]


def async_scheduling_for(args: argparse.Namespace) -> bool:
    from batchdeck.engine.settings import defaults_for

    return defaults_for(args.device)["async_scheduling"] if args.async_scheduling is None else args.async_scheduling


class GCWatch:
    """Garbage collections while it is entered: how many per generation, the seconds they took and the
    longest pause (a full collection over a large heap stalls the engine's thread for that long)."""

    def __init__(self, long_pause_s: float = 0.01):
        self.collections = [0, 0, 0]
        self.seconds = 0.0
        self.longest_s = 0.0
        self.long_pause_s = long_pause_s
        self.long_pauses: list[tuple[float, float, int]] = []  # (seconds since entered, pause, generation)
        self._entered = self._t0 = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            pause = time.perf_counter() - self._t0
            self.collections[info["generation"]] += 1
            self.seconds += pause
            self.longest_s = max(self.longest_s, pause)
            if pause >= self.long_pause_s:
                self.long_pauses.append((self._t0 - self._entered, pause, info["generation"]))

    def __enter__(self) -> "GCWatch":
        self._entered = time.perf_counter()
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self)

    def summary(self) -> dict:
        return {"gc_collections_by_generation": list(self.collections), "gc_seconds": self.seconds,
                "gc_longest_pause_s": self.longest_s,
                "gc_long_pauses": [{"at_s": t, "pause_s": p, "generation": g} for t, p, g in self.long_pauses]}


def replay_gpu_ms(graph, replays: int) -> float:
    """GPU milliseconds per replay of a captured CUDA graph: CUDA events around `replays` back-to-back
    replays (the caller has warmed it; the events wait for the device, not the host)."""
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / replays


def graph_us_per_call(fn, calls: int, replays: int, stream=None) -> float:
    """us per call of `calls` back-to-back fn(i) captured in one CUDA graph (on `stream`, a side stream,
    made if None: no per-capture sync, collection and cache flush as `torch.cuda.graph` does), replayed
    `replays` times between CUDA events after one warm replay; fn(0) runs once before the capture."""
    import torch

    stream = stream if stream is not None else torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        fn(0)  # built and warm, on the capture stream, before the capture
        graph.capture_begin()
        try:
            for i in range(calls):
                fn(i)
        finally:
            graph.capture_end()
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    us_per_call = replay_gpu_ms(graph, replays) * 1e3 / calls
    del graph
    return us_per_call
