"""Scheduling policies: behaviour on the CPU model, each against fcfs on the same input and judged on
iteration indices (a virtual clock makes time a function of the iteration, so everything is
deterministic); then each policy's ordering and victim logic on plain Requests, without a model."""
from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchdeck.engine.block_manager import BlockManager
from batchdeck.engine.config import ConfigError, EngineConfig, LiveConfig
from batchdeck.engine.llm_engine import LLMEngine
from batchdeck.engine.request import Request, SamplingParams
from batchdeck.engine.scheduler import Scheduler
from batchdeck.engine.slo import DEFAULT_SLO_TARGETS
from batchdeck.policies import POLICIES, describe_policies, make_policy, policy_names, validate_policy_params
from batchdeck.policies.base import WaitingKeys
from batchdeck.policies.fair import FairPolicy
from batchdeck.policies.sjf import PREDICTORS, SJFPolicy, register_predictor
from tests.helpers import advance, greedy, loaded, reference_tokens


# -- driving the engine on a virtual clock ---------------------------------------------------------
@dataclass
class Arrival:
    at: int  # loop index (= iteration index while the engine is never idle)
    rid: str
    prompt: list[int]
    max_tokens: int
    kw: dict


class VirtualClock:
    def __init__(self, tick: float):
        self.tick, self.t = tick, 0.0

    def __call__(self) -> float:
        return self.t


def make(path, *, tick=0.1, num_blocks=256, block_size=16, **live) -> LLMEngine:
    return LLMEngine(EngineConfig(model=path, num_blocks=num_blocks, block_size=block_size), LiveConfig(**live),
                     loaded=loaded(path), check_invariants=True, clock=VirtualClock(tick))


def drive(engine: LLMEngine, arrivals: list[Arrival], max_loops: int = 3000) -> dict[str, list[int]]:
    """Run to completion; time is loop index * tick. Returns the iteration of every token, per request."""
    pending = sorted(arrivals, key=lambda a: a.at)
    token_iterations: dict[str, list[int]] = defaultdict(list)
    for loop in range(max_loops):
        engine.clock.t = loop * engine.clock.tick
        while pending and pending[0].at <= loop:
            a = pending.pop(0)
            engine.add_request(a.rid, a.prompt, greedy(a.max_tokens), **a.kw)
        if not pending and not engine.has_unfinished:
            return token_iterations
        result = engine.step()
        if result is not None:
            for out in result.outputs:
                token_iterations[out.request_id].extend([result.iteration] * len(out.new_token_ids))
        elif not pending:
            raise AssertionError("the engine has unfinished requests but scheduled nothing")
    raise AssertionError("did not finish")


def assert_exact(path, engine: LLMEngine) -> None:
    assert engine.blocks.num_free == engine.blocks.num_blocks
    for r in engine.requests.values():
        assert tuple(r.output_token_ids) == reference_tokens(path, tuple(r.prompt_token_ids), r.sampling.max_tokens), \
            r.request_id


def run(path, policy, arrivals, **kw):
    engine = make(path, policy=policy, **kw)
    tokens = drive(engine, arrivals)
    assert_exact(path, engine)
    return engine, tokens


def fti(engine, prefix):
    return [r.first_token_iteration for rid, r in sorted(engine.requests.items()) if rid.startswith(prefix)]


# -- behaviour on the model, against fcfs ----------------------------------------------------------
def test_sjf_serves_a_short_burst_queued_behind_long_jobs_far_earlier(model_dirs):
    path = model_dirs["llama"]
    arrivals = [Arrival(0, f"L{i}", [5 + i] * 8, 16, {}) for i in range(4)]
    arrivals += [Arrival(0, f"S{i}", [50 + i] * 8, 2, {}) for i in range(6)]
    fcfs, _ = run(path, "fcfs", arrivals, max_num_seqs=2)
    sjf, _ = run(path, "sjf", arrivals, max_num_seqs=2)
    assert min(fti(fcfs, "S")) >= 32  # behind all four long jobs (two rounds of 16 tokens)
    assert max(fti(sjf, "S")) <= 6  # the whole burst is out within a few iterations
    assert sum(fti(sjf, "S")) * 5 < sum(fti(fcfs, "S"))


