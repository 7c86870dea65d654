"""Cache-aware scheduling: the policy interface's cached-prefix look-up, the cache-aware policy
(longest cached prefix first, aging), and fair / slo counting cached tokens as cheaper service."""
from __future__ import annotations

import random

from batchdeck.engine.request import Request, SamplingParams
from batchdeck.engine.telemetry import ListSink
from batchdeck.policies import make_policy
from tests.helpers import greedy, make_engine, reference_tokens


def req(seq: int, n: int = 40, arrival: float = 0.0, tenant: str = "default", slo_class: str = "interactive") -> Request:
    r = Request(f"r{seq}", list(range(n)), SamplingParams(max_tokens=4), arrival_time=arrival, tenant=tenant,
                slo_class=slo_class)
    r.admission_seq = seq
    return r


def with_cache(policy, cached: dict[str, int]):
    policy.prefix_lookup = lambda r: cached.get(r.request_id, 0)
    return policy


def ids(rs):
    return [r.request_id for r in rs]


def test_cache_aware_orders_by_cached_tokens_then_arrival():
    p = with_cache(make_policy("cache-aware"), {"r1": 16, "r2": 32, "r3": 16})
    waiting = [req(0), req(1), req(2), req(3)]
    assert ids(p.order_waiting(waiting, now=1.0)) == ["r2", "r1", "r3", "r0"]


def test_cache_aware_share_metric_ranks_by_cached_fraction():
    p = with_cache(make_policy("cache-aware", {"metric": "share"}), {"r0": 32, "r1": 16})
    waiting = [req(0, n=320), req(1, n=20)]
    assert ids(p.order_waiting(waiting, now=0.0)) == ["r1", "r0"]


def test_cache_aware_aging_bounds_starvation():
    p = with_cache(make_policy("cache-aware", {"aging_s": 5.0}), {"r2": 64, "r3": 64})
    waiting = [req(0, arrival=0.0), req(1, arrival=1.0), req(2, arrival=8.0), req(3, arrival=9.0)]
    assert ids(p.order_waiting(waiting, now=9.5)) == ["r0", "r1", "r2", "r3"]  # r0, r1 waited 5 s: FCFS first
    assert ids(p.order_waiting(waiting, now=5.5)) == ["r0", "r2", "r3", "r1"]


def test_cache_aware_without_caching_is_fcfs():
    p = make_policy("cache-aware")
    waiting = [req(2), req(0), req(1)]
    assert ids(p.order_waiting(waiting, now=0.0)) == ["r0", "r1", "r2"]


def test_fair_charges_cached_prompt_tokens_at_cached_weight():
    p = make_policy("fair", {"input_weight": 1.0, "cached_weight": 0.25})
    a = req(0, n=100, tenant="a")
    p.on_prefix_hit(a, 64)
    p.on_tokens_computed(a, 36, 1)
    assert p.counter("a") == 64 * 0.25 + 36 + 2.0
    with_cache(p, {"r1": 80})
    warm, cold = req(1, n=100, tenant="b"), req(2, n=100, tenant="c")
    assert p._cost(warm) == 20 + 80 * 0.25 + 2.0 and p._cost(cold) == 100 + 2.0


def test_slo_prefill_token_s_moves_cold_long_prompts_earlier():
    p = with_cache(make_policy("slo", {"prefill_token_s": 0.01}), {"r1": 512})
    cold, warm = req(0, n=520, arrival=0.5), req(1, n=520, arrival=0.0)
    # same class: warm arrived first (earlier deadline), but the cold one needs 5.2 s of prefill
    assert ids(p.order_waiting([warm, cold], now=0.6)) == ["r0", "r1"]
    assert ids(make_policy("slo").order_waiting([warm, cold], now=0.6)) == ["r1", "r0"]


def test_the_scheduler_binds_the_cache_look_up_and_cache_aware_admits_the_warm_request_first(model_dirs):
    path = model_dirs["llama"]
    sink = ListSink()
    engine = make_engine(path, block_size=4, num_blocks=64, sink=sink, policy="cache-aware", max_num_seqs=1)
    rng = random.Random(4)
    warm_prefix = [rng.randrange(256) for _ in range(24)]
    engine.add_request("seed", warm_prefix + [1], greedy(2))
    engine.run_until_done()
    cold = [rng.randrange(256) for _ in range(25)]
    engine.add_request("cold", cold, greedy(2))
    engine.add_request("warm", warm_prefix + [2, 3], greedy(2))
    assert engine.scheduler.policy.cached_tokens(engine.requests["warm"]) == 24
    assert engine.scheduler.policy.cached_tokens(engine.requests["cold"]) == 0
    engine.step()
    assert [r.request_id for r in engine.scheduler.running] == ["warm"]
    engine.run_until_done()
    for rid, prompt in (("cold", cold), ("warm", warm_prefix + [2, 3])):
        assert tuple(engine.requests[rid].output_token_ids) == reference_tokens(path, tuple(prompt), 2)
    engine.update_config({"policy": "fcfs"})
    engine.step()
    assert engine.scheduler.policy.cached_tokens(engine.requests["warm"]) == 24  # a swapped-in policy is bound too
