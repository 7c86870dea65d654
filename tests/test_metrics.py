"""engine/metrics.py: percentiles, the sliding window, rates, goodput, SLO attainment, service."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from batchdeck.engine.service.metrics import MetricsWindow, percentile, quantiles, request_finish_time, status_line, summarize
from batchdeck.engine.telemetry import IterationRecord, RequestRecord


def it(time: float, *, prefill: int = 0, generated: int = 0, step: float = 0.01, running: int = 0, waiting: int = 0,
       kv: float = 0.0, preemptions: int = 0, iteration: int = 0, itls: list[float] | None = None) -> IterationRecord:
    return IterationRecord(
        iteration=iteration, time=time, step_time=step, schedule_time=0.0, prepare_time=0.0, forward_time=step,
        sample_time=0.0, num_prefill_tokens=prefill, num_decode_tokens=generated, num_prefill_chunks=0,
        num_requests_running=running, num_requests_waiting=waiting, num_preemptions=preemptions,
        kv_blocks_used=0, kv_blocks_total=100, kv_cache_usage=kv, config_version=1, num_generated_tokens=generated,
        itls=itls or [],
    )


def req(finish: float, *, rid: str = "r", tenant: str = "a", slo_class: str = "interactive", slo_met: bool = True,
        prompt: int = 10, output: int = 5, ttft: float | None = 0.1, tpot: float | None = 0.02,
        itl_p99: float | None = None, itl_max: float | None = None, e2e: float = 1.0) -> RequestRecord:
    return RequestRecord(
        request_id=rid, tenant=tenant, slo_class=slo_class, priority=0, prompt_tokens=prompt, output_tokens=output,
        arrival=finish - e2e, queue_time=0.0, ttft=ttft, tpot=tpot, itl_p50=tpot, itl_p99=itl_p99, itl_max=itl_max,
        e2e_latency=e2e, finish_reason="length", num_preemptions=0, slo_met=slo_met, first_token_iteration=None,
        finish_iteration=None, finish=finish,
    )


# -- percentile -----------------------------------------------------------------------------------

def test_percentile_linear_interpolation():
    xs = [4.0, 1.0, 3.0, 2.0]  # unsorted on purpose
    assert percentile(xs, 0) == 1.0
    assert percentile(xs, 100) == 4.0
    assert percentile(xs, 50) == pytest.approx(2.5)
    assert percentile(xs, 90) == pytest.approx(3.7)  # rank 0.9 * 3 = 2.7 -> 3 + 0.7 * (4 - 3)
    assert percentile([7.0], 99) == 7.0
    assert percentile(list(range(101)), 99) == pytest.approx(99.0)


def test_percentile_empty_is_none_and_bad_q_raises():
    assert percentile([], 50) is None
    assert quantiles([None, None]) == {"p50": None, "p90": None, "p99": None}
    with pytest.raises(ValueError, match="0..100"):
        percentile([1.0], 101)
    with pytest.raises(ValueError):
        percentile([1.0], -1)


@given(st.lists(st.floats(min_value=-1e6, max_value=1e6), min_size=1, max_size=50), st.floats(0, 100))
def test_percentile_bounded_and_monotone(xs, q):
    p = percentile(xs, q)
    tol = 1e-9 * max(1.0, abs(min(xs)), abs(max(xs)))
    assert min(xs) - tol <= p <= max(xs) + tol
    assert percentile(xs, min(100.0, q + 1)) >= p - 1e-9 * max(1.0, abs(p))


# -- the window -----------------------------------------------------------------------------------

def test_throughput_from_known_records():
    w = MetricsWindow(window_s=10.0)
    for t in range(1, 21):  # one iteration per second: 100 prompt + 8 generated tokens each
        w.add_iteration(it(float(t), prefill=100, generated=8, iteration=t))
    snap = w.snapshot(now=20.0)
    # window (10, 20] holds t = 11..20: 10 iterations
    assert snap["num_iterations"] == 10
    assert snap["prompt_throughput"] == pytest.approx(100.0)  # 1000 tokens / 10 s
    assert snap["generation_throughput"] == pytest.approx(8.0)
    assert snap["iterations_per_s"] == pytest.approx(1.0)


def test_window_drops_old_samples():
    w = MetricsWindow(window_s=5.0)
    w.add_iteration(it(1.0, prefill=1000, preemptions=3, step=0.5))
    w.add_request(req(1.0, ttft=9.0))
    w.add_iteration(it(9.0, prefill=10, step=0.01))
    w.add_request(req(9.0, ttft=0.2))
    snap = w.snapshot(now=10.0)
    assert snap["num_iterations"] == 1
    assert snap["num_prompt_tokens"] == 10
    assert snap["num_preemptions"] == 0
    assert snap["step_time"]["p99"] == pytest.approx(0.01)
    assert snap["num_requests_finished"] == 1
    assert snap["time_to_first_token"]["p99"] == pytest.approx(0.2)
    later = w.snapshot(now=100.0)
    assert later["num_iterations"] == 0 and later["num_requests_finished"] == 0
    assert later["time_to_first_token"]["p50"] is None
    assert later["prompt_throughput"] == 0.0


def test_rates_use_elapsed_time_during_the_first_window():
    w = MetricsWindow(window_s=10.0, start=0.0)
    w.add_iteration(it(1.0, prefill=40, generated=4))
    w.add_iteration(it(2.0, prefill=40, generated=4))
    snap = w.snapshot(now=4.0)
    assert snap["span_s"] == pytest.approx(4.0)
    assert snap["prompt_throughput"] == pytest.approx(20.0)
    assert snap["generation_throughput"] == pytest.approx(2.0)


def test_running_waiting_kv_are_latest_and_preemptions_summed():
    w = MetricsWindow(window_s=10.0)
    w.add_iteration(it(1.0, running=4, waiting=9, kv=0.9, preemptions=2))
    w.add_iteration(it(2.0, running=8, waiting=3, kv=0.412, preemptions=1))
    snap = w.snapshot(now=3.0)
    assert (snap["num_requests_running"], snap["num_requests_waiting"]) == (8, 3)
    assert snap["kv_cache_usage"] == pytest.approx(0.412)
    assert snap["kv_cache_usage_peak"] == pytest.approx(0.9)
    assert snap["num_preemptions"] == 3


def test_latency_percentiles_itl_over_every_gap_and_tpot_per_request():
    w = MetricsWindow(window_s=100.0)
    for i, (ttft, tpot, e2e) in enumerate([(0.1, 0.010, 1.0), (0.2, 0.020, 2.0), (0.3, 0.030, 3.0),
                                           (0.4, 0.040, 4.0), (0.5, 0.050, 5.0)]):
        w.add_request(req(10.0 + i, rid=f"r{i}", ttft=ttft, tpot=tpot, e2e=e2e, itl_p99=tpot * 10, itl_max=tpot * 20))
    w.add_request(req(16.0, rid="no-first-token", ttft=None, tpot=None, e2e=0.5))
    # ITL: every gap, whichever request it belongs to: 99 gaps of 10 ms and one 1 s stall
    w.add_iteration(it(11.0, itls=[0.01] * 50))
    w.add_iteration(it(12.0, itls=[0.01] * 49 + [1.0]))
    snap = w.snapshot(now=20.0)
    assert snap["time_to_first_token"]["p50"] == pytest.approx(0.3)  # None ttft is left out
    assert snap["time_to_first_token"]["p90"] == pytest.approx(0.46)
    tpot = snap["time_per_output_token"]
    assert tpot["p50"] == pytest.approx(0.030) and tpot["p99"] == pytest.approx(0.0496)
    assert tpot["mean"] == pytest.approx(0.030)
    itl = snap["inter_token_latency"]
    assert itl["p50"] == pytest.approx(0.01) and itl["p90"] == pytest.approx(0.01)
    assert itl["p99"] == pytest.approx(0.01 + 0.01 * (1.0 - 0.01))  # rank 98.01 of 0..99
    assert itl["mean"] == pytest.approx((99 * 0.01 + 1.0) / 100) and itl["max"] == 1.0
    assert snap["e2e_request_latency"]["p50"] == pytest.approx(2.5)  # 0.5, 1..5 -> median 2.5
    empty = MetricsWindow(window_s=10.0).snapshot(now=1.0)["inter_token_latency"]
    assert empty == {"p50": None, "p90": None, "p99": None, "mean": None, "max": None}


def test_goodput_and_slo_attainment_per_class():
    w = MetricsWindow(window_s=10.0)
    outcomes = [("realtime", True), ("realtime", False), ("realtime", True), ("realtime", True),
                ("batch", False), ("interactive", True)]
    for i, (cls, met) in enumerate(outcomes):
        w.add_request(req(11.0 + i, rid=f"r{i}", slo_class=cls, slo_met=met))
    snap = w.snapshot(now=20.0)
    assert snap["goodput"] == pytest.approx(4 / 10.0)
    assert snap["request_throughput"] == pytest.approx(6 / 10.0)
    att = snap["slo_attainment"]
    assert att["realtime"] == {"met": 3, "count": 4, "fraction": 0.75}
    assert att["batch"] == {"met": 0, "count": 1, "fraction": 0.0}
    assert att["interactive"]["fraction"] == 1.0


def test_service_per_tenant_window_and_cumulative():
    w = MetricsWindow(window_s=10.0)
    w.add_request(req(1.0, tenant="noisy", prompt=1000, output=100))
    w.add_request(req(15.0, tenant="noisy", prompt=200, output=50))
    w.add_request(req(16.0, tenant="quiet", prompt=30, output=20))
    service = w.snapshot(now=20.0)["service_per_tenant"]
    assert service["noisy"] == {"window": 250, "cumulative": 1350}
    assert service["quiet"] == {"window": 50, "cumulative": 50}
    # a tenant with nothing in the window keeps its cumulative count
    assert w.snapshot(now=100.0)["service_per_tenant"]["quiet"] == {"window": 0, "cumulative": 50}


def test_add_routes_by_topic_and_finish_falls_back_to_arrival_plus_e2e():
    w = MetricsWindow(window_s=10.0)
    r = req(5.0)
    r.finish = 0.0  # engine did not set it: arrival (4.0) + e2e (1.0)
    assert request_finish_time(r) == pytest.approx(5.0)
    w.add("request", r)
    w.add("iteration", it(5.0, prefill=7))
    w.add("event", object())  # ignored
    snap = w.snapshot(now=6.0)
    assert snap["num_requests_finished"] == 1 and snap["num_prompt_tokens"] == 7


def test_window_must_be_positive():
    with pytest.raises(ValueError, match="window_s"):
        MetricsWindow(window_s=0)


# -- whole run and the status line ----------------------------------------------------------------

def test_summarize_whole_run():
    iterations = [it(float(t), prefill=50, generated=5, step=1.0, kv=0.1 * t) for t in range(1, 11)]  # spans 0..10 s
    requests = [req(5.0, tenant="a", slo_met=True, prompt=10, output=5),
                req(9.0, tenant="b", slo_met=False, prompt=20, output=5, slo_class="realtime")]
    s = summarize(iterations, requests)
    assert s["span_s"] == pytest.approx(10.0)
    assert s["prompt_throughput"] == pytest.approx(50.0)
    assert s["generation_throughput"] == pytest.approx(5.0)
    assert s["goodput"] == pytest.approx(0.1)
    assert s["kv_cache_usage"] == pytest.approx(1.0) and s["kv_cache_usage_peak"] == pytest.approx(1.0)
    assert s["service_per_tenant"]["b"] == {"window": 25, "cumulative": 25}
    assert s["slo_attainment"]["realtime"]["fraction"] == 0.0
    assert summarize(iterations, requests, duration_s=20.0)["prompt_throughput"] == pytest.approx(25.0)
    empty = summarize([], [])
    assert empty["prompt_throughput"] == 0.0 and empty["time_to_first_token"]["p50"] is None


def test_status_line_contains_the_numbers():
    w = MetricsWindow(window_s=10.0)
    w.add_iteration(it(10.0, prefill=1234, generated=567, running=8, waiting=3, kv=0.412, itls=[0.020, 0.044]))
    w.add_request(req(10.0, ttft=0.12, tpot=0.020))
    w.add_request(req(10.0, ttft=0.40, tpot=0.044))
    line = status_line(w.snapshot(now=10.0))
    assert "Avg prompt throughput: 123.4 tokens/s" in line
    assert "Avg generation throughput: 56.7 tokens/s" in line
    assert "Running: 8 reqs" in line and "Waiting: 3 reqs" in line
    assert "KV cache usage: 41.2%" in line
    assert "Preemptions: 0" in line
    assert "TTFT p50/p99: 0.26/0.40 s" in line
    assert "ITL p50/p99: 32/44 ms" in line  # gaps of 20 and 44 ms: p50 32, p99 43.76
    assert "\n" not in line


def test_status_line_without_requests():
    line = status_line(MetricsWindow().snapshot(now=1.0))
    assert "TTFT p50/p99: -/- s" in line and "ITL p50/p99: -/- ms" in line


def test_speculation_acceptance_and_tokens_per_iteration():
    import dataclasses

    w = MetricsWindow(window_s=10.0)
    assert w.snapshot(1.0)["speculation"] == {"proposed": 0, "accepted": 0, "acceptance_rate": None,
                                              "tokens_per_iteration": None}
    w.add_iteration(it(0.5, generated=4))  # speculation off: one token per running request
    w.add_iteration(dataclasses.replace(it(1.0, generated=10), spec_proposed=12, spec_accepted=6))
    w.add_iteration(dataclasses.replace(it(1.5, generated=7), spec_proposed=8, spec_accepted=3))
    spec = w.snapshot(2.0)["speculation"]
    assert (spec["proposed"], spec["accepted"]) == (20, 9)
    assert spec["acceptance_rate"] == pytest.approx(0.45)
    assert spec["tokens_per_iteration"] == pytest.approx(7.0)