def test_sjf_aging_bounds_how_long_a_long_job_waits(model_dirs):
    """A long job behind a steady stream of short ones starts once it has waited aging_s."""
    path = model_dirs["llama"]
    arrivals = [Arrival(0, "S-first", [9] * 4, 3, {}), Arrival(0, "L", [7] * 6, 6, {})]
    arrivals += [Arrival(2 * i + 1, f"S{i:02d}", [60 + i] * 4, 2, {}) for i in range(15)]
    starving, _ = run(path, "sjf", arrivals, tick=0.1, max_num_seqs=1, policy_params={"aging_s": 86400.0})
    aged, _ = run(path, "sjf", arrivals, tick=0.1, max_num_seqs=1, policy_params={"aging_s": 1.0})
    assert starving.requests["L"].first_token_iteration >= 30  # only after the stream ends
    assert aged.requests["L"].first_token_iteration <= 10 + 4  # aging_s = 10 iterations, + the one running


def test_fair_keeps_a_light_tenant_fast_while_a_heavy_tenant_floods(model_dirs):
    path = model_dirs["llama"]
    arrivals = [Arrival(0, f"H{i:02d}", [10 + i] * 8, 8, {"tenant": "heavy"}) for i in range(8)]
    arrivals += [Arrival(3, f"light{i}", [100 + i] * 8, 3, {"tenant": "light"}) for i in range(2)]
    fcfs, _ = run(path, "fcfs", arrivals, max_num_seqs=2)
    fair, tokens = run(path, "fair", arrivals, max_num_seqs=2)
    assert min(fti(fcfs, "light")) >= 32  # behind the whole flood (four rounds of 8 tokens)
    assert max(fti(fair, "light")) <= 8  # as soon as the first seats free up (fair does not preempt)
    # Work-conserving: before the light tenant shows up, the heavy one has both seats.
    assert sorted(tokens["H00"])[:3] == [0, 1, 2] and sorted(tokens["H01"])[:3] == [0, 1, 2]
    snap = fair.scheduler.policy.snapshot()["counters"]
    assert set(snap) == {"heavy", "light"} and snap["heavy"] > snap["light"]


@pytest.mark.parametrize("short", ["seats", "blocks"])
def test_priority_serves_high_priority_first_and_preempts(model_dirs, short):
    path = model_dirs["llama"]
    if short == "seats":  # two seats, plenty of blocks
        arrivals = [Arrival(0, f"low{i}", [20 + i] * 16, 10, {"priority": 5}) for i in range(3)]
        knobs, fcfs_wait = dict(max_num_seqs=2), 10
    else:  # plenty of seats; 20 blocks of 4 tokens, which the two lows (32 + 8 tokens each) fill up
        arrivals = [Arrival(0, f"low{i}", [20 + i] * 32, 8, {"priority": 5}) for i in range(2)]
        knobs, fcfs_wait = dict(max_num_seqs=8, block_size=4, num_blocks=20), 8
    arrivals += [Arrival(4, f"high{i}", [90 + i] * 16, 4, {"priority": 0}) for i in range(2)]
    fcfs, _ = run(path, "fcfs", arrivals, **knobs)
    prio, _ = run(path, "priority", arrivals, **knobs)
    assert min(fti(fcfs, "high")) >= fcfs_wait  # behind the low ones
    assert max(fti(prio, "high")) <= 6  # admitted by evicting low-priority work
    assert sum(r.num_preemptions for rid, r in prio.requests.items() if rid.startswith("low")) >= 1
    assert all(r.num_preemptions == 0 for rid, r in prio.requests.items() if rid.startswith("high"))
    # Without preemption it still orders, but has to wait for a seat.
    patient, _ = run(path, "priority", arrivals, policy_params={"preempt": False}, **knobs)
    assert max(fti(patient, "high")) > max(fti(prio, "high"))
    assert sum(r.num_preemptions for r in patient.requests.values()) <= sum(
        r.num_preemptions for r in fcfs.requests.values())


