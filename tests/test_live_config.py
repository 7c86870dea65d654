"""Live configuration: random workloads under random live changes at random iterations keep every
request whole and token-exact, KV accounting exact and the running set within the cap after a
drain; validation refuses bad changes with the key, the value and the allowed range, leaving
everything as it was; accepted changes apply at the next iteration, versioned, as events."""
from __future__ import annotations

import json
import random
from collections import defaultdict

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from batchdeck.cli import main
from batchdeck.engine.config import BATCHING_MODES, MIXING_MODES, PREEMPTION_MODES, ConfigError, EngineConfig, LiveConfig
from batchdeck.engine.llm_engine import LLMEngine
from batchdeck.engine.telemetry import ListSink
from batchdeck.policies import policy_names
from tests.helpers import greedy, loaded, reference_tokens

TICK = 0.05


class VirtualClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def make(path, *, num_blocks=128, block_size=4, overlap=False, **live):
    sink = ListSink()
    live = {"selective_threshold": 16, "static_timeout": 0.0, **live}
    engine = LLMEngine(EngineConfig(model=path, num_blocks=num_blocks, block_size=block_size, async_scheduling=overlap),
                       LiveConfig(**live),
                       loaded=loaded(path), check_invariants=True, clock=VirtualClock(), sink=sink)
    return engine, sink


def config_events(sink):
    return [e for e in sink.events if e.kind == "config_change"]


# -- the property ---------------------------------------------------------------------------------
POLICY_PARAMS = {"fcfs": [{}], "sjf": [{}, {"aging_s": 0.2}, {"predictor": "output"}],
                 "slo": [{}, {"preempt_margin_s": 0.0}, {"batch_ttft": 0.3, "demote_late": False}],
                 "fair": [{}, {"output_weight": 5.0, "tenant_weights": {"a": 3.0}}],
                 "priority": [{}, {"preempt": False}],
                 "cache-aware": [{}, {"metric": "share", "aging_s": 0.2}]}


def _policy_change(name: str):
    with_params = lambda pp: {"policy": name, **({"policy_params": pp} if pp else {})}  # noqa: E731
    return st.sampled_from(POLICY_PARAMS[name]).map(with_params)


def _one(key, values):
    return values.map(lambda v: {key: v})


single_change = st.one_of(
    st.sampled_from(policy_names()).flatmap(_policy_change),
    _one("max_num_seqs", st.integers(1, 6)),
    _one("max_batched_tokens", st.integers(1, 64)),
    _one("chunk_size", st.integers(1, 64)),
    _one("mixing", st.sampled_from(MIXING_MODES)),
    _one("batching", st.sampled_from(BATCHING_MODES)),
    _one("preemption", st.sampled_from(PREEMPTION_MODES)),
    _one("prefix_caching", st.booleans()),  # off drops the cache while requests hold shared blocks
    st.just({"policy_params": {"aging_s": 0.2}}),  # valid only while the policy is sjf
    st.integers(1, 2).map(lambda n: {"max_num_seqs": n, "preemption": "drain"}),  # a drain, most likely
)
# One to three settings per change; some combinations are invalid (e.g. chunk_size above
# max_batched_tokens) and must be refused whole.
change = st.lists(single_change, min_size=1, max_size=3).map(lambda ds: {k: v for d in ds for k, v in d.items()})

request = st.tuples(
    st.integers(0, 6),  # arrival (loop index)
    st.integers(1, 20),  # prompt length
    st.integers(1, 8),  # max_tokens
    st.sampled_from(["a", "b", "c"]),  # tenant
    st.integers(0, 2),  # priority
    st.sampled_from(["realtime", "interactive", "batch"]),
)


def record_running(engine) -> list[int]:
    """The running count right after each Scheduler.schedule() (before finished requests leave)."""
    sizes: list[int] = []
    schedule = engine.scheduler.schedule

    def recording_schedule(now):
        plan = schedule(now)
        sizes.append(len(engine.scheduler.running))
        return plan

    engine.scheduler.schedule = recording_schedule
    return sizes


