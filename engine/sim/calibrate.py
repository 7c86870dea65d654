"""`batchdeck calibrate`: run designed workloads through the real engine's own loop and fit the cost
model (engine/sim/cost_model.py) to the time its iterations take, into a profile (engine/sim/profile.py).

The engine is built as `batchdeck` runs it (CUDA graphs captured up to the limits, fused kernels,
chunked prefill, the KV pool sized from free memory). What the simulator must reproduce is how far
the engine's clock moves per iteration while it is busy: the gap between two consecutive iterations'
time stamps (`IterationRecord.time`, taken after the forward), which holds scheduling, input
preparation, the graph replay or eager forward, sampling, bookkeeping, telemetry and whatever the
serving loop does between steps. So the workloads (`design_workloads`) are played through a driver:
`drive_inline` steps the engine in this thread; the CLI passes the serving loop's driver
(engine/service/calibration_driver.py: the AsyncEngine worker thread, output streams consumed on an
asyncio loop, as `replay` and `serve` run). An `IterationTap` keeps each iteration's plan and time.

Workloads: decode ramps (B requests with staggered output lengths: decode-only iterations at every
batch size from B down to 1, at several contexts; and ramps whose rows' contexts spread from 64 tokens
to several thousand, as a serving load's do, so the fit sees batches whose longest row is far above
their mean: the decode kernel's time follows the longest row while its programs do not fill the
GPU, `max_context` in engine/sim/cost_model.py), closed loops (N requests in flight, each finished
one replaced: mixed prefill + decode iterations, at several chunk sizes), prefill batches (one output
token: prefill-only chunks), closed loops of a serving load's length mix (`serving_workloads`: the
iterations a replayed load runs, admissions, finishes and rows of spread contexts together, and with
one held out, the fit's error on such a load), and spaced single requests (the engine idle between them: what an
iteration after an idle wait adds, `idle_wake_s`, and by how long the engine was idle, `idle_wake_by_idle`,
from one spaced workload per gap of IDLE_GAPS_S). Every third workload of each kind is held out of a
first fit to report the error per regime (and per kind) on workloads it did not see; the shipped model
is fitted on all.
"""
from __future__ import annotations

import datetime
import gc
import importlib.metadata
import math
import platform
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Callable, Mapping

import numpy as np

from batchdeck.engine.config import resolve_configs
from batchdeck.engine.llm_engine import LLMEngine
from batchdeck.engine.request import SamplingParams
from batchdeck.engine.sim.cost_model import CostModel, IterationShape, fit, regime_errors, relative_errors
from batchdeck.engine.sim.profile import SimProfile
from batchdeck.engine.telemetry import ListSink

DEFAULT_BUDGET_S = 120.0  # seconds of designed workloads a calibration plays (`batchdeck calibrate --budget`)
IDLE_GAPS_S = (0.02, 0.1, 0.4)  # idle waits before the spaced single requests (a replay's lulls run to seconds)


@dataclass(frozen=True)
class Workload:
    """Requests of (prompt tokens, output tokens), played as `mode`: `batch` (all at once), `closed`
    (`concurrency` in flight, the next sent when one finishes) or `spaced` (one every `gap_s`
    seconds, the engine idle in between); under the live settings given."""

    name: str
    kind: str  # decode | mixed | prefill | serving | idle (what it is designed to cover)
    mode: str
    requests: tuple[tuple[int, int], ...]
    max_num_seqs: int
    max_batched_tokens: int
    chunk_size: int
    concurrency: int = 0
    gap_s: float = 0.0

    def live_changes(self) -> dict[str, int]:
        return {"max_num_seqs": self.max_num_seqs, "max_batched_tokens": self.max_batched_tokens,
                "chunk_size": self.chunk_size}