def test_slo_serves_realtime_before_batch_under_overload_and_meets_more_deadlines(model_dirs):
    path = model_dirs["llama"]
    tick = 0.04  # realtime: TTFT 0.5 s = 12.5 iterations, TPOT 0.05 s; batch: TTFT 10 s = 250 iterations
    arrivals = [Arrival(0, f"batch{i}", [30 + i] * 12, 16, {"slo_class": "batch"}) for i in range(4)]
    arrivals += [Arrival(0, f"rt0-{i}", [120 + i] * 6, 3, {"slo_class": "realtime"}) for i in range(2)]
    arrivals += [Arrival(8 * k, f"rt{k}-0", [140 + k] * 6, 3, {"slo_class": "realtime"}) for k in range(1, 4)]
    results = {}
    for policy in ("fcfs", "slo"):
        engine, _ = run(path, policy, arrivals, tick=tick, max_num_seqs=2)
        met = {rid: engine.request_record(r).slo_met for rid, r in engine.requests.items()}
        results[policy] = (engine, met)
    fcfs, fcfs_met = results["fcfs"]
    slo, slo_met = results["slo"]
    # Queued together, realtime requests go first under slo and last under fcfs.
    assert max(fti(slo, "rt0-")) < min(fti(slo, "batch"))
    assert min(fti(fcfs, "rt0-")) > max(fti(fcfs, "batch")[:2])
    assert sum(slo_met.values()) > sum(fcfs_met.values())
    assert all(v for rid, v in slo_met.items() if rid.startswith("rt"))
    assert sum(v for rid, v in fcfs_met.items() if rid.startswith("rt")) <= 2


def p99(values):
    s = sorted(values)
    return s[min(len(s) - 1, int(round(0.99 * (len(s) - 1))))]


def decode_gaps(tokens, prefix):
    return [b - a for rid, its in tokens.items() if rid.startswith(prefix) for a, b in zip(its, its[1:])]


def test_stall_free_gives_running_requests_a_lower_p99_token_gap_than_prefill_first(model_dirs):
    path = model_dirs["llama"]
    arrivals = [Arrival(0, f"run{i}", [40 + i] * 4, 30, {}) for i in range(3)]
    arrivals += [Arrival(4 + 8 * k, f"long{k}", [200 + k] * 160, 2, {}) for k in range(3)]
    gaps = {}
    for mixing in ("stall-free", "prefill-first", "selective"):
        _, tokens = run(path, "fcfs", arrivals, mixing=mixing, max_num_seqs=8, max_batched_tokens=32,
                        chunk_size=32, selective_threshold=100)
        gaps[mixing] = p99(decode_gaps(tokens, "run"))
    assert gaps["stall-free"] == 1  # decodes never wait: prefill only fills the budget left over
    assert gaps["prefill-first"] >= 5  # a 160-token prompt in 32-token chunks stalls decodes 5 iterations
    assert gaps["selective"] <= 2  # long prompts run alone, every other iteration


# -- mixing modes at the mechanism level -----------------------------------------------------------
def req(rid, n_prompt, max_tokens=4, arrival=0.0, **kw):
    return Request(rid, list(range(n_prompt)), SamplingParams(max_tokens=max_tokens), arrival_time=arrival, **kw)


def sched(policy="fcfs", num_blocks=64, block_size=4, params=None, **live):
    return Scheduler(BlockManager(num_blocks, block_size), make_policy(policy, params), LiveConfig(**live))


def test_selective_mixes_short_prompts_with_decodes_and_runs_long_ones_alone():
    s = sched(max_num_seqs=8, max_batched_tokens=64, chunk_size=16, mixing="selective", selective_threshold=32)
    a = req("a", 4, max_tokens=20)
    s.add(a)
    advance(s.schedule(0.0))
    s.add(req("short", 8))
    plan = s.schedule(0.0)  # the short prompt joins the decode
    assert sorted(c.request.request_id for c in plan.chunks) == ["a", "short"]
    advance(plan)
    s.add(req("long", 40))
    s.add(req("short2", 8))
    seen = []
    for _ in range(6):
        plan = s.schedule(0.0)
        names = sorted(c.request.request_id for c in plan.chunks)
        seen.append(names)
        if any(c.request.request_id == "long" and not c.is_decode for c in plan.chunks):
            assert names == ["long"], "a long prefill chunk runs alone"
        advance(plan)
    assert seen[:5] == [["long"], ["a", "short", "short2"], ["long"], ["a", "short", "short2"], ["long"]]


