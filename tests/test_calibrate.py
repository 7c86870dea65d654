"""Calibration from the engine's own iterations: the designed workloads, the tap, the fit to
iteration gaps, the idle wake, and the simulated engine applying them. No GPU needed."""
from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest

from batchdeck.engine.config import EngineConfig, LiveConfig
from batchdeck.engine.request import SamplingParams
from batchdeck.engine.sim.calibrate import (IterationTap, Sample, busy_gaps, design_workloads, drive_inline,
                                            fit_samples, held_out_workloads, wake_report)
from batchdeck.engine.sim.clock import VirtualClock
from batchdeck.engine.sim.cost_model import CostModel, IterationShape
from batchdeck.engine.sim.engine import SimulatedEngine
from batchdeck.engine.sim.profile import SimProfile

TRUTH = {"format": "regimes/1",
         "decode": {"constant": 2e-3, "rows": 1e-5, "padded_rows": 3e-5, "context": 2e-5},
         "mixed": {"constant": 4e-3, "padded_tokens": 2e-5, "attention": 1e-3, "decode_rows": 2e-5, "rows": 1e-5},
         "decode_buckets": [1, 2, 4, 8, 16, 32, 48, 64], "token_buckets": [32, 64, 128, 256, 512],
         "max_rows": 64, "idle_wake_s": 0.0, "cuda_graphs": True}


@pytest.mark.parametrize("limits", [(256, 8192, 40960, 870_000), (64, 2048, 4096, 200_000), (4, 64, 2048, 4096)])
def test_designed_workloads_stay_within_the_limits_and_cover_every_regime(limits):
    max_rows, max_tokens, max_len, pool = limits
    ws = design_workloads(max_rows, max_tokens, max_len, pool)
    assert {w.kind for w in ws} == {"decode", "mixed", "prefill", "serving", "idle"}
    assert len({w.name for w in ws}) == len(ws)
    for w in ws:
        assert 1 <= w.max_num_seqs <= max_rows and w.chunk_size <= w.max_batched_tokens <= max_tokens
        assert all(p + o < max_len for p, o in w.requests)
        live = {"closed": w.requests[: w.concurrency], "spaced": w.requests[:1]}.get(w.mode, w.requests)
        assert sum(p + o for p, o in live) <= pool
    held = held_out_workloads(ws)
    for kind in ("decode", "mixed", "prefill", "serving"):
        of_kind = [i for i, w in enumerate(ws) if w.kind == kind]
        assert (len(of_kind) >= 2) == bool(held & set(of_kind))  # held out where the kind has two or more
        assert set(of_kind) - held


def synthetic_samples(truth: CostModel, noise: float, seed: int = 0) -> list[Sample]:
    """Workloads of iterations whose gaps follow `truth`, with an idle-start iteration in each."""
    rng = np.random.default_rng(seed)
    out, t = [], 0.0
    for w in range(16):
        for k in range(40):
            if w % 2:
                rows = [(int(rng.integers(10, 3000)), 1) for _ in range(int(rng.integers(1, 64)))]
            else:
                rows = [(int(rng.integers(0, 2000)), int(rng.choice([32, 100, 400])))] + \
                       [(int(rng.integers(10, 3000)), 1) for _ in range(int(rng.integers(0, 30)))]
            shape = IterationShape.of_rows(rows)
            arrival = t
            t += truth.predict(shape) * (1 + rng.normal(0, noise)) + (0.0015 if k == 0 else 0.0)
            out.append(Sample(w, t, shape, after_idle=k == 0, newest_arrival=arrival))
        t += 1.0
    return out


def test_the_fit_recovers_iteration_costs_and_the_idle_wake_from_iteration_time_stamps():
    truth = CostModel(TRUTH)
    samples = synthetic_samples(truth, 0.02)
    buckets = {k: TRUTH[k] for k in ("decode_buckets", "token_buckets", "max_rows")}
    model, report = fit_samples(samples, buckets, held_out={3, 6, 11, 14}, spaced=set(range(16)))
    assert report["num_shapes"] == 16 * 39  # the idle-start iteration of each workload is not a busy gap
    for regime in ("decode", "mixed"):
        r = report["held_out_by_regime"][regime]
        assert r["mean_rel_error"] < 0.05 and abs(r["total_bias"]) < 0.02, (regime, r)
    assert model.idle_wake_s == pytest.approx(0.0015, abs=3e-4)
    assert report["idle_samples"] == 16


def test_the_wake_follows_how_long_the_engine_was_idle():
    bands = CostModel({**TRUTH, "idle_wake_s": 0.001, "idle_wake_by_idle": [[0.02, 0.001], [0.2, 0.003]]})
    assert bands.wake_after(0.005) == pytest.approx(0.001) and bands.wake_after(5.0) == pytest.approx(0.003)
    assert bands.wake_after(None) == pytest.approx(0.003)  # idle since the start: the longest measured idle
    assert bands.wake_after(0.2 ** 0.5 * 0.02 ** 0.5) == pytest.approx(0.002)  # halfway in log(idle)
    assert CostModel({**TRUTH, "idle_wake_s": 0.001}).wake_after(5.0) == 0.001  # no bands: one wake for all
    assert CostModel(bands.to_dict()).wake_after(0.1) == pytest.approx(bands.wake_after(0.1))  # survives JSON
    for bad in ([[0.2, 0.001], [0.02, 0.003]], [[0, 0.001]], [[0.1, -1.0]], [[0.1]], "fast", [[float("inf"), 0.001]]):
        with pytest.raises(ValueError, match="idle_wake_by_idle"):
            CostModel({**TRUTH, "idle_wake_by_idle": bad})


def test_calibration_measures_the_wake_at_each_idle_gap_and_the_simulator_replays_it():
    """A simulated device whose wake grows with the idle wait: calibration's spaced workloads (one per
    gap) recover it per gap, and a simulated engine with the fitted profile wakes alike."""
    from batchdeck.engine.sim.calibrate import IDLE_GAPS_S, wake_by_idle

    truth = CostModel({**TRUTH, "idle_wake_s": 0.002, "idle_wake_by_idle": [[0.02, 0.001], [0.1, 0.004]]})
    e = _sim("Test GPU", True)
    e.runner.cost = truth.for_limits(64, 512)
    tap = IterationTap(e)
    rng = random.Random(0)
    workloads = [w for w in design_workloads(8, 512, 4096, 4096 * 16, quick=True) if w.mode == "spaced"]
    assert [w.gap_s for w in workloads] == list(IDLE_GAPS_S[:2])
    for i, w in enumerate(workloads):
        tap.workload = i
        tap.idle()
        drive_inline(e, w, rng, float("inf"), e.clock)
    samples = tap.samples()
    bands = wake_by_idle(truth, samples, spaced={0, 1})
    assert [round(i, 2) for i, _ in bands] == [0.02, 0.1]
    assert [w for _, w in bands] == [pytest.approx(0.001, abs=2e-4), pytest.approx(0.004, abs=2e-4)]
    report = wake_report(truth, samples)
    timed = [s for s in samples if s.after_idle and s.idle_s is not None]  # all but the first ever iteration
    assert len(timed) == len([s for s in samples if s.after_idle]) - 1
    assert sum(r["samples"] for r in report) == len(timed)
    for r in report:
        assert r["measured_wake_median_s"] == pytest.approx(r["model_wake_median_s"], abs=2e-4)