def check_state(engine, added, running_before, running_after_schedule):
    s = engine.scheduler
    waiting_ids = [r.request_id for r in s.waiting]
    running_ids = [r.request_id for r in s.running]
    finished_ids = [rid for rid, r in engine.requests.items() if r.is_finished]
    everywhere = waiting_ids + running_ids + finished_ids
    assert sorted(everywhere) == sorted(added), "a request was lost or duplicated"
    # KV: blocks are held by running requests (and static padding) only, enough for their tokens.
    holders = {r.request_id for r in s.running} | {r.request_id for r in s.padding}
    assert set(engine.blocks.tables) <= holders
    for r in s.running:
        assert len(engine.blocks.table(r.request_id)) * engine.blocks.block_size >= r.num_computed_tokens
    for r in s.waiting:
        assert r.num_computed_tokens == 0 and not engine.blocks.table(r.request_id)
    # The cap: recompute preempts down to it at once; a drain never grows the running set while
    # above the cap and, once under it, stays under it.
    cap = engine.live.max_num_seqs
    if running_after_schedule is None:
        return
    if engine.live.preemption == "recompute":
        assert running_after_schedule <= cap
    else:
        assert running_after_schedule <= max(cap, running_before)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(
    requests=st.lists(request, min_size=3, max_size=8),
    changes=st.lists(st.tuples(st.integers(0, 12), change), min_size=1, max_size=6),
    block_size=st.sampled_from([1, 4, 16]),
    pool_tokens=st.integers(40, 240),
    max_num_seqs=st.integers(2, 5),
    preemption=st.sampled_from(PREEMPTION_MODES),
    seed=st.integers(0, 1000),
    overlap=st.booleans(),
)
@example(  # a drain: four running, the cap drops to one, then the policy and the mixing change under it
    requests=[(0, 6, 8, "a", 0, "interactive"), (0, 9, 7, "b", 1, "batch"), (0, 4, 8, "c", 2, "realtime"),
              (0, 12, 6, "a", 0, "batch"), (2, 5, 3, "b", 0, "realtime"), (3, 7, 2, "c", 1, "interactive")],
    changes=[(2, {"max_num_seqs": 1}), (4, {"policy": "priority"}), (5, {"mixing": "prefill-first"}),
             (6, {"max_num_seqs": 2, "preemption": "recompute"})],
    block_size=4, pool_tokens=240, max_num_seqs=4, preemption="drain", seed=1, overlap=True)
@example(  # overlapped: the cap drops as static batching turns overlap off (that step only books)
    requests=[(0, 1, 1, "a", 0, "realtime"), (0, 1, 3, "a", 0, "realtime"), (0, 1, 1, "a", 0, "realtime")],
    changes=[(0, {"policy_params": {"aging_s": 0.2}}), (2, {"max_num_seqs": 1, "batching": "static"})],
    block_size=1, pool_tokens=40, max_num_seqs=2, preemption="recompute", seed=0, overlap=True)
@example(  # a small pool: preemption under every policy, static batches, selective mixing
    requests=[(0, 18, 8, "a", 2, "batch"), (0, 20, 8, "b", 0, "realtime"), (1, 16, 8, "c", 1, "interactive"),
              (1, 19, 8, "a", 0, "realtime"), (4, 3, 4, "b", 2, "batch")],
    changes=[(1, {"policy": "slo", "policy_params": {"preempt_margin_s": 0.0}}), (3, {"batching": "static"}),
             (5, {"policy": "fair", "mixing": "selective"}), (7, {"batching": "continuous", "policy": "sjf"}),
             (9, {"chunk_size": 3, "max_batched_tokens": 5})],
    block_size=4, pool_tokens=60, max_num_seqs=4, preemption="recompute", seed=2, overlap=True)