def test_prefill_first_runs_only_prefill_while_any_is_pending():
    s = sched(max_num_seqs=8, max_batched_tokens=16, chunk_size=8, mixing="prefill-first")
    a = req("a", 4, max_tokens=20)
    s.add(a)
    advance(s.schedule(0.0))
    s.add(req("b", 24))
    kinds = []
    for _ in range(4):
        plan = s.schedule(0.0)
        kinds.append({"decode" if c.is_decode else "prefill" for c in plan.chunks})
        advance(plan)
    assert kinds[0] == {"prefill"} and kinds[1] == {"prefill"}  # 24 tokens in chunks of 8 (budget 16)
    assert "decode" in kinds[2] or "decode" in kinds[3]


def test_drain_never_preempts_for_priority_while_over_the_cap():
    s = sched("priority", max_num_seqs=4, max_batched_tokens=100, chunk_size=100, preemption="drain")
    lows = [req(f"low{i}", 4, max_tokens=10, priority=5) for i in range(4)]
    for r in lows:
        s.add(r)
    advance(s.schedule(0.0))
    s.set_config(LiveConfig(policy="priority", max_num_seqs=2, max_batched_tokens=100, chunk_size=100,
                            preemption="drain"))
    s.add(req("high", 4, priority=0))
    plan = s.schedule(0.0)
    assert not plan.preempted and len(s.running) == 4  # draining: nobody admitted, so nobody evicted
    s.finish(lows[0]), s.finish(lows[1])  # down to the cap: a seat trade (one out, one in) is allowed
    plan = s.schedule(0.0)
    assert [r.request_id for r in plan.preempted] == ["low3"] and len(s.running) == 2
    assert any(c.request.request_id == "high" for c in plan.chunks)


def test_order_waiting_is_asked_once_per_iteration_and_not_when_no_seat_is_free():
    s = sched(max_num_seqs=2, max_batched_tokens=100, chunk_size=100)
    calls = []
    inner = s.policy.order_waiting
    s.policy.order_waiting = lambda w, now: calls.append(len(w)) or inner(w, now)
    for i in range(5):
        s.add(req(str(i), 4, max_tokens=10))
    advance(s.schedule(0.0))
    assert calls == [5]
    advance(s.schedule(0.0))  # seats full: no admission possible, no ordering
    assert calls == [5]


def test_policy_swap_keeps_queues_and_hands_over_state():
    s = sched("fair", max_num_seqs=2, max_batched_tokens=100, chunk_size=100)
    rs = [req(str(i), 4, max_tokens=10, tenant=f"t{i % 2}") for i in range(5)]
    for r in rs:
        s.add(r)
    plan = s.schedule(0.0)
    advance(plan)
    for c in plan.chunks:
        s.policy.on_tokens_computed(c.request, c.num_tokens, 1)
    waiting, running = list(s.waiting), list(s.running)
    counters = dict(s.policy.counters)
    s.set_policy(make_policy("fair", {"output_weight": 3.0}))  # parameters only: counters carry over
    assert s.policy.counters == counters and s.policy.params["output_weight"] == 3.0
    assert s.waiting == waiting and s.running == running
    s.set_policy(make_policy("sjf"))
    s.set_policy(make_policy("fair"))  # from another policy: fresh counters
    assert s.policy.counters == {}
    assert s.waiting == waiting and s.running == running


# -- ordering and victim logic on plain Requests ---------------------------------------------------
def seq(*requests):
    for i, r in enumerate(requests):
        r.admission_seq = i
    return list(requests)


def ids(requests):
    return [r.request_id for r in requests]


def test_registry_names_are_the_contract_and_every_policy_documents_itself():
    assert policy_names() == ("fcfs", "sjf", "slo", "fair", "priority", "cache-aware")
    described = describe_policies()
    for name, cls in POLICIES.items():
        doc = __import__(cls.__module__, fromlist=["x"]).__doc__
        assert "Optimizes" in doc and "Costs" in doc and "arameters" in doc, name
        for param in cls.PARAMS:
            assert param in doc, (name, param)
        assert set(described[name]["params"]) == set(cls.PARAMS)


def test_fcfs_order_and_victim():
    p = make_policy("fcfs")
    a, b, c = seq(req("a", 50), req("b", 5), req("c", 1))
    assert ids(p.order_waiting([c, a, b], 0.0)) == ["a", "b", "c"]
    assert p.pick_victim([a, b, c], 0.0) is c
    assert p.should_preempt(a, [b, c], 0.0) is None