def test_the_fit_prices_the_longer_of_host_and_device_when_the_waits_say_which_bound():
    """Overlapped iterations last max(host, device): few short rows are host-bound (their KV costs
    nothing), long contexts device-bound. From gaps and the host's waits the split fit recovers both;
    one linear model over the same iterations misprices the host-bound ones."""
    from batchdeck.engine.sim.cost_model import fit

    buckets = {k: TRUTH[k] for k in ("decode_buckets", "token_buckets", "max_rows")}
    device = CostModel(TRUTH)
    host = CostModel({**TRUTH, "decode": {"constant": 2.5e-3, "rows": 4e-5},
                      "mixed": {"constant": 3e-3, "rows": 5e-5, "tokens": 1e-6}})
    rng = np.random.default_rng(0)
    shapes, gaps, waits = [], [], []
    for _ in range(1500):
        rows = int(rng.integers(1, 64))
        ctx = int(rng.choice([100, 300, 3000, 8000]))
        chunks = [(int(rng.integers(ctx // 2, ctx)), 1) for _ in range(rows)]
        if rng.random() < 0.4:
            chunks.append((int(rng.integers(0, 2000)), int(rng.choice([32, 100, 400]))))
        shape = IterationShape.of_rows(chunks)
        h, d = host.predict(shape), device.predict(shape)
        shapes.append(shape)
        gaps.append(max(h, d) * (1 + rng.normal(0, 0.01)))
        waits.append(max(0.0, d - h))
    split = fit(shapes, gaps, **buckets, sync_waits=waits)
    linear = fit(shapes, gaps, **buckets)
    assert "host" in split.coefficients and "host" not in linear.coefficients
    err_split = np.array([abs(split.predict(s) - g) / g for s, g in zip(shapes, gaps)])
    err_linear = np.array([abs(linear.predict(s) - g) / g for s, g in zip(shapes, gaps)])
    assert err_split.mean() < 0.02 and err_split.mean() < err_linear.mean() / 2, (err_split.mean(), err_linear.mean())
    assert CostModel(split.to_dict()).predict(shapes[0]) == pytest.approx(split.predict(shapes[0]))  # survives JSON
    plan_rows = [(c, 1) for c in (120, 250, 90)]  # the hot path prices decode plans as predict does
    chunks = [dataclasses.make_dataclass("C", ["num_tokens", "start"])(n, c) for c, n in plan_rows]
    assert split.plan_seconds(chunks) == pytest.approx(split.predict(IterationShape.of_rows(plan_rows)))
    assert fit(shapes[:40], gaps[:40], **buckets, sync_waits=waits[:40]).coefficients.get("host") is None  # too few
    with pytest.raises(ValueError, match="host"):
        CostModel({**TRUTH, "host": {"decode": {}}})
    copied = split.to_dict()
    copied["host"]["decode"]["constant"] = 99.0  # an edit of the copy never reaches the model
    assert split.coefficients["host"]["decode"]["constant"] != 99.0
    # the analytic model's prefill: each chunk beyond the constant of the model that prices it
    host_bound = CostModel({**TRUTH, "host": {"decode": {"constant": 1.0}, "mixed": {"constant": 1.0, "tokens": 1e-6}}})
    assert host_bound.prefill_seconds(1000, 250) == pytest.approx(4 * 250 * 1e-6)
    device_bound = CostModel({**TRUTH, "host": {"decode": {"constant": 5e-3}, "mixed": {"constant": 5e-3}}})
    # two 250-token chunks (bucket 256) at context 0 and 250, beyond the device's 4 ms constant
    want = 2 * (2e-5 * 256 + 1e-5) + 1e-3 * (250 * 125.5 + 250 * 375.5) / 1e6
    assert device_bound.prefill_seconds(500, 250) == pytest.approx(want)


def test_the_fit_prices_prefill_attention_as_the_larger_of_its_work_and_its_longest_walk():
    """A device whose attention costs max(work, longest walk): chunks of many prompts fill the GPU (the
    work bounds them), one short chunk deep into a long prompt does not (its walk does). The split
    fit recovers it; a sum of both terms prices the deep single chunks high."""
    from batchdeck.engine.sim.cost_model import fit

    buckets = {k: TRUTH[k] for k in ("decode_buckets", "token_buckets", "max_rows")}
    truth = {**TRUTH, "mixed": {"constant": 1e-3, "padded_tokens": 2e-6, "attention": 2e-3, "decode_rows": 2e-5,
                                "prefill_max_context": 1e-3},
             "attention_max": True, "host": {"decode": {"constant": 1e-4}, "mixed": {"constant": 1e-4}}}
    device = CostModel(truth)
    rng = np.random.default_rng(1)
    shapes, gaps = [], []
    for _ in range(1200):
        if rng.random() < 0.5:  # many fresh prompts: the work bounds the kernel
            rows = [(0, int(rng.integers(64, 512))) for _ in range(int(rng.integers(2, 8)))]
        else:  # one chunk late in a long prompt: its walk does
            rows = [(int(rng.integers(500, 6000)), int(rng.choice([64, 128, 256])))]
        rows += [(int(rng.integers(10, 2000)), 1) for _ in range(int(rng.integers(0, 4)))]
        shape = IterationShape.of_rows(rows)
        shapes.append(shape)
        gaps.append(device.predict(shape) * (1 + rng.normal(0, 0.01)))
    decode_only = [IterationShape.of_rows([(int(rng.integers(10, 3000)), 1)] * int(rng.integers(1, 32)))
                   for _ in range(200)]
    shapes += decode_only
    gaps += [device.predict(s) for s in decode_only]
    waits = [g - 1e-4 for g in gaps]  # the host waited for the device on every iteration
    model = fit(shapes, gaps, **buckets, sync_waits=waits)
    assert model.coefficients.get("attention_max") is True
    deep = [(s, g) for s, g in zip(shapes, gaps) if s.prefill_rows == 1 and s.prefill_max_context > 2]
    err = np.mean([abs(model.predict(s) - g) / g for s, g in deep])
    summed = CostModel({**model.to_dict(), "attention_max": False})  # the same coefficients, summed
    err_summed = np.mean([abs(summed.predict(s) - g) / g for s, g in deep])
    assert err < 0.03 and err_summed > 2 * err, (err, err_summed)
    assert CostModel(model.to_dict()).predict(deep[0][0]) == pytest.approx(model.predict(deep[0][0]))
    with pytest.raises(ValueError, match="attention_max"):
        CostModel({**TRUTH, "attention_max": "yes"})


def test_busy_gaps_skip_idle_starts_and_workload_boundaries():
    s = [Sample(0, 1.0, IterationShape(decode_rows=1, decode_context=0.1), True, 0.9),
         Sample(0, 1.01, IterationShape(decode_rows=1, decode_context=0.1), False, 0.9),
         Sample(1, 3.0, IterationShape(decode_rows=1, decode_context=0.1), False, 2.9)]
    gaps = busy_gaps(s)
    assert len(gaps) == 1 and gaps[0][1] == pytest.approx(0.01)


def test_calibrate_lets_its_engine_go_before_it_returns(monkeypatch):
    """A caller may build an engine right after (the accuracy benchmark does): the calibration's engine,
    and with it its KV pool, must be gone by then, without the caller collecting cycles."""
    import gc
    import weakref

    from batchdeck.engine.sim import calibrate as cal

    built = []

    class Recorded(cal.LLMEngine):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(weakref.ref(self))

    monkeypatch.setattr(cal, "LLMEngine", Recorded)
    gc.disable()  # no collection by chance: only calibrate's own
    try:
        cal.calibrate("synthetic:tiny", device="cpu", quick=True, max_num_seqs=4, max_batched_tokens=64,
                      num_blocks=256, budget_s=30.0, log=lambda line: None)
        assert built and all(ref() is None for ref in built)
    finally:
        gc.enable()


def test_the_samples_a_fit_saw_are_written_as_json_lines(tmp_path):
    import json

    from batchdeck.engine.sim.calibrate import write_samples

    s = [Sample(0, 1.0, IterationShape(decode_rows=1, decode_context=0.1), True, 0.9),
         Sample(0, 1.01, IterationShape(prefill_tokens=30, prefill_rows=1, decode_rows=2), False, 0.9, 0.004),
         Sample(1, 3.0, IterationShape(decode_rows=1, decode_context=0.1), False, 2.9)]
    path = tmp_path / "samples.jsonl"
    assert write_samples(str(path), s, {0: "serving", 1: "decode"}) == 1  # the busy gaps only
    (row,) = [json.loads(line) for line in path.read_text().splitlines()]
    assert row["gap_s"] == pytest.approx(0.01) and row["sync_wait_s"] == 0.004 and row["kind"] == "serving"
    assert IterationShape(**{f.name: row[f.name] for f in dataclasses.fields(IterationShape)}) == s[1].shape


def test_the_tap_records_each_iteration_of_a_real_engine_and_gives_it_back():
    from batchdeck.engine.llm_engine import LLMEngine

    cfg = EngineConfig(model="synthetic:tiny", device="cpu", dtype="float32", num_blocks=128,
                       max_num_seqs_limit=4, max_batched_tokens_limit=64, spec_k_limit=0)
    engine = LLMEngine(cfg, LiveConfig(max_num_seqs=4, max_batched_tokens=64, chunk_size=64))
    tap = IterationTap(engine)
    w = design_workloads(4, 64, engine.max_model_len, 128 * 16, quick=True)[0]
    drive_inline(engine, w, random.Random(0))
    tap.remove()
    assert "step" not in vars(engine) and "schedule" not in vars(engine.scheduler)
    samples = tap.samples()
    assert len(samples) == engine.iteration and samples[0].after_idle
    assert sum(s.shape.tokens for s in samples) == sum(p + o - 1 for p, o in w.requests)
    assert all(b.time > a.time for a, b in zip(samples, samples[1:]))


@pytest.mark.parametrize("overlap", [False, True])
def test_the_tap_pairs_each_iteration_with_the_plan_it_executed(overlap):
    """With overlapped iterations the scheduler has planned iteration N+1 when N is booked: each
    sample must still carry N's own shape (here checked against N's telemetry record)."""
    from batchdeck.engine.llm_engine import LLMEngine
    from batchdeck.engine.telemetry import ListSink

    cfg = EngineConfig(model="synthetic:tiny", device="cpu", dtype="float32", num_blocks=128,
                       max_num_seqs_limit=4, max_batched_tokens_limit=64, spec_k_limit=0, async_scheduling=overlap)
    sink = ListSink()
    engine = LLMEngine(cfg, LiveConfig(max_num_seqs=4, max_batched_tokens=64, chunk_size=32), sink=sink)
    tap = IterationTap(engine)
    for i, (p, o) in enumerate([(40, 3), (70, 5), (10, 2)]):
        engine.add_request(f"r{i}", [7 + i] * p, SamplingParams(max_tokens=o, ignore_eos=True))
    engine.run_until_done()
    tap.remove()
    assert "step" not in vars(engine) and "launch" not in vars(engine.runner)
    samples, records = tap.samples(), sink.iterations
    assert any(r.overlapped for r in records) == overlap
    assert len(samples) == len(records) == engine.iteration
    for s, r in zip(samples, records):
        assert (s.shape.prefill_tokens, s.shape.prefill_rows) == (r.num_prefill_tokens, r.num_prefill_chunks)
        assert s.shape.decode_rows == r.num_decode_tokens
        assert s.time <= r.time  # a CPU launch computes the iteration: it ended when the launch returned
    assert all(b.time > a.time for a, b in zip(samples, samples[1:]))


def test_the_simulator_adds_the_idle_wake_to_an_iteration_after_idle_only():
    profile = SimProfile(name="t", model="synthetic:tiny", device_name="Test GPU", dtype="bfloat16", block_size=16,
                         num_blocks=4096, kv_bytes_per_block=1024,
                         model_shape={"vocab_size": 512, "max_model_len": 4096, "eos_token_ids": [1]},
                         cost=CostModel({**TRUTH, "idle_wake_s": 0.004}))
    e = SimulatedEngine(EngineConfig(sim="unused", max_num_seqs_limit=64, max_batched_tokens_limit=512),
                        LiveConfig(max_num_seqs=8, max_batched_tokens=512, chunk_size=512), profile=profile,
                        clock=VirtualClock())
    e.add_request("a", [5] * 100, SamplingParams(max_tokens=3, ignore_eos=True))
    first = e.step().record.time
    assert first == pytest.approx(0.004 + e.runner.cost.predict(IterationShape.of_rows([(0, 100)])))
    t = e.clock()
    e.add_request("b", [6] * 100, SamplingParams(max_tokens=3, ignore_eos=True))  # the engine is busy: no wake
    e.step()
    assert e.clock() - t == pytest.approx(e.runner.cost.predict(IterationShape.of_rows([(100, 1), (0, 100)])))
    assert e.runner.cost.coefficients["decode_buckets"][-1] == 64  # buckets follow the engine's own limits


def _sim(device_name: str, overlap: bool) -> SimulatedEngine:
    profile = SimProfile(name="t", model="synthetic:tiny", device_name=device_name, dtype="bfloat16", block_size=16,
                         num_blocks=4096, kv_bytes_per_block=1024,
                         model_shape={"vocab_size": 512, "max_model_len": 4096, "eos_token_ids": [1]},
                         cost=CostModel(TRUTH))
    return SimulatedEngine(EngineConfig(sim="unused", max_num_seqs_limit=64, max_batched_tokens_limit=512,
                                        async_scheduling=overlap),
                           LiveConfig(max_num_seqs=8, max_batched_tokens=512, chunk_size=512), profile=profile,
                           clock=VirtualClock())


@pytest.mark.parametrize("overlap", [False, True])
def test_a_restarted_clock_starts_the_simulated_device_afresh(overlap):
    """What ran on the old clock is not in the new clock's future: the first iteration after a restart
    ends its own cost (plus the wake after an idle since the start) after zero."""
    e = _sim("Test GPU", overlap)
    e.add_request("a", [5] * 100, SamplingParams(max_tokens=20, ignore_eos=True))
    while e.has_unfinished:
        e.step()
    assert e.clock() > 0.01
    e.restart_clock()
    e.add_request("b", [6] * 100, SamplingParams(max_tokens=3, ignore_eos=True))
    first = next(r for r in iter(e.step, None) if r.record is not None).record.time
    assert first == pytest.approx(e.runner.cost.predict(IterationShape.of_rows([(0, 100)])))


@pytest.mark.parametrize("overlap", [False, True])
def test_the_simulator_overlaps_iterations_as_the_gpu_engine_does(overlap):
    """On a GPU profile with async scheduling, the iteration launched while another runs starts when
    that one ends and was planned before it: a request arriving while iteration N runs is computed in
    N + 2 (N + 1 was planned already), not N + 1. Busy gaps stay each booked iteration's own cost."""
    e = _sim("Test GPU", overlap)
    assert e.overlapping == overlap
    e.add_request("a", [5] * 100, SamplingParams(max_tokens=6, ignore_eos=True))
    results = [e.step()]
    e.add_request("b", [6] * 100, SamplingParams(max_tokens=2, ignore_eos=True))  # while the next one runs
    while e.has_unfinished:
        r = e.step()
        if r is not None:
            results.append(r)
    cost = e.runner.cost
    t = 0.0
    for r in results:
        t += cost.plan_seconds(r.plan.chunks)
        assert r.record.time == pytest.approx(t)
    b = e.requests["b"]
    assert b.first_token_iteration == (2 if overlap else 1)
    assert b.ttft == pytest.approx(sum(cost.plan_seconds(r.plan.chunks) for r in results[1:b.first_token_iteration + 1]))


def test_a_cpu_profile_with_overlap_books_an_iteration_after_the_next_one_computed():
    """A CPU launch computes the iteration: with overlap, N is booked once N + 1 has run."""
    e = _sim("CPU (x86_64)", True)
    e.add_request("a", [5] * 100, SamplingParams(max_tokens=4, ignore_eos=True))
    first = e.step()
    cost = e.runner.cost
    assert first.iteration == 0 and e._inflight is not None
    assert first.record.time == pytest.approx(cost.plan_seconds(first.plan.chunks)
                                              + cost.plan_seconds(e._inflight.plan.chunks))


def test_a_simulated_engine_overlaps_iterations_as_its_profile_was_calibrated_unless_told(tmp_path):
    from batchdeck.engine.config import resolve_configs

    for fit, given, want in (({"async_scheduling": True}, {}, True), ({}, {}, False),
                             ({"async_scheduling": True}, {"async_scheduling": False}, False),
                             ({}, {"async_scheduling": True}, True)):
        profile = _sim("Test GPU", False).profile
        path = tmp_path / "p.json"
        SimProfile(**{**{k: getattr(profile, k) for k in ("name", "model", "device_name", "dtype", "block_size",
                                                         "num_blocks", "kv_bytes_per_block", "model_shape", "cost")},
                      "fit": fit}).save(path)
        cfg, _ = resolve_configs({"sim": str(path), **given}, cuda_available=False)
        assert cfg.async_scheduling is want, (fit, given)


@pytest.mark.parametrize("overlap", [False, True])
def test_an_arrival_on_virtual_time_is_seen_by_the_next_iteration_that_starts(overlap):
    """On virtual time, what is due when an iteration ends (an arrival's timer, the task it wakes, the
    task that submits) runs before the next iteration starts, as a real engine's next step sees what
    arrived while the previous one ran: the request is planned at the first iteration boundary after
    its arrival, however many loop turns its submission takes."""
    import asyncio

    from batchdeck.engine.service.virtual_loop import InlineAsyncEngine, run_virtual

    e = _sim("Test GPU", overlap)
    clock = e.clock
    step_s = e.runner.cost.predict(IterationShape.of_rows([(200, 1)]))

    async def main():
        engine = InlineAsyncEngine(e)
        await engine.start()
        long = await engine.add_request("long", [5] * 20, SamplingParams(max_tokens=400, ignore_eos=True))
        arrivals = [0.0101 + 0.0137 * k for k in range(6)]
        streams = []

        async def submit(k, at):
            streams.append(await engine.add_request(f"r{k}", [6] * 20, SamplingParams(max_tokens=2, ignore_eos=True),
                                                    arrival_time=at))

        for k, at in enumerate(arrivals):
            await asyncio.sleep(at - clock())
            asyncio.get_running_loop().create_task(submit(k, at))  # one more loop turn, as the workload player
        await long.collect()
        for s in streams:
            await s.collect()
        await engine.stop()

    run_virtual(main(), clock)
    for k in range(6):
        r = e.requests[f"r{k}"]
        assert r.first_scheduled_time - r.arrival_time <= 1.5 * step_s, (k, r.first_scheduled_time - r.arrival_time)


def test_an_abort_on_virtual_time_ends_the_stream_with_its_reason_and_the_tokens_held_back():
    """InlineAsyncEngine holds a stream's tokens until the request finishes; an abort hands them over
    and ends the stream with the abort's reason, as AsyncEngine does."""
    import asyncio

    from batchdeck.engine.service.virtual_loop import InlineAsyncEngine, run_virtual

    e = _sim("Test GPU", False)

    async def main():
        engine = InlineAsyncEngine(e)
        await engine.start()
        stream = await engine.add_request("r", [5] * 20, SamplingParams(max_tokens=400, ignore_eos=True))
        while e.requests["r"].num_output_tokens < 3:
            await asyncio.sleep(0.001)  # virtual time: the engine steps meanwhile
        assert await engine.abort("r", "abort")
        await stream.collect()
        await engine.stop()
        return stream

    stream = run_virtual(main(), e.clock)
    assert stream.finished and len(stream.token_ids) == e.requests["r"].num_output_tokens >= 3
    assert stream.finish_reason == "abort"


def test_check_iterations_reports_the_models_bias_per_regime():
    from batchdeck.engine.sim.calibrate import check_iterations

    truth = CostModel(TRUTH)
    samples = synthetic_samples(truth, 0.0)
    slow = CostModel({**TRUTH, "decode": {k: 1.25 * v for k, v in TRUTH["decode"].items()}})
    check = check_iterations(slow, samples)
    assert check["busy_iterations"] == 16 * 39
    dec, mix = check["by_regime"]["decode"], check["by_regime"]["mixed"]
    assert dec["total_bias"] == pytest.approx(0.25) and dec["median_bias"] == pytest.approx(0.25)
    assert abs(mix["total_bias"]) < 1e-9 and mix["mean_rows"] >= 1 and mix["mean_tokens"] > dec["mean_tokens"]


def test_check_iterations_names_the_longest_gaps():
    from batchdeck.engine.sim.calibrate import check_iterations

    truth = CostModel(TRUTH)
    samples = synthetic_samples(truth, 0.0)
    stalled = samples[100]
    for s in samples[100:]:  # a 0.2 s stall before iteration 100 of its workload shifts it and all after it
        s.time += 0.2 if s.workload == stalled.workload else 0.0
    check = check_iterations(truth, samples)
    top = check["largest_gaps"][0]
    assert len(check["largest_gaps"]) == 5
    assert top["gap_s"] == pytest.approx(0.2 + truth.predict(stalled.shape))
    assert top["predicted_s"] == pytest.approx(truth.predict(stalled.shape))
    assert top["rows"] == stalled.shape.rows
    assert check["largest_gaps"][1]["gap_s"] < 0.2


SPLITS = {"kv_heads": 8, "num_sms": 132, "max_splits": 32}  # an H200's 132 SMs, a model with 8 KV heads


def test_the_cost_model_prices_with_the_attention_backends_split_rule():
    """One rule, imported by both (engine/attention/decode_splits.py): the backend cuts a row's keys the
    way the cost model assumes."""
    from batchdeck.engine.attention.decode_splits import decode_splits
    from batchdeck.engine.sim import cost_model

    assert cost_model.split_count is decode_splits
    pytest.importorskip("triton")
    from batchdeck.engine.attention import triton_backend

    assert triton_backend.decode_splits is decode_splits


def test_the_profile_records_the_split_rule_of_a_triton_backend_on_a_gpu():
    """calibrate's `decode_split_rule`: what the cost model's longest-row term needs from the backend the
    calibration ran (its SM count and cap, the model's KV heads); nothing for another backend or device."""
    from types import SimpleNamespace

    from batchdeck.engine.sim.calibrate import decode_split_rule

    def engine(name="triton", device="cuda", num_sms=132):
        return SimpleNamespace(backend=SimpleNamespace(name=name, num_sms=num_sms, max_splits=32),
                               device=SimpleNamespace(type=device), loaded=SimpleNamespace(num_kv_heads=8))

    assert decode_split_rule(engine()) == SPLITS
    assert decode_split_rule(engine(name="torch")) is None
    assert decode_split_rule(engine(device="cpu")) is None
    assert decode_split_rule(engine(num_sms=None)) is None  # the backend never ran a decode


def test_a_batch_of_mixed_lengths_costs_what_its_longest_row_costs_while_the_kernel_does_not_fill_the_gpu():
    """`max_context`: the longest decode row over the KV slices the kernel splits rows into (split
    count from the graph bucket's rows: 16 rows x 8 KV heads = 128 programs -> 2 slices on 132 SMs;
    32 rows -> 1)."""
    from batchdeck.engine.request import Request
    from batchdeck.engine.step_plan import ScheduledChunk
    from batchdeck.engine.sim.cost_model import split_count

    assert [split_count(r, 8, 132, 32) for r in (1, 2, 4, 8, 16, 17, 32, 64)] == [32, 16, 8, 4, 2, 1, 1, 1]
    cm = CostModel({**TRUTH, "decode": {"constant": 1e-3, "context": 1e-5, "max_context": 2e-4},
                    "decode_splits": SPLITS})
    even = [(500, 1)] * 24
    skewed = [(100, 1)] * 20 + [(2500, 1)] * 4  # the same total context, four long rows
    d = lambda rows: cm.predict(IterationShape.of_rows(rows))  # noqa: E731
    assert d(skewed) - d(even) == pytest.approx(2e-4 * (2.501 - 0.501))  # 24 rows pad to 32: one slice
    assert d([(999, 1)] * 10) == pytest.approx(1e-3 + 1e-5 * 10 + 2e-4 * 1.0 / 2)  # 10 rows pad to 16: two slices
    chunks = [ScheduledChunk(Request(str(i), [1] * (c + 1)), c, 1, True, True) for i, (c, _) in enumerate(skewed)]
    random.Random(0).shuffle(chunks)
    assert cm.plan_seconds(chunks) == pytest.approx(d(skewed))  # the simulator's hot path charges it too
    mixed = CostModel({**TRUTH, "mixed": {"constant": 4e-3, "decode_max_context": 1e-3}, "decode_splits": SPLITS})
    # 100 prefill tokens over 5 rows: the 128-token graph (its decode kernel runs 64 rows: one slice)
    assert mixed.predict(IterationShape.of_rows([(0, 100)] + [(1999, 1)] * 4)) == pytest.approx(4e-3 + 2e-3)
    # a profile written before the feature (no max_context, no decode_splits) prices both batches alike
    assert CostModel(TRUTH).predict(IterationShape.of_rows(skewed)) == pytest.approx(
        CostModel(TRUTH).predict(IterationShape.of_rows(even)))
    with pytest.raises(ValueError, match="decode_splits"):
        CostModel({**TRUTH, "decode_splits": {"kv_heads": 8}})


def test_the_fit_recovers_the_longest_row_term_from_ramps_whose_contexts_spread():
    """Iteration times whose decode part follows the longest row (over its split count): fitted on
    ramps of equal contexts and ramps of spread contexts, the model prices a serving load's batches
    (short rows and a few long ones) within 3%; the sum-of-context model without that term cannot."""
    from batchdeck.engine.sim.cost_model import fit

    truth = CostModel({**TRUTH, "decode": {"constant": 1.3e-3, "rows": 5e-6, "context": 1e-5, "max_context": 4e-4},
                       "decode_splits": SPLITS})
    buckets = {k: TRUTH[k] for k in ("decode_buckets", "token_buckets", "max_rows")}
    rng = np.random.default_rng(1)
    shapes = []
    for b in (4, 16, 48, 64):
        for c in (64, 512, 2048):  # even contexts, the batch shrinking from b to 1
            shapes += [IterationShape.of_rows([(c + k, 1)] * r) for k, r in enumerate(range(b, 0, -1))]
        ctxs = [int(64 * 32 ** (i / (b - 1))) for i in range(b)]  # 64 .. 2048
        rng.shuffle(ctxs)
        shapes += [IterationShape.of_rows([(c + k, 1) for c in ctxs[:r]]) for k, r in enumerate(range(b, 0, -1))]
    seconds = [truth.predict(s) * (1 + rng.normal(0, 0.01)) for s in shapes]
    serving = [IterationShape.of_rows([(int(rng.integers(50, 400)), 1) for _ in range(30)]
                                      + [(int(rng.integers(900, 1500)), 1) for _ in range(3)]) for _ in range(50)]
    want = np.array([truth.predict(s) for s in serving])
    model = fit(shapes, seconds, decode_splits=SPLITS, **buckets)
    got = np.array([model.predict(s) for s in serving])
    assert abs(got.sum() / want.sum() - 1) < 0.03
    assert model.coefficients["decode"]["max_context"] == pytest.approx(4e-4, rel=0.15)
    assert model.coefficients["decode_splits"] == SPLITS
    no_max = CostModel({**model.to_dict(), "decode": {**model.coefficients["decode"], "max_context": 0.0}})
    refit = fit([IterationShape(s.prefill_tokens, s.prefill_attention, s.decode_rows, s.decode_context, s.prefill_rows)
                 for s in shapes], seconds, **buckets)  # no longest-row values: the old model's view
    assert abs(np.array([refit.predict(s) for s in serving]).sum() / want.sum() - 1) > 0.05
    assert no_max.predict(serving[0]) < model.predict(serving[0])


def test_the_fit_recovers_the_longest_prefill_walk_from_chunks_of_long_prompts():
    """Mixed iterations whose attention ends with the longest key walk of a prefill chunk (ctx + n):
    fitted on chunked prompts of several lengths beside decode rows, the model prices a serving load's
    iterations (short prompts' chunks beside decode rows) within 3% and a short chunk late in a long
    prompt within 5%; without the term it cannot."""
    from batchdeck.engine.sim.cost_model import fit

    truth = CostModel({**TRUTH, "mixed": {**TRUTH["mixed"], "constant": 1e-3, "prefill_max_context": 8e-4}})
    buckets = {k: TRUTH[k] for k in ("decode_buckets", "token_buckets", "max_rows")}
    rng = np.random.default_rng(2)
    shapes = []
    for prompt in (256, 1024, 2048, 4096):
        for chunk in (32, 128, 512):
            for start in range(0, prompt - chunk + 1, chunk):
                decodes = [(int(rng.integers(50, 1500)), 1) for _ in range(int(rng.integers(0, 40)))]
                shapes.append(IterationShape.of_rows([(start, chunk)] + decodes))
    seconds = [truth.predict(s) * (1 + rng.normal(0, 0.01)) for s in shapes]
    serving = [IterationShape.of_rows([(0, int(rng.integers(40, 400)))]
                                      + [(int(rng.integers(50, 600)), 1) for _ in range(30)]) for _ in range(50)]
    want = np.array([truth.predict(s) for s in serving])
    model = fit(shapes, seconds, **buckets)
    assert abs(np.array([model.predict(s) for s in serving]).sum() / want.sum() - 1) < 0.03
    assert model.coefficients["mixed"]["prefill_max_context"] == pytest.approx(8e-4, rel=0.15)
    late = IterationShape.of_rows([(3900, 128)])  # a short chunk at the end of a long prompt
    assert model.predict(late) == pytest.approx(truth.predict(late), rel=0.05)
    blind = fit([IterationShape(s.prefill_tokens, s.prefill_attention, s.decode_rows, s.decode_context,
                                s.prefill_rows, s.decode_max_context) for s in shapes], seconds, **buckets)
    assert abs(np.array([blind.predict(s) for s in serving]).sum() / want.sum() - 1) > 0.05
    blind_late = IterationShape(late.prefill_tokens, late.prefill_attention, prefill_rows=1)
    assert abs(blind.predict(blind_late) / truth.predict(late) - 1) > 0.1


def test_the_designed_decode_ramps_include_batches_whose_longest_row_is_far_above_the_mean():
    ws = design_workloads(64, 2048, 8192, 200_000 * 16)
    spread = [w for w in ws if w.kind == "decode" and len({p for p, _ in w.requests}) > 1]
    assert len(spread) >= 4 and max(len(w.requests) for w in spread) >= 32
    for w in spread:
        ctx = [p for p, _ in w.requests]
        assert max(ctx) >= 2.5 * (sum(ctx) / len(ctx))
        by_ctx = sorted(range(len(ctx)), key=ctx.__getitem__)
        by_out = sorted(range(len(ctx)), key=lambda i: w.requests[i][1])
        assert by_ctx != by_out and by_ctx != by_out[::-1]  # the batch's longest row changes as rows finish


def test_check_iterations_splits_the_gap_into_the_wait_for_the_device_and_the_host():
    from batchdeck.engine.sim.calibrate import check_iterations

    truth = CostModel(TRUTH)
    samples = synthetic_samples(truth, 0.0)
    for s in samples:
        s.sync_wait = 0.6 * truth.predict(s.shape)  # the device bounded each iteration; the host took 40%
    dec = check_iterations(truth, samples)["by_regime"]["decode"]
    assert dec["sync_wait_mean_s"] == pytest.approx(0.6 * dec["measured_mean_s"], rel=0.02)
    assert dec["host_mean_s"] == pytest.approx(0.4 * dec["measured_mean_s"], rel=0.02)
    assert dec["mean_max_context_k"] >= dec["mean_context_k"]


def test_a_profile_calibrated_on_a_device_whose_decode_follows_the_longest_row_prices_a_steady_replay(tmp_path):
    """End to end on a simulated device whose iteration time has a longest-row term (`truth`): the
    designed workloads played on it and fitted give a model that prices a steady Poisson replay's own
    iterations (short chats and a few long jobs in every batch) without bias, as it prices the held-out
    serving mix; the model as fitted before the term existed (no longest-row values, no spread ramps,
    no serving mix) underprices the replay's decode iterations, as the real steady replay's were, and
    its error on the held-out serving mix says so before any replay."""
    import textwrap

    from batchdeck.engine.sim.calibrate import check_iterations
    from batchdeck.presets.replay import run_preset

    truth = {**TRUTH, "decode": {"constant": 1.3e-3, "rows": 5e-6, "context": 1e-5, "max_context": 4e-4},
             "mixed": {"constant": 2.3e-3, "padded_tokens": 1e-6, "attention": 1.5e-3, "decode_context": 1e-5,
                       "decode_max_context": 4e-4},
             "token_buckets": [32, 64, 128, 256, 512, 768, 1024, 1536, 2048], "decode_splits": SPLITS}
    profile = SimProfile(name="truth", model="synthetic:tiny", device_name="Test GPU", dtype="bfloat16",
                         block_size=16, num_blocks=20000, kv_bytes_per_block=1024,
                         model_shape={"vocab_size": 512, "max_model_len": 8192, "eos_token_ids": [1]},
                         cost=CostModel(truth))
    e = SimulatedEngine(EngineConfig(sim="unused", max_num_seqs_limit=64, max_batched_tokens_limit=2048),
                        LiveConfig(max_num_seqs=64, max_batched_tokens=2048, chunk_size=512), profile=profile,
                        clock=VirtualClock())
    ws = [w for w in design_workloads(64, 2048, e.max_model_len, 20000 * 16) if w.kind != "idle"]
    tap = IterationTap(e)
    rng = random.Random(0)
    for i, w in enumerate(ws):
        tap.workload = i
        tap.idle()
        drive_inline(e, w, rng)
    tap.remove()
    samples = tap.samples()
    buckets = {k: truth[k] for k in ("decode_buckets", "token_buckets", "max_rows")}
    kinds = {i: w.kind for i, w in enumerate(ws)}
    held = held_out_workloads(ws)
    model, report = fit_samples(samples, {**buckets, "decode_splits": SPLITS}, held, kinds=kinds)
    new_designs = {i for i, w in enumerate(ws) if ".." in w.name or (w.kind == "serving" and i not in held)}
    before = [Sample(s.workload, s.time, IterationShape(s.shape.prefill_tokens, s.shape.prefill_attention,
                                                        s.shape.decode_rows, s.shape.decode_context,
                                                        s.shape.prefill_rows), s.after_idle, s.newest_arrival)
              for s in samples if s.workload not in new_designs]
    _, old_report = fit_samples(before, buckets, held, kinds=kinds)  # its first fit sees no serving mix
    old, _ = fit_samples([s for s in before if kinds[s.workload] != "serving"], buckets, set())
    assert abs(report["held_out_by_kind"]["serving"]["decode"]["total_bias"]) < 0.02
    assert old_report["held_out_by_kind"]["serving"]["decode"]["total_bias"] < -0.08

    profile.save(path := tmp_path / "truth.json")
    preset = tmp_path / "steady.yaml"
    preset.write_text(textwrap.dedent("""\
        name: steady
        description: chats and a few long jobs, Poisson
        model: synthetic:tiny
        config: {policy: fcfs, max_num_seqs: 64, max_batched_tokens: 2048, chunk_size: 512}
        workload:
          - {kind: poisson, rate: 120, duration: 3, input_tokens: {dist: lognormal, mean: 192, sigma: 0.6, max: 1024},
             output_tokens: {dist: uniform, min: 16, max: 128}}
          - {kind: poisson, rate: 20, duration: 3, input_tokens: {dist: normal, mean: 768, std: 200, min: 256, max: 1536},
             output_tokens: {dist: uniform, min: 64, max: 192}}
        timeline: []
        seed: 42
        """))
    taps = []
    run_preset(str(preset), overrides={"sim": str(path), "max_num_seqs_limit": 64, "max_batched_tokens_limit": 2048},
               on_start=lambda d: taps.append(IterationTap(d.engine.engine)))
    replayed = taps[0].samples()
    new_check = check_iterations(model.for_limits(64, 2048), replayed)["by_regime"]
    old_check = check_iterations(old.for_limits(64, 2048), replayed)["by_regime"]
    dec = new_check["decode"]
    assert dec["samples"] > 200 and dec["mean_max_context_k"] > 2 * dec["mean_context_k"]  # short rows, long ones
    for regime in ("decode", "mixed"):
        assert abs(new_check[regime]["total_bias"]) < 0.02, (regime, new_check[regime])
    assert old_check["decode"]["total_bias"] < -0.08, old_check["decode"]


def test_the_fit_reports_its_held_out_error_per_workload_kind():
    truth = CostModel(TRUTH)
    samples = synthetic_samples(truth, 0.02)
    buckets = {k: TRUTH[k] for k in ("decode_buckets", "token_buckets", "max_rows")}
    kinds = {w: "serving" if w in (3, 11) else "mixed" if w % 2 == 0 else "decode" for w in range(16)}
    _, report = fit_samples(samples, buckets, held_out={3, 6, 11, 14}, kinds=kinds)
    by_kind = report["held_out_by_kind"]
    assert set(by_kind) == {"serving", "mixed"}  # the kinds of the held-out workloads
    assert by_kind["serving"]["decode"]["samples"] == 2 * 39  # workloads 3 and 11: decode-only (odd)
    assert "held_out_by_kind" not in fit_samples(samples, buckets, held_out={3, 6})[1]


@pytest.mark.parametrize("max_context", [330, 400, 511, 600])
def test_workloads_fit_a_short_max_model_len(max_context):
    """A context limit too short for the spread ramps at 256 rows leaves them out (no complex power of a
    negative ratio); every request still fits the limit."""
    ws = design_workloads(256, 8192, max_context, 1 << 20)
    assert ws and all(p + o <= max_context for w in ws for p, o in w.requests)


def test_a_max_model_len_too_short_for_any_workload_is_refused_by_name():
    with pytest.raises(ValueError, match="max_model_len is 300 tokens.*at least 321"):
        design_workloads(16, 512, 300, 1 << 20)


# -- playing the workloads: the inline driver, the budget's deadlines --------------------------------------
SMALL = ["--model", "synthetic:tiny", "--device", "cpu", "--quick", "--max-num-seqs", "4",
         "--max-batched-tokens", "64", "--num-blocks", "256"]  # the CPU smoke settings of tests/test_sim.py


def test_deadlines_give_each_workload_its_share_of_the_budget_counted_from_the_start():
    from batchdeck.engine.sim.calibrate import deadlines

    ws = design_workloads(4, 64, 2048, 256 * 16, quick=True)[:4]
    assert deadlines(ws, 8.0, 100.0) == [102.0, 104.0, 106.0, 108.0]


def test_calibrate_inline_plays_every_workload_to_the_end_by_stepping_the_engine_in_the_calling_thread(
        tmp_path, monkeypatch):
    """`batchdeck calibrate --inline`: no serving loop, the engine stepped in this thread, every
    request of every designed workload computed to its last token, and the profile says so."""
    import threading

    from batchdeck.cli import main
    from batchdeck.engine.llm_engine import LLMEngine
    from batchdeck.engine.service import calibration_driver
    from batchdeck.engine.sim.profile import load_profile

    def serving_loop(*args, **kwargs):
        raise AssertionError("--inline played the workloads through the serving loop")

    monkeypatch.setattr(calibration_driver, "drive_through_service", serving_loop)
    threads, tokens, limits = set(), [0], {}
    step = LLMEngine.step

    def step_here(engine):
        threads.add(threading.get_ident())
        limits["max_model_len"] = engine.max_model_len
        result = step(engine)
        if result is not None:
            tokens[0] += result.record.num_prefill_tokens + result.record.num_decode_tokens
        return result

    monkeypatch.setattr(LLMEngine, "step", step_here)
    out = tmp_path / "inline.json"
    assert main(["calibrate", "--inline", *SMALL, "--out", str(out)]) == 0
    p = load_profile(out)
    ws = design_workloads(4, 64, limits["max_model_len"], 256 * 16, quick=True)
    assert p.fit["driver"] == "inline" and p.fit["num_workloads"] == len(ws) and p.fit["cut_short"] == []
    assert threads == {threading.get_ident()}
    assert tokens[0] == sum(pr + o - 1 for w in ws for pr, o in w.requests)  # every request to its last token
    spaced = [w for w in ws if w.mode == "spaced"]
    assert p.fit["idle_samples"] == sum(len(w.requests) for w in spaced)  # each spaced request woke an idle engine
    assert p.fit["num_shapes"] >= 5 and p.fit["held_out_mean_rel_error"] is not None


def test_a_workload_past_its_share_of_the_budget_is_cut_short_and_the_fit_report_names_it():
    """The inline driver on a clock of the test's own (one tick per engine iteration) with a budget of
    ten ticks a workload: a workload that needs more iterations than its deadline leaves (the first, a
    decode ramp over contexts up to 512 tokens at 64 tokens an iteration, certainly does) stops there,
    its unfinished requests aborted and the rest never sent; one within it (4 prompts of 128 tokens in
    8 iterations) finishes. The fit report names exactly the workloads whose requests did not all finish."""
    from batchdeck.engine.request import FinishReason
    from batchdeck.engine.sim.calibrate import calibrate, drive_all_inline

    added: dict[str, list] = {}
    seen: dict = {}

    def driver(engine, workloads, tap, log, budget_s):
        tick = budget_s / (10 * len(workloads))
        add = engine.add_request

        def add_request(rid, *args, **kwargs):
            req = add(rid, *args, **kwargs)
            added.setdefault(rid[len("cal-"):].rsplit("-", 1)[0], []).append(req)
            return req

        engine.add_request = add_request
        try:
            cut = drive_all_inline(engine, workloads, tap, log, budget_s, clock=lambda: engine.iteration * tick)
        finally:
            del engine.add_request
        seen.update(workloads=workloads, iterations=engine.iteration, unfinished=engine.has_unfinished)
        return cut

    lines: list[str] = []
    p = calibrate("synthetic:tiny", device="cpu", quick=True, max_num_seqs=4, max_batched_tokens=64, num_blocks=256,
                  budget_s=60.0, driver=driver, log=lines.append)
    ws = seen["workloads"]
    incomplete = [w.name for w in ws if len(added.get(w.name, ())) < len(w.requests)
                  or any(r.finish_reason != FinishReason.LENGTH for r in added[w.name])]
    assert ws[0].name in incomplete and ws[2].name not in incomplete and ws[2].kind == "prefill"
    assert p.fit["cut_short"] == incomplete and p.fit["budget_s"] == 60.0
    assert any(r.finish_reason == FinishReason.ABORT for r in added[ws[0].name])  # cut mid-way, not skipped
    assert not seen["unfinished"] and all(r.is_finished for reqs in added.values() for r in reqs)
    assert seen["iterations"] <= 10 * len(ws) + 2  # the budget held (the spaced workload ends its request)
    assert sum("cut short by the budget" in line for line in lines) == len(incomplete)
    assert any(f"cut {len(incomplete)} of {len(ws)} workloads short" in line for line in lines)
    assert p.fit["num_shapes"] > 0  # the fit still ran on what the workloads did


def test_the_serving_loops_driver_past_every_deadline_cuts_each_workload_short_and_aborts_what_it_sent():
    """The serving loop's watchdog (engine/service/calibration_driver.py): a budget long over before
    any workload could finish cuts every one short; nothing stays in flight and each is named."""
    from batchdeck.engine.llm_engine import LLMEngine
    from batchdeck.engine.service.calibration_driver import drive_through_service

    cfg = EngineConfig(model="synthetic:tiny", device="cpu", dtype="float32", num_blocks=256,
                       max_num_seqs_limit=4, max_batched_tokens_limit=64, spec_k_limit=0)
    engine = LLMEngine(cfg, LiveConfig(max_num_seqs=4, max_batched_tokens=64, chunk_size=64))
    ws = design_workloads(4, 64, engine.max_model_len, 256 * 16, quick=True)
    tap = IterationTap(engine)
    lines: list[str] = []
    cut = drive_through_service(engine, ws, tap, lines.append, budget_s=1e-9)
    tap.remove()
    assert cut == list(range(len(ws)))
    assert not engine.has_unfinished and all(r.is_finished for r in engine.requests.values())
    assert engine.num_requests_added < sum(len(w.requests) for w in ws)
    assert len(lines) == len(ws) and all(line.endswith("cut short by the budget)") for line in lines)
