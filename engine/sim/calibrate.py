"""`batchdeck calibrate`: time a designed grid of iteration shapes on the real fast path and fit the
cost model (engine/sim/cost_model.py) into a profile (engine/sim/profile.py).

The engine is built as `batchdeck` runs it (CUDA graphs captured, fused kernels, the KV pool sized
from free memory). Each shape is a constructed `StepPlan` (rows of (context, new tokens), blocks
allocated in the engine's pool) run through `engine.runner.execute`, timed from the host after the
sampled ids come back, the median of `repeats` runs after a warm-up. Then a short real workload runs
through `LLMEngine.step` and the host work around the executor (scheduling, bookkeeping, telemetry)
is fitted per iteration and per row and added. Every fifth shape is held out of a first fit to
report the fit's error on shapes it did not see; the shipped coefficients are fitted on all shapes.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from batchdeck.engine.config import EngineConfig, LiveConfig
from batchdeck.engine.llm_engine import LLMEngine
from batchdeck.engine.request import Request, SamplingParams
from batchdeck.engine.sim.cost_model import CostModel, IterationShape, fit, relative_errors
from batchdeck.engine.sim.profile import SimProfile
from batchdeck.engine.step_plan import ScheduledChunk, StepPlan

Rows = list[tuple[int, int]]  # (context, new tokens) per row


def design_grid(max_rows: int, max_tokens: int, max_context: int, pool_tokens: int, quick: bool = False) -> list[Rows]:
    """Decode batches (rows x context), prefill chunks (size x context, one or several rows) and mixed
    iterations (a decode batch plus a chunk), each within the limits and the pool."""
    rows_set = [r for r in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if r <= max_rows]
    ctx_set = [c for c in (64, 256, 1024, 2048, 4096, 8192) if c < max_context]
    chunk_set = [n for n in (16, 64, 128, 256, 512, 1024, 2048, 4096, 8192) if n <= max_tokens]
    if quick:
        rows_set, ctx_set, chunk_set = rows_set[::2][:4], ctx_set[:3], chunk_set[::2][:4]
    grid: list[Rows] = []
    for r in rows_set:
        for c in ctx_set:
            grid.append([(c, 1)] * r)
    for n in chunk_set:
        for c in (0, *ctx_set[::2]):
            if c + n < max_context:
                grid.append([(c, n)])
        k = 4
        if k * n <= max_tokens:
            grid.append([(0, n)] * k)
    for r in rows_set[2::2]:
        for n in chunk_set[1::2]:
            c = ctx_set[len(ctx_set) // 2]
            if r + n <= max_tokens and r < max_rows:
                grid.append([(c, 1)] * r + [(0, n)])
    return [g for g in grid if sum(c + n for c, n in g) + 16 * len(g) <= pool_tokens]


@dataclass
class Timing:
    rows: Rows
    seconds: float


def time_shape(engine: LLMEngine, rows: Rows, repeats: int, sync: Callable[[], None]) -> float:
    """Median seconds of `engine.runner.execute` over a plan of `rows`."""
    vocab = engine.loaded.config.vocab_size
    rng = random.Random(len(rows) * 1_000_003 + sum(c * 7 + n for c, n in rows))
    plan = StepPlan()
    made = []
    for i, (ctx, n) in enumerate(rows):
        rid = f"cal-{i}"
        req = Request(rid, [rng.randrange(3, vocab - 1) for _ in range(ctx + n)], SamplingParams(max_tokens=1))
        req.num_computed_tokens = ctx
        if not engine.blocks.grow(rid, ctx + n):
            raise RuntimeError(f"calibration shape does not fit the pool: {len(rows)} rows")
        made.append(rid)
        plan.chunks.append(ScheduledChunk(req, ctx, n, samples=True, is_decode=n == 1))
    times = []
    try:
        for k in range(repeats + 2):
            sync()
            t0 = time.perf_counter()
            engine.runner.execute(plan, engine.blocks)
            sync()
            if k >= 2:
                times.append(time.perf_counter() - t0)
    finally:
        for rid in made:
            engine.blocks.free(rid)
    return statistics.median(times)


class _ShapeRecorder:
    """Wraps the engine's executor during the host-overhead run: each iteration's rows and executor time."""

    def __init__(self, runner, sync):
        self.runner, self.sync = runner, sync
        self.last: tuple[int, float] | None = None

    def execute(self, plan, blocks):
        t0 = time.perf_counter()
        out = self.runner.execute(plan, blocks)
        self.sync()
        self.last = (len(plan.chunks), time.perf_counter() - t0)
        return out


def host_overhead(engine: LLMEngine, num_requests: int, prompt: int, output: int, sync) -> tuple[float, float]:
    """(seconds per iteration, seconds per row) the engine spends around its executor."""
    rec = _ShapeRecorder(engine.runner, sync)
    engine.runner = rec
    samples: list[tuple[int, float]] = []
    rng = random.Random(0)
    vocab = engine.loaded.config.vocab_size
    try:
        for i in range(num_requests):
            engine.add_request(f"host-{i}", [rng.randrange(3, vocab - 1) for _ in range(prompt)],
                               SamplingParams(max_tokens=output, ignore_eos=True))
        while engine.has_unfinished:
            t0 = time.perf_counter()
            engine.step()
            total = time.perf_counter() - t0
            if rec.last is not None:
                samples.append((rec.last[0], max(0.0, total - rec.last[1])))
                rec.last = None
    finally:
        engine.runner = rec.runner
    x = np.array([[1.0, r] for r, _ in samples])
    y = np.array([s for _, s in samples])
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    return max(0.0, float(coef[0])), max(0.0, float(coef[1]))


def calibrate(model: str, *, device: str | None = None, dtype: str | None = None, name: str | None = None,
              max_num_seqs: int = 256, max_batched_tokens: int = 8192, repeats: int = 5, quick: bool = False,
              num_blocks: int | None = None, gpu_memory_fraction: float = 0.85, seed: int = 0,
              log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)) -> SimProfile:
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    cfg = EngineConfig(model=model, device=device, dtype=dtype, num_blocks=num_blocks,
                       gpu_memory_fraction=gpu_memory_fraction, max_num_seqs_limit=max_num_seqs,
                       max_batched_tokens_limit=max_batched_tokens, seed=seed, spec_k_limit=0)
    t_start = time.perf_counter()
    engine = LLMEngine(cfg, LiveConfig(max_num_seqs=max_num_seqs, max_batched_tokens=max_batched_tokens,
                                       chunk_size=max_batched_tokens))
    cuda = engine.device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(engine.device)) if cuda else (lambda: None)
    log(f"calibrate: {model} on {device} ({dtype}), {engine.blocks.num_blocks} KV blocks, "
        f"built in {time.perf_counter() - t_start:.1f} s")
    pool_tokens = engine.blocks.num_blocks * cfg.block_size
    grid = design_grid(max_num_seqs, max_batched_tokens, engine.max_model_len, pool_tokens, quick)
    timings: list[Timing] = []
    for i, rows in enumerate(grid):
        timings.append(Timing(rows, time_shape(engine, rows, repeats, sync)))
        if (i + 1) % 10 == 0 or i + 1 == len(grid):
            log(f"calibrate: {i + 1}/{len(grid)} shapes timed")
    shapes = [IterationShape.of_rows(t.rows) for t in timings]
    seconds = [t.seconds for t in timings]
    held = [i for i in range(len(shapes)) if i % 5 == 4]
    train = [i for i in range(len(shapes)) if i % 5 != 4]
    first = fit([shapes[i] for i in train], [seconds[i] for i in train])
    held_err = relative_errors(first, [shapes[i] for i in held], [seconds[i] for i in held]) if held else np.zeros(0)
    model_fit = fit(shapes, seconds)
    all_err = relative_errors(model_fit, shapes, seconds)
    n_host = 8 if quick else 64
    per_it, per_row = host_overhead(engine, n_host, 64 if quick else 256, 8 if quick else 64, sync)
    coef = model_fit.to_dict()
    coef["constant"] += per_it
    coef["decode_rows"] += per_row
    lm = engine.loaded
    per_block = engine.kv_cache.num_bytes // engine.blocks.num_blocks
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("transformers", "triton"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    device_name = torch.cuda.get_device_name(engine.device) if cuda else f"CPU ({platform.processor() or platform.machine()})"
    short = model.split(":", 1)[-1].rstrip("/").split("/")[-1]
    gpu = device_name.replace("NVIDIA ", "").split()[0].lower() if cuda else "cpu"
    profile = SimProfile(
        name=name or f"{gpu}-{short}", model=model, device_name=device_name, dtype=dtype, block_size=cfg.block_size,
        num_blocks=engine.blocks.num_blocks, kv_bytes_per_block=per_block,
        model_shape={"num_layers": lm.num_layers, "hidden_size": lm.config.hidden_size,
                     "num_kv_heads": lm.num_kv_heads, "head_dim": lm.head_dim, "vocab_size": lm.config.vocab_size,
                     "max_model_len": engine.max_model_len, "eos_token_ids": list(lm.eos_token_ids)},
        cost=CostModel(coef),
        fit={"num_shapes": len(shapes), "num_held_out": len(held),
             "held_out_mean_rel_error": float(held_err.mean()) if len(held_err) else None,
             "held_out_max_rel_error": float(held_err.max()) if len(held_err) else None,
             "all_mean_rel_error": float(all_err.mean()), "all_max_rel_error": float(all_err.max()),
             "host_overhead_s": {"per_iteration": per_it, "per_row": per_row},
             "cuda_graphs": bool(getattr(engine.runner, "graphs", None)), "repeats": repeats,
             "max_num_seqs_limit": max_num_seqs, "max_batched_tokens_limit": max_batched_tokens,
             "shapes": [{"rows": _compact(t.rows), "seconds": t.seconds} for t in timings],
             "wall_time_s": round(time.perf_counter() - t_start, 1)},
        versions=versions, created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        gpu_memory_fraction=gpu_memory_fraction,
    )
    log(f"calibrate: fit on {len(shapes)} shapes; held-out error mean {profile.fit['held_out_mean_rel_error']:.1%}, "
        f"max {profile.fit['held_out_max_rel_error']:.1%}; {profile.fit['wall_time_s']} s")
    return profile


def _compact(rows: Rows) -> list[list[int]]:
    """Runs of equal rows as [context, new tokens, count]."""
    out: list[list[int]] = []
    for ctx, n in rows:
        if out and out[-1][0] == ctx and out[-1][1] == n:
            out[-1][2] += 1
        else:
            out.append([ctx, n, 1])
    return out