def test_sjf_order_predictors_aging_and_victim():
    long_prompt, long_out, short = seq(req("long_prompt", 200, 2), req("long_out", 4, 300), req("short", 4, 2))
    p = make_policy("sjf")
    assert ids(p.order_waiting([long_prompt, long_out, short], 0.0)) == ["short", "long_prompt", "long_out"]
    p = make_policy("sjf", {"predictor": "prompt"})
    assert ids(p.order_waiting([long_prompt, long_out, short], 0.0))[-1] == "long_prompt"
    p = make_policy("sjf", {"prefill_weight": 0.0})
    assert ids(p.order_waiting([long_prompt, long_out, short], 0.0)) == ["long_prompt", "short", "long_out"]
    # Output so far counts against max_tokens: once it ran (and was preempted) it has less to do.
    mid = req("mid", 4, 50)
    mid.admission_seq = 3
    p = make_policy("sjf", {"predictor": "output"})
    assert ids(p.order_waiting([long_prompt, long_out, short, mid], 0.0)) == [
        "long_prompt", "short", "mid", "long_out"]
    long_out.output_token_ids.extend([1] * 295)
    long_out.token_ids.extend([1] * 295)
    long_out.num_preemptions = 1  # how a waiting request changes: it ran and was preempted
    assert ids(p.order_waiting([long_prompt, long_out, short, mid], 0.0)) == [
        "long_prompt", "short", "long_out", "mid"]
    # Aging: after aging_s, the oldest go first, first come first served among themselves.
    old, young = seq(req("old", 4, 400, arrival=0.0), req("young", 4, 2, arrival=3.0))
    p = make_policy("sjf", {"aging_s": 5.0})
    assert ids(p.order_waiting([old, young], 4.0)) == ["young", "old"]
    assert ids(p.order_waiting([old, young], 5.0)) == ["old", "young"]
    assert ids(make_policy("sjf", {"aging_s": 0.0}).order_waiting([young, old], 9.0)) == ["old", "young"]
    # Victim: the most predicted work left.
    a, b = seq(req("a", 4, 10), req("b", 4, 100))
    assert make_policy("sjf").pick_victim([a, b], 0.0) is b


def test_sjf_predictor_is_pluggable():
    register_predictor("prompt_len_desc", lambda r, params: -len(r.prompt_token_ids))
    try:
        a, b = seq(req("a", 4), req("b", 40))
        p = make_policy("sjf", {"predictor": "prompt_len_desc"})
        assert ids(p.order_waiting([a, b], 0.0)) == ["b", "a"]
    finally:
        PREDICTORS.pop("prompt_len_desc")
    with pytest.raises(ConfigError, match=r"policy_params.predictor='nope'.*one of tokens, output, prompt"):
        validate_policy_params("sjf", {"predictor": "nope"})


def test_slo_least_slack_first_deadlines_late_requests_and_victims():
    p = make_policy("slo")
    batch, inter, rt = seq(req("batch", 4, arrival=0.0, slo_class="batch"),
                           req("inter", 4, arrival=0.0, slo_class="interactive"),
                           req("rt", 4, arrival=1.0, slo_class="realtime"))
    assert ids(p.order_waiting([batch, inter, rt], 1.0)) == ["rt", "inter", "batch"]  # 1.5 < 2.0 < 10.0
    unknown = seq(req("u", 4, arrival=0.0, slo_class="gold"))[0]
    assert p.deadline(unknown) == DEFAULT_SLO_TARGETS["interactive"].ttft
    # Past its TTFT deadline and not started: it goes after those that can still make it.
    assert ids(p.order_waiting([batch, inter, rt], 1.8)) == ["inter", "batch", "rt"]
    assert ids(make_policy("slo", {"demote_late": False}).order_waiting([batch, inter, rt], 1.8)) == [
        "rt", "inter", "batch"]
    # A started request's next token is due on its TPOT pace.
    started = seq(req("s", 4, slo_class="interactive"))[0]
    started.first_token_time = 3.0
    started.output_token_ids.extend([1, 1])
    started.token_ids.extend([1, 1])
    assert p.deadline(started) == pytest.approx(3.0 + 2 * DEFAULT_SLO_TARGETS["interactive"].tpot)
    # Victim: the most slack; preemption only for a much earlier deadline that can still be made.
    a, b = seq(req("a", 4, arrival=0.0, slo_class="batch"), req("b", 4, arrival=0.0, slo_class="interactive"))
    assert p.pick_victim([a, b], 0.0) is a
    urgent = req("urgent", 4, arrival=0.0, slo_class="realtime")
    urgent.admission_seq = 9
    assert p.should_preempt(urgent, [a, b], 0.1) is a  # 10 s vs 0.5 s: margin 5 s
    assert p.should_preempt(urgent, [b], 0.1) is None  # 2 s vs 0.5 s: inside the margin
    assert p.should_preempt(urgent, [a, b], 0.6) is None  # too late to help it
    assert make_policy("slo", {"preempt": False}).should_preempt(urgent, [a, b], 0.1) is None
    assert make_policy("slo", {"realtime_ttft": 20.0}).order_waiting([batch, rt], 1.0)[0] is batch


