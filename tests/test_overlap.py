"""Overlapped iterations (async scheduling) on the CPU: the same code path as on CUDA, where the
next iteration is planned and launched before the one in flight is booked. The outputs, finishes,
aborts, live changes and records keep their meaning."""
from __future__ import annotations

import random

import pytest

from batchdeck.engine.config import EngineConfig, LiveConfig, resolve_configs
from batchdeck.engine.llm_engine import LLMEngine
from batchdeck.engine.model_runner import feed, feed_positions
from batchdeck.engine.request import PLACEHOLDER, Request, SamplingParams
from batchdeck.engine.settings import defaults_for
from batchdeck.engine.step_plan import ScheduledChunk
from batchdeck.engine.telemetry import ListSink
from tests.helpers import greedy, loaded, make_engine, reference_tokens


def prompts_for(seed: int, count: int, max_len: int = 30) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(256) for _ in range(rng.randrange(2, max_len))] for _ in range(count)]


def traced_launches(engine) -> list[tuple[int, bool]]:
    """(iteration, launched while another was in flight) for every launch."""
    seen: list[tuple[int, bool]] = []
    launch = engine.runner.launch

    def tracing(plan, blocks, prev=None):
        seen.append((engine.iteration, prev is not None))
        return launch(plan, blocks, prev)

    engine.runner.launch = tracing
    return seen


def test_the_next_iteration_is_launched_before_the_previous_is_booked_and_outputs_stay_exact(model_dirs):
    path = model_dirs["qwen3"]
    sink = ListSink()
    engine = make_engine(path, overlap=True, sink=sink, max_num_seqs=4, max_batched_tokens=24, chunk_size=8,
                         block_size=4, num_blocks=64)
    launches = traced_launches(engine)
    prompts = prompts_for(1, 6)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, greedy(7))
    streamed: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    booked = []
    while engine.has_unfinished:
        result = engine.step()
        booked.append(result.iteration)
        for out in result.outputs:
            streamed[out.request_id].extend(out.new_token_ids)
    assert booked == list(range(engine.iteration)), "each step books one iteration, in order"
    assert sum(fed for _, fed in launches) >= engine.iteration - 2, "launches did not overlap"
    assert sum(r.overlapped for r in sink.iterations) >= engine.iteration - 1
    for i, p in enumerate(prompts):
        r = engine.requests[str(i)]
        assert streamed[str(i)] == r.output_token_ids == list(reference_tokens(path, tuple(p), 7))
        assert r.token_ids == p + r.output_token_ids and PLACEHOLDER not in r.token_ids
    # max_tokens is known ahead: a request's last token is never followed by a wasted row.
    computed = sum(x.num_prefill_tokens + x.num_decode_tokens for x in sink.iterations)
    assert computed == sum(len(p) + 7 - 1 for p in prompts)
    assert engine.blocks.num_free == engine.blocks.num_blocks


@pytest.mark.parametrize("overlap", [False, True])
def test_stop_tokens_discard_the_token_already_launched(model_dirs, overlap):
    path = model_dirs["llama"]
    engine = make_engine(path, overlap=overlap, max_num_seqs=4, max_batched_tokens=64, chunk_size=16,
                         block_size=4, num_blocks=64)
    prompts = prompts_for(2, 5)
    expected = {}
    for i, p in enumerate(prompts):
        ref = list(reference_tokens(path, tuple(p), 10))
        stop = ref[2 + i % 3]
        expected[str(i)] = ref[:ref.index(stop) + 1]
        engine.add_request(str(i), p, SamplingParams(max_tokens=10, ignore_eos=True, stop_token_ids=(stop,)))
    engine.run_until_done()
    for rid, want in expected.items():
        r = engine.requests[rid]
        assert r.output_token_ids == want and r.finish_reason.value == "stop"
        assert r.finish_iteration is not None and r.token_ids == r.prompt_token_ids + want
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_abort_while_a_token_is_in_flight_discards_it_and_frees_the_blocks(model_dirs):
    path = model_dirs["qwen2"]
    engine = make_engine(path, overlap=True, max_num_seqs=4, block_size=4, num_blocks=64)
    prompts = prompts_for(3, 3)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, greedy(12))
    for _ in range(4):
        engine.step()
    victim = engine.requests["1"]
    assert victim.num_placeholders == 1, "the iteration in flight samples its next token"
    before = list(victim.output_token_ids)
    engine.abort("1")
    assert victim.is_finished and victim.num_placeholders == 0 and "1" not in engine.blocks.tables
    engine.run_until_done()
    assert victim.output_token_ids == before and victim.finish_reason.value == "abort"
    for rid in ("0", "2"):
        r = engine.requests[rid]
        assert r.output_token_ids == list(reference_tokens(path, tuple(r.prompt_token_ids), 12))
    assert engine.blocks.num_free == engine.blocks.num_blocks and not engine.has_unfinished


def test_a_live_change_takes_effect_at_its_applied_iteration_and_never_earlier(model_dirs):
    path = model_dirs["llama"]
    sink = ListSink()
    engine = make_engine(path, overlap=True, sink=sink, max_num_seqs=4, max_batched_tokens=64, chunk_size=64,
                         block_size=4, num_blocks=128)
    rows: dict[int, int] = {}  # iteration -> requests in its plan
    schedule = engine.scheduler.schedule

    def counting(now):
        plan = schedule(now)
        rows[engine.iteration] = len(plan.chunks)
        return plan

    engine.scheduler.schedule = counting
    for i, p in enumerate(prompts_for(4, 4)):
        engine.add_request(str(i), p, greedy(16))
    for _ in range(5):
        engine.step()
    assert engine._inflight is not None and min(rows.values()) == 4
    engine.update_config({"max_num_seqs": 1, "preemption": "recompute"}, source="test")
    engine.run_until_done()
    (event,) = [e for e in sink.events if e.kind == "config_change"]
    applied = event.data["applied_iteration"]
    assert applied == event.iteration == 6  # iterations 0..5 were launched before the change arrived
    by_it = {x.iteration: x for x in sink.iterations}
    assert all(by_it[i].config_version == 0 and rows[i] == 4 for i in range(applied))
    assert all(by_it[i].config_version == 1 and rows[i] <= 1 for i in by_it if i >= applied)
    assert by_it[applied].num_preemptions == 3
    for i in range(4):
        r = engine.requests[str(i)]
        assert r.output_token_ids == list(reference_tokens(path, tuple(r.prompt_token_ids), 16))