def design_workloads(max_rows: int, max_tokens: int, max_context: int, pool_tokens: int,
                     quick: bool = False) -> list[Workload]:
    """Workloads covering the shape space within the limits and the pool (see the module docstring),
    each sized to a few hundred iterations at most."""
    rows_set = sorted({r for r in (4, 16, 64, 256, max_rows) if r <= max_rows})
    ctx_set = [c for c in (64, 512, 2048, 8192) if c + 256 < max_context]
    if not ctx_set:
        raise ValueError(f"calibrate: the engine's max_model_len is {max_context} tokens; the designed "
                         f"workloads need at least 321 (64-token contexts plus their outputs)")
    chunk_set = sorted({n for n in (64, 256, 1024, 4096, max_tokens) if n <= max_tokens})
    if quick:
        rows_set, ctx_set, chunk_set = rows_set[-2:], ctx_set[:2], chunk_set[-2:]
    out_len = 16 if quick else 96
    max_prefill = 1 << 17  # prompt tokens per workload (an 8B model prefills this in seconds)
    fits = lambda reqs: sum(p + o for p, o in reqs) + 16 * len(reqs) <= pool_tokens  # noqa: E731
    decode, mixed, prefill, idle = [], [], [], []
    # the spread ramps' longest contexts: above 64 (a ramp from 64 to 64 is no spread) and leaving room
    # for the outputs within max_model_len
    spreads = sorted(c for c in {ctx_set[-1], min(4 * ctx_set[-1], max_context - 2 * max(out_len, max_rows))}
                     if c > 64)
    for c_hi in (spreads if not quick else spreads[:1]):
        for b in rows_set:
            while True:  # contexts spread geometrically from 64 to c_hi, in a random order
                ctxs = [round(64 * (c_hi / 64) ** (i / max(1, b - 1))) for i in range(b)]
                if b == 1 or (fits([(c, max(out_len, b)) for c in ctxs]) and sum(ctxs) <= max_prefill):
                    break
                b //= 2
            if b < 4 or c_hi <= 64:
                continue
            random.Random(b * 104729 + c_hi).shuffle(ctxs)
            o_max = max(out_len, b) if not quick else out_len
            reqs = tuple((c, max(1, round(o_max * (i + 1) / b))) for i, c in enumerate(ctxs))
            w = Workload(f"decode b={b} ctx=64..{c_hi}", "decode", "batch", reqs, b, max_tokens, max_tokens)
            if w not in decode:
                decode.append(w)
    for c in ctx_set:
        for b in rows_set:
            while b > 1 and (not fits([(c, max(out_len, b))] * b) or b * c > max_prefill):
                b //= 2
            o_max = max(out_len, b) if not quick else out_len
            reqs = tuple((c, max(1, round(o_max * (i + 1) / b))) for i in range(b))
            w = Workload(f"decode b={b} ctx={c}", "decode", "batch", reqs, b, max_tokens, max_tokens)
            if w not in decode:
                decode.append(w)
    iterations = 24 if quick else 160
    for n in chunk_set:
        for conc in sorted({max(1, max_rows // 4), max_rows}):
            for p in sorted({ctx_set[len(ctx_set) // 2], min(ctx_set[-1], (max_context - out_len) * 2 // 3)}):
                o = out_len // 2
                count = max(2 * min(conc, 4), min(3 * conc, iterations * n // p, max_prefill // p))
                rng = random.Random(n * 7919 + conc * 31 + p)
                reqs = tuple((max(2, int(p * rng.uniform(0.5, 1.5))), max(2, int(o * rng.uniform(0.5, 1.5))))
                             for _ in range(count))
                k = min(conc, count)
                while k > 1 and not fits(reqs[:k]):
                    k //= 2
                mixed.append(Workload(f"mixed n={k} prompt~{p} chunk={n}", "mixed", "closed", reqs, k,
                                      max_tokens, n, concurrency=k))
        for c in ctx_set:
            p = min(2 * c, max_context - 2)
            k = max(1, min(max_rows, 8, iterations * n // p, max_prefill // p))
            reqs = tuple((p, 1) for _ in range(k))
            if fits(reqs) and p // n <= 2 * iterations:
                prefill.append(Workload(f"prefill {k}x{p} chunk={n}", "prefill", "batch", reqs, k, max_tokens, n))
    lengths = [c for c in (16, 128, 512, 2048) if c < max_context][: 2 if quick else 4]
    for gap in IDLE_GAPS_S[: 2 if quick else len(IDLE_GAPS_S)]:
        reqs = tuple((lengths[i % len(lengths)], 2) for i in range(4 if quick else 12))
        idle.append(Workload(f"spaced single requests gap={gap * 1e3:g}ms", "idle", "spaced", reqs, max_rows,
                             max_tokens, min(max_tokens, 512), gap_s=gap))
    serving = serving_workloads(max_rows, max_tokens, max_context, fits, quick)
    design: list[Workload] = []
    longest = max(map(len, (decode, mixed, prefill, serving)))
    for group in zip(*(g + [None] * (longest - len(g)) for g in (decode, mixed, prefill, serving))):
        design.extend(w for w in group if w is not None)
    return [replace(w, name=f"w{k} {w.name}") for k, w in enumerate(design + idle)]


def serving_workloads(max_rows: int, max_tokens: int, max_context: int, fits: Callable[[Any], bool],
                      quick: bool = False) -> list[Workload]:
    """Closed loops of a serving load's mix (the quickstart preset's lengths: chats of lognormal prompts
    around 192 tokens and 16-128 output tokens beside a few long jobs of ~768-token prompts and 64-192
    output tokens), `max_rows` / 2 and `max_rows` / 8 in flight: every iteration admits, finishes
    and decodes rows of spread contexts together, as a replayed load's do."""
    out = []
    cap = max(8, min(1536, max_context - 256))
    for conc in sorted({max(1, max_rows // 8), max(1, max_rows // 2)}):
        rng = random.Random(7 * conc + 1)
        count = max(2 * conc, (24 if quick else 240) * conc // 80)  # about that many iterations
        reqs = []
        for _ in range(count):
            if rng.random() < 0.15:  # a long job
                reqs.append((min(cap, max(256, int(rng.gauss(768, 200)))), rng.randint(64, 192 if not quick else 64)))
            else:
                reqs.append((min(cap, max(8, int(rng.lognormvariate(math.log(192) - 0.18, 0.6)))),
                             rng.randint(16, 128 if not quick else 32)))
        k = conc
        while k > 1 and not fits(reqs[:k]):
            k //= 2
        out.append(Workload(f"serving mix n={k}", "serving", "closed", tuple(reqs), k, max_tokens,
                            min(512, max_tokens), concurrency=k))
    return out


def held_out_workloads(workloads: list[Workload]) -> set[int]:
    """Every third workload of each kind that has two or more (the second, fifth, ...): left out of a
    first fit to measure the error on workloads it did not see."""
    return held_out_of_kinds({i: w.kind for i, w in enumerate(workloads)})


def held_out_of_kinds(kinds: Mapping[int, str]) -> set[int]:
    """`held_out_workloads` from each workload's index and kind (as a samples file names them)."""
    out: set[int] = set()
    for kind in ("decode", "mixed", "prefill", "serving"):
        idx = sorted(i for i, k in kinds.items() if k == kind)
        out.update(idx[1::3] if len(idx) >= 2 else ())
    return out


# -- recording the engine's iterations ------------------------------------------------------------------
@dataclass
class Sample:
    workload: int
    time: float  # IterationRecord.time: the engine clock after the forward
    shape: IterationShape
    after_idle: bool  # the engine waited (nothing to run) before this iteration
    newest_arrival: float  # the latest arrival among its requests
    sync_wait: float = 0.0  # IterationRecord.sync_wait_time: how long the host waited for its tokens
    idle_s: float | None = None  # after an idle wait: from the previous iteration's end to the arrival


class IterationTap:
    """Installed on an engine: keeps each iteration's executed plan (`StepResult.plan`: with
    overlapped iterations the scheduler has planned the next one by the time an iteration is booked)
    and when it ended. On a CUDA device an iteration ends when the engine has waited for its tokens
    (`IterationRecord.time`); on a device whose launch computes the iteration before it returns (CPU),
    when its launch returned, which with overlap comes before the previous iteration is booked. The
    hot path keeps only references; shapes are computed when the workloads are done."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._step = engine.step
        self._busy = False
        self._raw: list[tuple[int, float, Any, bool, float, float | None]] = []
        self._last_time: float | None = None  # the previous iteration's time stamp
        self._samples: list[Sample] = []
        self.workload = 0
        self._launch_end: dict[int, float] | None = None
        device_async = getattr(engine.runner, "device_async", engine.device.type == "cuda")  # a simulated one says
        if not device_async and hasattr(engine.runner, "launch"):
            self._launch_end = {}
            self._launch = engine.runner.launch
            engine.runner.launch = self.launch
        engine.step = self.step

    def launch(self, plan, *args, **kwargs):
        launched = self._launch(plan, *args, **kwargs)
        self._launch_end[id(plan)] = self.engine.clock()
        return launched

    def step(self):
        result = self._step()
        if result is None:
            self._busy = False
            return result
        plan = result.plan
        t = result.record.time if self._launch_end is None else self._launch_end.pop(id(plan), result.record.time)
        self._raw.append((self.workload, t, plan, not self._busy, result.record.sync_wait_time, self._last_time))
        self._last_time = t
        self._busy = self.engine.has_unfinished
        return result

    def idle(self) -> None:
        """Between workloads (the engine idle): the next iteration follows an idle wait. The plans
        kept so far become shapes here, so they do not pile up (and weigh on the garbage collector)."""
        self._busy = False
        self._shape_up()

    def _shape_up(self) -> None:
        for w, t, plan, after_idle, wait, prev in self._raw:
            chunks = plan.chunks
            newest = max(c.request.arrival_time for c in chunks)
            idle = newest - prev if after_idle and prev is not None and newest > prev else None
            self._samples.append(Sample(w, t, IterationShape.of_chunks(chunks), after_idle, newest, wait, idle))
        self._raw.clear()

    def samples(self) -> list[Sample]:
        self._shape_up()
        return list(self._samples)

    def remove(self) -> None:
        del self.engine.step
        if self._launch_end is not None:
            del self.engine.runner.launch
            self._launch_end.clear()


def deadlines(workloads: list[Workload], budget_s: float, start: float) -> list[float]:
    """When each workload must stop (perf_counter seconds): its share of the budget, counted from
    the start, so time a workload does not use goes to the next ones."""
    n = len(workloads)
    return [start + budget_s * (i + 1) / n for i in range(n)]


def drive_inline(engine: LLMEngine, workload: Workload, vocab_rng: random.Random, deadline: float = float("inf"),
                 clock: Callable[[], float] = time.perf_counter) -> bool:
    """Play a workload by stepping the engine in this thread (no serving loop around it). Past the
    deadline (on `clock`) no request is sent and those unfinished are aborted. True when it was cut
    short so."""
    vocab = engine.loaded.config.vocab_size
    engine.update_config(workload.live_changes(), "calibrate")
    engine.apply_pending_config()
    pending = list(enumerate(workload.requests))
    sent: list[str] = []

    def submit(arrival: float | None = None) -> None:
        i, (p, o) = pending.pop(0)
        rid = f"cal-{workload.name}-{i}"
        engine.add_request(rid, [vocab_rng.randrange(3, vocab - 1) for _ in range(p)],
                           SamplingParams(max_tokens=o, ignore_eos=True), arrival_time=arrival)
        sent.append(rid)

    def over() -> bool:
        if clock() < deadline:
            return False
        pending.clear()
        for rid in sent:
            engine.abort(rid)
        return True

    if workload.mode == "spaced":
        while pending:
            if over():
                return True
            due = engine.clock() + workload.gap_s
            while (left := due - engine.clock()) > 0:  # a simulated engine's sleep moves its own clock
                engine.sleep(left)
            submit(due)
            while engine.has_unfinished:
                engine.step()
        return False
    first = len(pending) if workload.mode == "batch" else workload.concurrency
    for _ in range(min(first, len(pending))):
        submit()
    while engine.has_unfinished:
        if over():
            return True
        result = engine.step()
        if result is not None:
            for _ in result.finished:
                if pending:
                    submit()
    return False


# plays the workloads within the budget (seconds); returns the indices of those the budget cut short
Driver = Callable[[LLMEngine, list[Workload], "IterationTap", Callable[[str], None], float], list[int]]


def drive_all_inline(engine: LLMEngine, workloads: list[Workload], tap: IterationTap,
                     log: Callable[[str], None], budget_s: float = float("inf"),
                     clock: Callable[[], float] = time.perf_counter) -> list[int]:
    rng = random.Random(0)
    cut = []
    for i, (w, deadline) in enumerate(zip(workloads, deadlines(workloads, budget_s, clock()))):
        tap.workload = i
        tap.idle()
        t0 = time.perf_counter()
        cut_short = drive_inline(engine, w, rng, deadline, clock)
        cut += [i] if cut_short else []
        log(workload_played(i, len(workloads), w, time.perf_counter() - t0, cut_short))
    return cut


def workload_played(i: int, count: int, w: Workload, seconds: float, cut_short: bool) -> str:
    """The progress line of the i-th (from 0) of `count` workloads, played in `seconds`."""
    return f"calibrate: {i + 1}/{count} {w.name} ({seconds:.1f} s{', cut short by the budget' if cut_short else ''})"


# -- the fit --------------------------------------------------------------------------------------------
def busy_gaps(samples: list[Sample]) -> list[tuple[Sample, float]]:
    """(sample, seconds since the previous iteration's time stamp) for iterations that followed a
    busy one of the same workload."""
    out = []
    for prev, s in zip(samples, samples[1:]):
        if not s.after_idle and s.workload == prev.workload and s.time > prev.time:
            out.append((s, s.time - prev.time))
    return out


def host_part(sample: Sample, gap: float) -> float:
    """The host's share of a busy iteration's gap: the gap less the host's wait for the device."""
    return gap - min(gap, sample.sync_wait)


def write_samples(path: str, samples: list[Sample], kinds: dict[int, str] | None = None) -> int:
    """Write each busy iteration as a JSON line (its workload, and its kind when `kinds` names it; the gap
    the fit explains; the host's wait for the device within it; the shape's features): the data behind a
    fit, for analysis outside it. Returns the number of lines."""
    import json

    gaps = busy_gaps(samples)
    with open(path, "w", encoding="utf-8") as f:
        for s, gap in gaps:
            row = {"workload": s.workload, "gap_s": gap, "sync_wait_s": s.sync_wait, **asdict(s.shape)}
            if kinds is not None:
                row["kind"] = kinds.get(s.workload)
            f.write(json.dumps(row) + "\n")
    return len(gaps)


def read_samples(path: str) -> list[tuple[dict[str, Any], IterationShape]]:
    """The lines `write_samples` wrote (gzipped or not): each line's row (gap_s, and where written
    workload, kind, sync_wait_s) and its shape; shape fields an older file lacks are 0. A line that is
    not a sample is refused by its number."""
    import gzip
    import json

    shape_fields = [f.name for f in fields(IterationShape)]
    opener = gzip.open if path.endswith(".gz") else open
    out = []
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                row = json.loads(line)
                shape = IterationShape(**{k: row.get(k, 0) for k in shape_fields})
                row["gap_s"] = float(row["gap_s"])
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise ValueError(f"{path}:{n}: not a calibration sample ({exc})") from None
            out.append((row, shape))
    return out


def wake_extra(model: CostModel, s: Sample) -> float:
    """How much longer than the model's iteration cost an iteration after an idle wait took to end,
    counted from its newest request's arrival (requests carry their due time, as replays stamp them)."""
    return s.time - s.newest_arrival - model.predict(s.shape)


def idle_wake(model: CostModel, samples: list[Sample], spaced: set[int]) -> tuple[float, int]:
    """The median `wake_extra` over the iterations that followed an idle wait in the `spaced`
    workloads; and how many there were."""
    extra = [wake_extra(model, s) for s in samples if s.after_idle and s.workload in spaced]
    if not extra:
        return 0.0, 0
    return max(0.0, float(statistics.median(extra))), len(extra)


def wake_by_idle(model: CostModel, samples: list[Sample], spaced: set[int]) -> list[list[float]]:
    """Per spaced workload (one gap each): [median idle seconds, median `wake_extra`], by idle; empty
    when fewer than two workloads measured it (then one wake, `idle_wake`, stands for all)."""
    by_workload: dict[int, list[Sample]] = {}
    for s in samples:
        if s.after_idle and s.workload in spaced and s.idle_s:
            by_workload.setdefault(s.workload, []).append(s)
    bands = sorted([float(statistics.median(s.idle_s for s in of)),
                    max(0.0, float(statistics.median(wake_extra(model, s) for s in of)))]
                   for of in by_workload.values())
    merged: list[list[float]] = []
    for idle, wake in bands:  # workloads of (nearly) the same gap: one band
        if merged and idle <= merged[-1][0] * 1.05:
            continue
        merged.append([idle, wake])
    return merged if len(merged) >= 2 else []


# the report's idle bands split halfway (geometrically) between calibration's idle gaps
WAKE_REPORT_EDGES_S = tuple(math.sqrt(a * b) for a, b in zip(IDLE_GAPS_S, IDLE_GAPS_S[1:]))


def wake_report(model: CostModel, samples: list[Sample], edges_s: tuple[float, ...] = WAKE_REPORT_EDGES_S) -> list[dict]:
    """The iterations after an idle wait of a run, by idle length (bands split at `edges_s`): how many,
    their median idle, the median measured `wake_extra` and the median wake the model adds for that
    idle (`CostModel.wake_after`). Says whether the simulator's wake matches the engine's on a replay."""
    bounds = (0.0, *edges_s, float("inf"))
    out = []
    for lo, hi in zip(bounds, bounds[1:]):
        of = [s for s in samples if s.after_idle and s.idle_s is not None and lo <= s.idle_s < hi]
        if of:
            out.append({"idle_from_s": lo, "idle_to_s": None if hi == float("inf") else hi, "samples": len(of),
                        "idle_median_s": float(statistics.median(s.idle_s for s in of)),
                        "measured_wake_median_s": float(statistics.median(wake_extra(model, s) for s in of)),
                        "model_wake_median_s": float(statistics.median(model.wake_after(s.idle_s) for s in of))})
    return out


def check_iterations(model: CostModel, samples: list[Sample]) -> dict[str, Any]:
    """How `model` prices iterations an engine ran (a workload's busy iterations, as the tap kept
    them), per regime: how many, their mean measured gap and shape, the mean predicted, the relative
    error, the bias of the total (sum predicted / sum measured - 1) and the median of predicted /
    measured - 1 (robust to the odd slow iteration of a shared machine). On a real run it says whether
    the cost model misprices the workload's own iterations; compared with the same table of a
    simulated run, whether the simulated engine ran other iterations (dynamics). `largest_gaps`: the five
    longest busy gaps, when they happened and how the model priced them (a stall shows there).
    `sync_wait_mean_s`: how long the host waited for the tokens, per gap (with overlapped iterations
    on a GPU: near the gap when the device bounds the iteration, near 0 when the host does), and
    `host_mean_s` the rest of the gap; `mean_max_context_k`: the longest decode row's context (the
    decode kernel's time follows it while its programs do not fill the GPU)."""
    gaps = busy_gaps(samples)
    out: dict[str, Any] = {"busy_iterations": len(gaps), "iterations": len(samples)}
    if not gaps:
        return out
    shapes, seconds = [s.shape for s, _ in gaps], [y for _, y in gaps]
    errors = regime_errors(model, shapes, seconds)
    for regime, e in errors.items():
        idx = [i for i, sh in enumerate(shapes) if (regime == "decode") == sh.decode_only]
        e.update(median_bias=float(np.median([model.predict(shapes[i]) / seconds[i] for i in idx]) - 1),
                 measured_mean_s=float(np.mean([seconds[i] for i in idx])),
                 predicted_mean_s=float(np.mean([model.predict(shapes[i]) for i in idx])),
                 mean_rows=float(np.mean([shapes[i].rows for i in idx])),
                 mean_tokens=float(np.mean([shapes[i].tokens for i in idx])),
                 mean_context_k=float(np.mean([shapes[i].decode_context / max(1, shapes[i].decode_rows)
                                               for i in idx])),
                 mean_max_context_k=float(np.mean([shapes[i].decode_max_context for i in idx])),
                 sync_wait_mean_s=float(np.mean([gaps[i][0].sync_wait for i in idx])),
                 host_mean_s=float(np.mean([host_part(gaps[i][0], seconds[i]) for i in idx])))
    out["by_regime"] = errors
    pred = np.array([model.predict(s) for s in shapes])
    out["total_bias"] = float(pred.sum() / np.sum(seconds) - 1)
    out["busy_time_s"] = float(np.sum(seconds))
    t0 = samples[0].time
    out["largest_gaps"] = [{"at_s": gaps[i][0].time - t0, "gap_s": seconds[i], "predicted_s": float(pred[i]),
                            "rows": shapes[i].rows, "tokens": shapes[i].tokens}
                           for i in np.argsort(seconds)[::-1][:5]]
    return out


def fit_samples(samples: list[Sample], buckets: dict[str, Any], held_out: set[int],
                spaced: set[int] = frozenset(), kinds: dict[int, str] | None = None) -> tuple[CostModel, dict[str, Any]]:
    """The cost model fitted on every busy iteration, and the fit's report (held-out error per regime,
    and per workload kind when `kinds` names each workload's)."""
    gaps = busy_gaps(samples)
    if not gaps:
        raise RuntimeError("calibrate: no busy iterations were recorded")
    train = [(s, y) for s, y in gaps if s.workload not in held_out]
    held = [(s, y) for s, y in gaps if s.workload in held_out]
    report: dict[str, Any] = {"num_shapes": len(gaps), "num_held_out": len(held)}
    if train and held:
        first = fit([s.shape for s, _ in train], [y for _, y in train], **buckets,
                    sync_waits=[s.sync_wait for s, _ in train])
        err = relative_errors(first, [s.shape for s, _ in held], [y for _, y in held])
        report.update(held_out_mean_rel_error=float(err.mean()), held_out_max_rel_error=float(err.max()),
                      held_out_by_regime=regime_errors(first, [s.shape for s, _ in held], [y for _, y in held]))
        if kinds:
            report["held_out_by_kind"] = {
                kind: regime_errors(first, [s.shape for s, _ in of], [y for _, y in of])
                for kind in sorted({kinds[s.workload] for s, _ in held})
                if (of := [(s, y) for s, y in held if kinds[s.workload] == kind])}
    else:
        report.update(held_out_mean_rel_error=None, held_out_max_rel_error=None, held_out_by_regime={})
    model = fit([s.shape for s, _ in gaps], [y for _, y in gaps], **buckets, sync_waits=[s.sync_wait for s, _ in gaps])
    wake, n_idle = idle_wake(model, samples, spaced)
    bands = wake_by_idle(model, samples, spaced)
    model = CostModel({**model.to_dict(), "idle_wake_s": wake, "idle_wake_by_idle": bands or None})
    err = relative_errors(model, [s.shape for s, _ in gaps], [y for _, y in gaps])
    # where the iterations' time went: the host's wait for the device, and the rest (the host's own work)
    report["gap_split_by_regime"] = {
        regime: {k: e[k] for k in ("samples", "measured_mean_s", "sync_wait_mean_s", "host_mean_s", "mean_rows",
                                   "mean_context_k", "mean_max_context_k")}
        for regime, e in check_iterations(model, samples).get("by_regime", {}).items()}
    report.update(all_mean_rel_error=float(err.mean()), all_max_rel_error=float(err.max()),
                  all_by_regime=regime_errors(model, [s.shape for s, _ in gaps], [y for _, y in gaps]),
                  idle_wake_s=wake, idle_samples=n_idle, idle_wake_by_idle=bands)
    return model, report


def decode_split_rule(engine: LLMEngine) -> dict[str, int] | None:
    """How the engine's decode attention splits each row's keys (engine/attention/triton_backend.py),
    for the cost model's `max_context` (None: the backend does not split, or never ran on a GPU)."""
    backend = engine.backend
    num_sms = getattr(backend, "num_sms", None)
    if getattr(backend, "name", None) != "triton" or not num_sms or engine.device.type != "cuda":
        return None
    return {"kv_heads": int(engine.loaded.num_kv_heads), "num_sms": int(num_sms), "max_splits": int(backend.max_splits)}


def calibrate(model: str, *, device: str | None = None, dtype: str | None = None, name: str | None = None,
              max_num_seqs: int | None = None, max_batched_tokens: int | None = None, quick: bool = False,
              async_scheduling: bool | None = None,
              num_blocks: int | None = None, gpu_memory_fraction: float | None = None, seed: int = 0,
              driver: Driver | None = None, driver_name: str = "inline", budget_s: float = DEFAULT_BUDGET_S,
              samples_out: str | None = None,
              log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)) -> SimProfile:
    """Build the engine, play `design_workloads` through `driver` (default: `drive_all_inline`) within
    `budget_s` seconds (each workload its share; one that runs over is cut short, and the fit report's
    `cut_short` names it), fit. The engine runs with overlapped iterations (`async_scheduling`) as it
    would serve on the device (default: the device's default, on for cuda), since overlap changes what
    an iteration costs. `samples_out`: a path to write the iterations the fit saw to (`write_samples`)."""
    import torch

    # the one resolver every command uses: the device's defaults for what is not given here (the largest
    # batch and iteration run are the limits the engine captures graphs up to, as it would serve)
    cfg, live = resolve_configs({
        "model": model, "device": device, "dtype": dtype, "num_blocks": num_blocks,
        "async_scheduling": async_scheduling, "gpu_memory_fraction": gpu_memory_fraction, "seed": seed,
        "spec_k_limit": 0, "max_num_seqs": max_num_seqs, "max_batched_tokens": max_batched_tokens})
    device, dtype = cfg.device, cfg.dtype
    max_num_seqs, max_batched_tokens = live.max_num_seqs, live.max_batched_tokens
    cfg = replace(cfg, max_num_seqs_limit=max_num_seqs, max_batched_tokens_limit=max_batched_tokens)
    t_start = time.perf_counter()
    engine = LLMEngine(cfg, live, sink=ListSink())  # telemetry kept as a headless replay keeps it
    cuda = engine.device.type == "cuda"
    log(f"calibrate: {model} on {device} ({dtype}), {engine.blocks.num_blocks} KV blocks, "
        f"async scheduling {'on' if engine.async_scheduling else 'off'}, built in {time.perf_counter() - t_start:.1f} s")
    graphs = getattr(engine.runner, "graphs", None)
    buckets = {"decode_buckets": list(graphs.decode_sizes) if graphs else [],
               "token_buckets": list(graphs.token_sizes) if graphs else [],
               "max_rows": int(graphs.max_rows) if graphs else 0}
    pool_tokens = engine.blocks.num_blocks * cfg.block_size
    workloads = design_workloads(max_num_seqs, max_batched_tokens, engine.max_model_len, pool_tokens, quick)
    held_out = held_out_workloads(workloads)
    tap = IterationTap(engine)
    t_run = time.perf_counter()
    try:
        cut = (driver or drive_all_inline)(engine, workloads, tap, log, budget_s)
    finally:
        tap.remove()
    run_s = time.perf_counter() - t_run
    buckets["decode_splits"] = decode_split_rule(engine)
    samples = tap.samples()
    spaced = {i for i, w in enumerate(workloads) if w.mode == "spaced"}
    kinds = {i: w.kind for i, w in enumerate(workloads)}
    if samples_out:
        log(f"calibrate: wrote {write_samples(samples_out, samples, kinds)} iterations to {samples_out}")
    cost, report = fit_samples(samples, buckets, held_out, spaced, kinds)
    cost = CostModel({**cost.to_dict(), "cuda_graphs": bool(graphs)})
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
    per_kind: dict[str, int] = {}
    for w in workloads:
        per_kind[w.kind] = per_kind.get(w.kind, 0) + 1
    profile = SimProfile(
        name=name or f"{gpu}-{short}", model=model, device_name=device_name, dtype=dtype, block_size=cfg.block_size,
        num_blocks=engine.blocks.num_blocks, kv_bytes_per_block=per_block,
        model_shape={"num_layers": lm.num_layers, "hidden_size": lm.config.hidden_size,
                     "num_kv_heads": lm.num_kv_heads, "head_dim": lm.head_dim, "vocab_size": lm.config.vocab_size,
                     "max_model_len": engine.max_model_len, "eos_token_ids": list(lm.eos_token_ids)},
        cost=cost,
        fit={"target": "engine iterations: gaps between consecutive busy iterations' time stamps",
             "driver": driver_name, **report, "num_workloads": len(workloads), "workloads_by_kind": per_kind,
             "cuda_graphs": bool(graphs), "async_scheduling": engine.async_scheduling, "max_num_seqs_limit": max_num_seqs,
             "max_batched_tokens_limit": max_batched_tokens, "budget_s": budget_s,
             "cut_short": [workloads[i].name for i in cut], "run_time_s": round(run_s, 1),
             "wall_time_s": round(time.perf_counter() - t_start, 1)},
        versions=versions, created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        gpu_memory_fraction=cfg.gpu_memory_fraction,
    )
    held = profile.fit["held_out_by_regime"]
    log(f"calibrate: fit on {report['num_shapes']} iterations of {len(workloads)} workloads; held-out error "
        + ", ".join(f"{k} mean {v['mean_rel_error']:.1%} (total {v['total_bias']:+.1%})" for k, v in held.items())
        + f"; idle wake {report['idle_wake_s'] * 1e3:.2f} ms"
        + "".join(f", {w * 1e3:.2f} ms after {i * 1e3:.0f} ms idle" for i, w in report["idle_wake_by_idle"])
        + f"; {profile.fit['wall_time_s']} s")
    if cut:
        log(f"calibrate: the budget ({budget_s:g} s) cut {len(cut)} of {len(workloads)} workloads short "
            f"(unfinished requests aborted; the profile's fit.cut_short names them): a larger --budget covers them")
    serving = report.get("held_out_by_kind", {}).get("serving")
    if serving:
        log("calibrate: held-out serving mix (a replayed load's iterations) "
            + ", ".join(f"{k} mean {v['mean_rel_error']:.1%} (total {v['total_bias']:+.1%})" for k, v in serving.items()))
    log("calibrate: busy gaps " + ", ".join(
        f"{k} {v['measured_mean_s'] * 1e3:.3f} ms = wait for the device {v['sync_wait_mean_s'] * 1e3:.3f} + host "
        f"{v['host_mean_s'] * 1e3:.3f} (rows {v['mean_rows']:.1f})" for k, v in report["gap_split_by_regime"].items()))
    del tap, engine, graphs, lm
    gc.collect()  # the engine and its KV pool go back now (a caller may build another engine at once)
    if cuda:
        torch.cuda.empty_cache()
    return profile