def test_fair_orders_by_counter_interleaves_lifts_and_charges():
    p = make_policy("fair")
    h = [req(f"h{i}", 10, tenant="heavy") for i in range(4)]
    l_ = [req(f"l{i}", 10, tenant="light") for i in range(2)]
    seq(*h, *l_)
    # Equal counters: admissions interleave tenants (provisional charges), FCFS within a tenant.
    assert ids(p.order_waiting(h + l_, 0.0)) == ["h0", "l0", "h1", "l1", "h2", "h3"]
    # Service is charged: prompt tokens * 1 + output tokens * 2.
    p.on_tokens_computed(h[0], 10, 1)
    assert p.counters["heavy"] == 12.0
    p.on_tokens_computed(h[0], 0, 1)
    assert p.counters["heavy"] == 14.0
    assert ids(p.order_waiting(h[1:] + l_, 0.0))[:2] == ["l0", "l1"]
    # Recomputation after a preemption is not charged again; new output is.
    h[0].num_preemptions = 1
    p.on_tokens_computed(h[0], 10, 1)
    assert p.counters["heavy"] == 16.0
    # A newly active tenant is lifted to the minimum counter of the active ones.
    p.counters.update({"heavy": 100.0, "light": 40.0})
    new = seq(*h, *l_, req("n0", 10, tenant="newcomer"))[-1]
    p.on_arrival(new, h[1:], [l_[0]])
    assert p.counters["newcomer"] == 40.0
    p.counters["light"] = 5.0
    p.on_arrival(l_[1], [], [h[1]])  # light has nothing waiting or running: lifted to heavy's 100
    assert p.counters["light"] == 100.0
    p.on_arrival(h[2], [h[1]], [])  # heavy is active: unchanged
    assert p.counters["heavy"] == 100.0
    # Victim: the latest admitted request of the most-served tenant.
    p.counters.update({"heavy": 1.0, "light": 2.0})
    assert p.pick_victim([h[0], h[1], l_[0], l_[1]], 0.0) is l_[1]


def test_fair_tenant_weights_give_a_proportional_share():
    p = make_policy("fair", {"tenant_weights": {"gold": 2.0}})
    g = [req(f"g{i}", 10, tenant="gold") for i in range(4)]
    b = [req(f"b{i}", 10, tenant="bronze") for i in range(4)]
    seq(*[x for pair in zip(g, b) for x in pair])
    # gold's requests cost half as much of its counter: (10 + 2) / 2 = 6 against bronze's 12
    assert ids(p.order_waiting(g + b, 0.0)) == ["g0", "b0", "g1", "g2", "b1", "g3", "b2", "b3"]
    p.on_tokens_computed(g[0], 10, 0)
    assert p.counters["gold"] == 5.0
    with pytest.raises(ConfigError, match=r"policy_params.tenant_weights.gold=0 .*\[0.001, 1000\]"):
        validate_policy_params("fair", {"tenant_weights": {"gold": 0}})


def test_priority_order_victim_and_preemption_rule():
    p = make_policy("priority")
    a, b, c, d = seq(req("a", 4, priority=1), req("b", 4, priority=0), req("c", 4, priority=1),
                     req("d", 4, priority=-3))
    assert ids(p.order_waiting([a, b, c, d], 0.0)) == ["d", "b", "a", "c"]
    assert p.pick_victim([a, b, c], 0.0) is c  # lowest priority, latest admitted
    assert p.should_preempt(b, [a, c], 0.0) is c
    assert p.should_preempt(a, [b, c], 0.0) is None  # c has the same priority: no eviction
    assert make_policy("priority", {"preempt": False}).should_preempt(b, [a, c], 0.0) is None