def test_speculation_and_static_batching_turn_overlap_off_at_the_boundary(model_dirs):
    path = model_dirs["qwen3"]
    sink = ListSink()
    engine = make_engine(path, overlap=True, sink=sink, max_num_seqs=4, block_size=4, num_blocks=128)
    prompts = [[5, 6, 7, 8] * 4 + [9], [1, 2, 3] * 5]
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, greedy(20))
    for _ in range(4):
        engine.step()
    engine.update_config({"spec_k": 3})
    result = engine.step()  # books the iteration in flight, launches nothing
    assert engine._inflight is None and result.iteration == engine.iteration - 1
    for _ in range(3):
        engine.step()
    assert sum(x.spec_proposed for x in sink.iterations) > 0 and engine._inflight is None
    engine.update_config({"spec_k": 0, "batching": "static"})
    engine.step()
    assert engine._inflight is None
    engine.update_config({"batching": "continuous"})
    engine.run_until_done()
    assert [x.iteration for x in sink.iterations] == list(range(engine.iteration))
    for i, p in enumerate(prompts):
        assert engine.requests[str(i)].output_token_ids == list(reference_tokens(path, tuple(p), 20))


def test_logprobs_and_seeded_sampling_match_the_synchronous_engine(model_dirs):
    path = model_dirs["llama"]
    outs = []
    for overlap in (False, True):
        engine = make_engine(path, overlap=overlap, max_num_seqs=3, block_size=4, num_blocks=64)
        got: dict[str, list] = {}
        for i, p in enumerate(prompts_for(5, 3)):
            engine.add_request(str(i), p, SamplingParams(max_tokens=6, temperature=0.8, seed=i, logprobs=True,
                                                         ignore_eos=True))
        while engine.has_unfinished:
            for out in engine.step().outputs:
                got.setdefault(out.request_id, []).append((out.new_token_ids, out.logprobs))
        outs.append(got)
    assert outs[0].keys() == outs[1].keys()
    for rid in outs[0]:
        assert [t for t, _ in outs[0][rid]] == [t for t, _ in outs[1][rid]]
        assert [lp[0] for _, lp in outs[0][rid]] == pytest.approx([lp[0] for _, lp in outs[1][rid]], abs=1e-5)


def test_feed_writes_the_previous_samples_into_the_placeholders():
    def chunk(req, start, n):
        return ScheduledChunk(req, start, n, samples=True, is_decode=n == 1)

    a, b, c = Request("a", [1, 2, 3]), Request("b", [4, 5]), Request("c", [6, 7, 8, 9])
    for r in (a, b):
        r.add_placeholder()
    rows = [chunk(b, 2, 1), chunk(c, 0, 4), chunk(a, 1, 3)]  # a: a readmitted prefill ending at its placeholder
    dst, src = feed_positions(rows, {id(a): 0, id(b): 1})
    assert (dst, src) == ([0, 7], [1, 0])
    import torch

    ids = torch.tensor([PLACEHOLDER, 6, 7, 8, 9, 2, 3, PLACEHOLDER])
    feed(ids, torch.tensor([40, 50]), dst, src)
    assert ids.tolist() == [50, 6, 7, 8, 9, 2, 3, 40]
    lined_up = torch.tensor([PLACEHOLDER, PLACEHOLDER, 3])
    feed(lined_up, torch.tensor([11, 12]), [0, 1], [0, 1])
    assert lined_up.tolist() == [11, 12, 3]


def test_the_runner_runs_feeds_indexed_path_once_at_start_up(monkeypatch):
    """Its first call on CUDA is slow (kernels loaded, pinned memory allocated): the runner pays it
    while it is built, on rows that do not line up, not in the first iteration that needs it."""
    import batchdeck.engine.model_runner as model_runner

    calls = []
    real = model_runner.feed
    monkeypatch.setattr(model_runner, "feed", lambda ids, prev, dst, src: (calls.append((dst, src)), real(ids, prev, dst, src)))
    make_engine("synthetic:tiny")
    assert calls == [([0, 1], [1, 0])]


def test_the_setting_is_on_for_cuda_off_for_cpu_and_followed_by_the_simulator():
    assert defaults_for("cuda")["async_scheduling"] is True and defaults_for("cpu")["async_scheduling"] is False
    cfg, _ = resolve_configs({"async_scheduling": False}, cuda_available=True)
    assert cfg.async_scheduling is False
    cfg, _ = resolve_configs({}, cuda_available=True)
    assert cfg.async_scheduling is True
    from batchdeck.engine.sim.engine import make_engine as make_sim

    sim = make_sim(EngineConfig(sim="h200-qwen3-0.6b", async_scheduling=True), LiveConfig())
    assert sim.async_scheduling is True  # the simulator overlaps iterations as the engine it simulates does
    engine = LLMEngine(EngineConfig(model="synthetic:tiny", num_blocks=32), LiveConfig(), loaded=loaded("synthetic:tiny"))
    assert engine.async_scheduling is False