def test_random_live_changes_keep_requests_whole_exact_and_within_the_cap(model_dirs, requests, changes,
                                                                          block_size, pool_tokens, max_num_seqs,
                                                                          preemption, seed, overlap):
    path = model_dirs["llama"]
    rng = random.Random(seed)
    num_blocks = max(-(-pool_tokens // block_size), -(-32 // block_size))  # room for any one request
    engine, sink = make(path, num_blocks=num_blocks, block_size=block_size, max_num_seqs=min(max_num_seqs, num_blocks),
                        max_batched_tokens=32, chunk_size=16, preemption=preemption, overlap=overlap)
    # prompts start with one of two shared prefixes (or none), so the prefix cache hits often
    shared = [[rng.randrange(256) for _ in range(12)], [rng.randrange(256) for _ in range(7)], []]
    arrivals = sorted(((at, f"r{i}", (shared[i % 3] + [rng.randrange(256) for _ in range(n)])[:max(n, 1 + i % 13)],
                        m, t, p, c)
                       for i, (at, n, m, t, p, c) in enumerate(requests)), key=lambda a: a[0])
    todo = sorted(changes, key=lambda c: c[0])
    added: list[str] = []
    streamed: dict[str, list[int]] = defaultdict(list)
    accepted: list[tuple[dict, int]] = []  # (changes, version), in order
    applied_at: list[int] = []  # the iteration each accepted change must carry as applied_iteration
    sizes = record_running(engine)
    idle = 0
    for loop in range(800):
        engine.clock.t = loop * TICK
        while arrivals and arrivals[0][0] <= loop:
            _, rid, prompt, m, tenant, prio, cls = arrivals.pop(0)
            engine.add_request(rid, prompt, greedy(m), tenant=tenant, priority=prio, slo_class=cls)
            added.append(rid)
        if not arrivals and not engine.has_unfinished:
            break
        while todo and todo[0][0] <= loop:
            _, ch = todo.pop(0)
            target, live = engine.target_config, engine.live
            try:
                new = engine.update_config(ch, source="prop")
            except ConfigError as exc:
                event("a change was rejected")
                assert exc.key and str(exc).startswith(exc.key)
                assert engine.target_config is target and engine.live is live, "a rejected change left a trace"
            else:
                assert new.version == target.version + 1 and engine.target_config is new
                accepted.append((ch, new.version))
        applied_at.extend([engine.iteration] * (len(accepted) - len(applied_at)))  # they apply at this step
        running_before, n_sizes = len(engine.scheduler.running), len(sizes)
        result = engine.step()
        assert engine.live is engine.target_config, "changes apply at the next iteration"
        if result is None:
            idle += 1
            assert arrivals or idle < 3, "unfinished requests but nothing scheduled"
        else:
            idle = 0
            for out in result.outputs:
                streamed[out.request_id].extend(out.new_token_ids)
        # (a step that only books the iteration in flight, overlapping being turned off, schedules nothing:
        # the cap holds from the next schedule on)
        after = sizes[n_sizes] if len(sizes) > n_sizes else None
        check_state(engine, added, running_before, after)
        if engine.live.preemption == "drain" and after is not None and after > engine.live.max_num_seqs:
            event("draining above the cap")
        if engine.live.batching == "static":
            event("static batching")
        if engine.live.mixing != "stall-free":
            event(f"mixing {engine.live.mixing}")
    else:
        raise AssertionError("did not finish")

    event(f"policies used: {len({ch['policy'] for ch, _ in accepted if 'policy' in ch}) + 1}")
    if any(r.num_preemptions for r in engine.requests.values()):
        event("some request was preempted")
    # Every request finished once, with the tokens it gets alone, streamed once each.
    assert sorted(added) == sorted(engine.requests) and len(added) == len(requests)
    for rid, r in engine.requests.items():
        assert r.is_finished and r.finish_reason.value == "length"
        assert tuple(r.output_token_ids) == reference_tokens(path, tuple(r.prompt_token_ids), r.sampling.max_tokens)
        assert streamed[rid] == r.output_token_ids, "a token was streamed twice or not at all (restart?)"
    assert engine.blocks.num_free == engine.blocks.num_blocks
    # Each accepted change is one event, in order, versioned, applied at the next iteration.
    events = config_events(sink)
    assert [(e.data["changes"], e.data["version"], e.data["source"]) for e in events] == [
        (ch, v, "prop") for ch, v in accepted]
    assert len(events) == len(accepted) == len(applied_at)
    assert [e.data["applied_iteration"] for e in events] == applied_at


# -- validation -----------------------------------------------------------------------------------
BAD = [
    ({"max_num_seqs": 0}, "max_num_seqs", r"max_num_seqs=0 is not allowed: an integer in \[1, {seqs}\]"),
    ({"max_num_seqs": "above"}, "max_num_seqs", r"max_num_seqs={seqs1} .*\[1, {seqs}\]"),
    ({"max_num_seqs": 2.5}, "max_num_seqs", r"max_num_seqs=2.5 .*an integer in \[1, {seqs}\]"),
    ({"max_num_seqs": True}, "max_num_seqs", r"max_num_seqs=True .*an integer"),
    ({"max_batched_tokens": "above"}, "max_batched_tokens", r"max_batched_tokens={tokens1} .*\[1, {tokens}\]"),
    ({"chunk_size": 600}, "chunk_size", r"chunk_size=600 .*an integer in \[1, 512\] \(the live max_batched_tokens\)"),
    ({"max_batched_tokens": 64}, "max_batched_tokens",
     r"max_batched_tokens=64 .*an integer in \[256, {tokens}\] \(at least the live chunk_size; lower chunk_size"),
    ({"policy": "lifo"}, "policy", r"policy='lifo' .*one of fcfs, sjf, slo, fair, priority"),
    ({"mixing": "eager"}, "mixing", r"mixing='eager' .*one of stall-free, prefill-first, selective"),
    ({"batching": "dynamic"}, "batching", r"batching='dynamic' .*one of continuous, static"),
    ({"preemption": "swap"}, "preemption", r"preemption='swap' .*one of recompute, drain"),
    ({"warp": 9}, "warp", r"warp=9 .*a live setting: policy, policy_params, mixing"),
    ({"policy": "sjf", "policy_params": {"aging_s": -1}}, "policy_params.aging_s",
     r"policy_params.aging_s=-1 .*a number in \[0, 86400\] for policy sjf"),
    ({"policy_params": {"aging_s": 5}}, "policy_params.aging_s",
     r"policy_params.aging_s=5 .*a parameter of policy fcfs: none"),
    ({"policy": "fair", "policy_params": {"tenant_weights": {"x": -2}}}, "policy_params.tenant_weights.x",
     r"tenant_weights.x=-2 .*\[0.001, 1000\]"),
    ({"max_num_seqs": 2, "mixing": "bogus"}, "mixing", r"mixing='bogus'"),  # nothing of it applies
    ({}, "changes", r"changes=\{\} .*non-empty"),
]


@pytest.mark.parametrize("changes,key,message", BAD, ids=[json.dumps(c)[:48] for c, _, _ in BAD])
def test_rejected_change_names_key_value_range_and_leaves_everything_as_it_was(model_dirs, changes, key,
                                                                                message):
    engine, sink = make(model_dirs["llama"], max_num_seqs=4)
    engine.add_request("a", [1, 2, 3], greedy(3))
    engine.step()
    seqs, tokens = engine.bounds.max_num_seqs, engine.bounds.max_batched_tokens  # fixed at start
    changes = {k: {"max_num_seqs": seqs + 1, "max_batched_tokens": tokens + 1}[k] if v == "above" else v
               for k, v in changes.items()}
    for name, value in (("{seqs1}", seqs + 1), ("{seqs}", seqs), ("{tokens1}", tokens + 1), ("{tokens}", tokens)):
        message = message.replace(name, str(value))
    target, live = engine.target_config, engine.live
    snapshot = json.dumps(engine.config_snapshot(), sort_keys=True)
    with pytest.raises(ConfigError, match=message) as info:
        engine.update_config(changes, source="test")
    assert info.value.key == key
    assert engine.target_config is target and engine.live is live and target.version == 0
    assert json.dumps(engine.config_snapshot(), sort_keys=True) == snapshot
    engine.run_until_done()
    assert not config_events(sink) and engine.live is live


def test_changes_apply_at_the_next_iteration_boundary_versioned_and_recorded(model_dirs):
    engine, sink = make(model_dirs["llama"], max_num_seqs=4)
    for i in range(3):
        engine.add_request(str(i), [10 + i] * 5, greedy(6))
    engine.step(), engine.step()
    new = engine.update_config({"max_num_seqs": 2}, source="console")
    assert new.version == 1 and engine.target_config.max_num_seqs == 2
    assert engine.live.version == 0 and engine.scheduler.config.max_num_seqs == 4  # not yet
    assert not config_events(sink)
    engine.clock.t = 1.5
    engine.step()
    assert engine.live is new and engine.scheduler.config is new
    (event,) = config_events(sink)
    assert event.to_dict() == {"kind": "config_change", "changes": {"max_num_seqs": 2}, "applied_iteration": 2,
                               "time": 1.5, "source": "console", "version": 1, "iteration": 2,
                               "config": new.to_dict()}  # the whole config it runs with from then on
    assert sink.iterations[-1].config_version == 1 and sink.iterations[-2].config_version == 0
    # Two changes before one step: both apply at that step, in order, each its own version.
    engine.update_config({"policy": "sjf", "policy_params": {"aging_s": 2.0}}, source="mqtt")
    engine.update_config({"mixing": "prefill-first", "chunk_size": 8}, source="preset")
    engine.step()
    e2, e3 = config_events(sink)[1:]
    assert (e2.data["version"], e3.data["version"]) == (2, 3)
    assert e2.data["applied_iteration"] == e3.data["applied_iteration"] == 3
    assert (e2.data["source"], e3.data["source"]) == ("mqtt", "preset")
    assert engine.live.policy == "sjf" and engine.live.policy_params["aging_s"] == 2.0
    assert engine.scheduler.policy.name == "sjf" and engine.scheduler.policy.aging_s == 2.0
    assert engine.live.mixing == "prefill-first" and engine.live.chunk_size == 8 and engine.live.version == 3
    # Parameters alone are merged over the current ones; the policy instance is replaced.
    policy = engine.scheduler.policy
    engine.update_config({"policy_params": {"predictor": "output"}})
    engine.step()
    assert engine.live.policy_params == {"predictor": "output", "prefill_weight": 1.0, "aging_s": 2.0}
    assert engine.scheduler.policy is not policy and engine.scheduler.policy.aging_s == 2.0
    # Switching policy without parameters starts from the new policy's defaults.
    engine.update_config({"policy": "fair"})
    engine.step()
    assert engine.live.policy_params == {"input_weight": 1.0, "output_weight": 2.0, "tenant_weights": {},
                                         "cached_weight": 0.1}
    engine.run_until_done()


@pytest.mark.parametrize("preemption", ["drain", "recompute"])
def test_lowering_max_num_seqs_drains_or_preempts_the_policys_victims(model_dirs, preemption):
    path = model_dirs["llama"]
    engine, sink = make(path, policy="priority", max_num_seqs=4, preemption=preemption)
    for i in range(4):
        engine.add_request(f"p{i}", [20 + i] * 4, greedy(8), priority=i % 2)  # p1, p3 have the lower priority
    engine.add_request("late", [40] * 4, greedy(2), priority=1)
    engine.step(), engine.step()
    assert len(engine.scheduler.running) == 4
    engine.update_config({"max_num_seqs": 2})
    counts = record_running(engine)
    engine.run_until_done()
    preempted = [e.data["request_id"] for e in sink.events if e.kind == "preemption"]
    if preemption == "drain":
        assert not preempted and counts[0] == 4  # they all keep running
        assert engine.requests["late"].first_token_iteration >= 8  # admitted only once under the cap
    else:
        assert sorted(preempted) == ["p1", "p3"] and counts[0] == 2  # lowest priority first
    under = next(i for i, c in enumerate(counts) if c <= 2)
    assert all(c <= 2 for c in counts[under:]) and all(b <= a for a, b in zip(counts[:under], counts[1:under]))
    for r in engine.requests.values():
        assert tuple(r.output_token_ids) == reference_tokens(path, tuple(r.prompt_token_ids), r.sampling.max_tokens)


def test_swapping_policy_every_iteration_never_drops_duplicates_or_restarts(model_dirs):
    path = model_dirs["llama"]
    engine, sink = make(path, max_num_seqs=3, max_batched_tokens=16, chunk_size=8)
    for i in range(6):  # one priority and class: no policy has a reason to preempt here
        engine.add_request(str(i), [30 + i] * (16 - 2 * i), greedy(5), tenant="ab"[i % 2])
    names = policy_names()
    streamed = defaultdict(list)
    k = 0
    while engine.has_unfinished:
        before = ([r.request_id for r in engine.scheduler.waiting], [r.request_id for r in engine.scheduler.running])
        engine.update_config({"policy": names[k % len(names)]})
        engine.apply_pending_config()  # the swap alone moves nobody
        assert before == ([r.request_id for r in engine.scheduler.waiting],
                          [r.request_id for r in engine.scheduler.running])
        for out in engine.step().outputs:
            streamed[out.request_id].extend(out.new_token_ids)
        k += 1
    assert len(config_events(sink)) == k
    for rid, r in engine.requests.items():
        assert r.num_preemptions == 0 and streamed[rid] == r.output_token_ids
        assert tuple(r.output_token_ids) == reference_tokens(path, tuple(r.prompt_token_ids), 5)


@pytest.mark.parametrize("policy", policy_names())
def test_generate_cli_accepts_every_policy(model_dirs, tmp_path, policy):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(json.dumps({"id": str(i), "prompt_token_ids": [5 + i] * (3 + i), "max_tokens": 3,
                                         "ignore_eos": True, "tenant": "ab"[i % 2], "priority": i % 2,
                                         "slo_class": "batch" if i % 2 else "realtime"}) for i in range(4)) + "\n")
    rc = main(["generate", "--model", model_dirs["llama"], "--input", str(src), "--output", str(out),
               "--policy", policy, "--max-num-seqs", "2", "--num-blocks", "64", "--device", "cpu"])
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["0", "1", "2", "3"]
    for r in rows:
        assert tuple(r["output_token_ids"]) == reference_tokens(model_dirs["llama"], tuple(r["prompt_token_ids"]), 3)


def test_pool_size_bounds_max_num_seqs(model_dirs):
    import pytest

    from batchdeck.engine.config import ConfigError

    from tests.helpers import make_engine

    engine = make_engine(model_dirs["qwen3"], num_blocks=6, block_size=16, max_num_seqs=4)
    assert engine.bounds.max_num_seqs == 6
    with pytest.raises(ConfigError, match=r"max_num_seqs=7 .*\[1, 6\]"):
        engine.update_config({"max_num_seqs": 7})