def test_param_validation_names_key_value_and_range():
    with pytest.raises(ConfigError, match=r"policy_params.aging_s=-1 is not allowed: a number in \[0, 86400\]"):
        validate_policy_params("sjf", {"aging_s": -1})
    with pytest.raises(ConfigError, match=r"policy_params.aging_s='x'.*a number in \[0, 86400\] for policy sjf"):
        validate_policy_params("sjf", {"aging_s": "x"})
    with pytest.raises(ConfigError, match=r"policy_params.bogus=1 .*a parameter of policy fair: input_weight"):
        validate_policy_params("fair", {"bogus": 1})
    with pytest.raises(ConfigError, match=r"policy_params.preempt=1 .*true or false"):
        validate_policy_params("priority", {"preempt": 1})
    with pytest.raises(ConfigError, match=r"policy_params.tenant_weights=\[1\] .*an object"):
        validate_policy_params("fair", {"tenant_weights": [1]})
    with pytest.raises(ConfigError, match=r"policy='lifo'.*one of fcfs, sjf, slo, fair, priority"):
        validate_policy_params("lifo", {})
    with pytest.raises(ConfigError, match=r"policy_params.x=1 .*a parameter of policy fcfs: none"):
        validate_policy_params("fcfs", {"x": 1})
    assert validate_policy_params("slo", {"batch_ttft": 20})["batch_ttft"] == 20.0
    with pytest.raises(ConfigError):
        SJFPolicy(aging_s=-5)  # direct construction is validated too


# -- the incremental orderings equal a from-scratch sort --------------------------------------------
@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000))
def test_incremental_orderings_match_a_full_sort(seed):
    """WaitingKeys (sjf, slo, priority) and fair's per-tenant queues are patched between calls;
    through random arrivals, admissions and preemptions they must equal a fresh policy's order."""
    rng = random.Random(seed)
    names = ["sjf", "slo", "priority", "fair"]
    live = {n: make_policy(n) for n in names}
    waiting: list[Request] = []
    running: list[Request] = []
    n = 0
    for step in range(30):
        for _ in range(rng.randrange(4)):
            r = req(f"r{n}", rng.randrange(1, 30), rng.randrange(1, 30), arrival=step * 0.1,
                    tenant=rng.choice("abc"), priority=rng.randrange(3), slo_class=rng.choice(
                        ["realtime", "interactive", "batch"]))
            r.admission_seq = n
            n += 1
            for p in live.values():
                p.on_arrival(r, waiting, running)
            waiting.append(r)
        for _ in range(rng.randrange(3)):  # admit some
            if waiting:
                running.append(waiting.pop(rng.randrange(len(waiting))))
        for r in running:  # they run: outputs grow
            if rng.random() < 0.7:
                if r.first_token_time is None:
                    r.first_token_time = step * 0.1
                r.append_token(1, step * 0.1)
                for p in live.values():
                    p.on_tokens_computed(r, 1, 1)
        if running and rng.random() < 0.4:  # preempt one
            victim = running.pop(rng.randrange(len(running)))
            victim.num_preemptions += 1
            waiting.append(victim)
        now = step * 0.1
        for name, p in live.items():
            fresh = make_policy(name)
            if isinstance(p, FairPolicy):
                fresh.counters = dict(p.counters)
            assert ids(p.order_waiting(waiting, now)) == ids(fresh.order_waiting(waiting, now)), (name, step)


def test_waiting_keys_static_mode_reinserts_requests_that_come_back():
    wk = WaitingKeys(lambda r: (r.priority, r.admission_seq), static=True)
    a, b, c = seq(req("a", 1, priority=2), req("b", 1, priority=1), req("c", 1, priority=0))
    assert ids(wk.sort([a, b, c])) == ["c", "b", "a"]
    assert ids(wk.sort([a, b])) == ["b", "a"]  # c admitted
    assert ids(wk.sort([a, b, c])) == ["c", "b", "a"]  # and preempted back
