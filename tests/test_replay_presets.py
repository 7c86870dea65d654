"""Every shipped preset replays headless on synthetic:tiny (CPU) at a shortened duration, and the
lessons' presets show the expected direction when their two configs run as two runs (A/B).

The A/B runs take the shipped preset, drop its timeline, and run its workload once with the initial
config and once with the timeline's change applied from the start, both shortened. Measured on a
2-core CPU (see the numbers in the asserts' messages); the margins leave room for a busy machine.
"""
from __future__ import annotations

import dataclasses

import pytest

from batchdeck.presets import load_preset, shipped_presets
from batchdeck.presets.preset_driver import scaled_rates
from batchdeck.presets.replay import run_preset

SMOKE_SCALE = 0.05  # all seven presets in ~30-45 s on 2 cores
AB_SCALE = 0.1


@pytest.mark.parametrize("name", sorted(shipped_presets()))
def test_shipped_preset_replays_headless(name):
    preset = load_preset(shipped_presets()[name])
    assert preset.model == "synthetic:tiny" and preset.engine.get("device", "cpu") == "cpu"
    result = run_preset(preset, duration_scale=SMOKE_SCALE)
    report = result.report()
    s = report["summary"]
    assert result.error is None
    assert s["num_requests"] > 0 and s["num_rejected"] == 0 and s["num_unfinished"] == 0
    assert s["num_requests_finished"] == s["num_requests"] == result.driver.finished
    assert all(r["finish_reason"] == "length" for r in report["requests"])
    assert [t["status"] for t in report["timeline"]] == ["applied"] * len(preset.timeline)
    sets = {t["applied_iteration"] for t in report["timeline"] if t["action"] == "set"}
    assert len(report["phases"]) == 1 + len(sets - {0})
    assert s["generation_throughput"] > 0 and s["time_to_first_token"]["p99"] is not None


def ab_runs(name: str, scale: float = AB_SCALE, rate_scale: float = 1.0) -> tuple[dict, dict, dict]:
    """(before, after) summaries: the preset's initial config vs the config after its first change
    (`rate_scale`: its workload's rates multiplied by that)."""
    preset = load_preset(shipped_presets()[name])
    after = {**preset.config, **preset.timeline[0].set}
    scaled = scaled_rates(preset, rate_scale)
    reports = []
    for config in (preset.config, after):
        variant = dataclasses.replace(scaled, config=config, timeline=[])
        result = run_preset(variant, duration_scale=scale)
        assert result.error is None
        reports.append(result.report())
    return reports[0]["summary"], reports[1]["summary"], preset.timeline[0].set


def holds_in_one_of_two(name: str, check, rate_scale: float = 1.0) -> None:
    """Run the A/B pair; if `check(before, after)` lists failures (the machine may have been busier
    during one run than the other: timings are wall-clock), run the pair once more. A real
    regression fails both attempts. The message shows every attempt's numbers."""
    attempts = []
    for _ in range(2):
        before, after, change = ab_runs(name, rate_scale=rate_scale)
        assert before["num_requests"] == after["num_requests"]  # the same workload
        failures = check(before, after, change)
        if not failures:
            return
        attempts.append(failures)
    pytest.fail(f"{name}: the expected direction did not hold in two A/B attempts: {attempts}")


def _static_vs_continuous(checks):
    """A check of the A/B pair (static, continuous): `checks` maps each claim's name to a test of the pair."""
    def check(static, continuous, change) -> list[str]:
        assert change == {"batching": "continuous"}
        e2e, ttft = "e2e_request_latency", "time_to_first_token"
        numbers = (f"static {static['generation_throughput']:.0f} tok/s, {static['request_throughput']:.2f} req/s, "
                   f"e2e p99 {static[e2e]['p99']:.2f} s, TTFT p99 {static[ttft]['p99']:.2f} s; continuous "
                   f"{continuous['generation_throughput']:.0f} tok/s, {continuous['request_throughput']:.2f} req/s, "
                   f"e2e p99 {continuous[e2e]['p99']:.2f} s, TTFT p99 {continuous[ttft]['p99']:.2f} s")
        return [f"{k} failed ({numbers})" for k, ok in checks.items() if not ok(static, continuous)]
    return check


_LATENCY = {
    "e2e p99 x0.8": lambda s, c: c["e2e_request_latency"]["p99"] <= 0.8 * s["e2e_request_latency"]["p99"],
    "TTFT p99 x0.6": lambda s, c: c["time_to_first_token"]["p99"] <= 0.6 * s["time_to_first_token"]["p99"],
}
_THROUGHPUT = {
    "generation throughput x1.15": lambda s, c: c["generation_throughput"] >= 1.15 * s["generation_throughput"],
    "request throughput x1.15": lambda s, c: c["request_throughput"] >= 1.15 * s["request_throughput"],
}


def _chunked_prefill(whole, chunked, change) -> list[str]:
    assert change == {"chunk_size": 256}
    itl = "inter_token_latency"
    numbers = (f"chunk_size 4096: ITL p99 {whole[itl]['p99'] * 1e3:.0f} ms, max {whole[itl]['max'] * 1e3:.0f}"
               f" ms; chunk_size 256: p99 {chunked[itl]['p99'] * 1e3:.0f} ms, max {chunked[itl]['max'] * 1e3:.0f} ms")
    # ITL is every gap between consecutive tokens: the long prompts stall only the few gaps they land in,
    # so chunking shows in the worst gap; the p99 over all gaps moves either way (measured above: whole
    # 37-59 ms vs chunked 94-103 ms, every iteration carrying a chunk), and is not the lesson's claim.
    checks = {"max inter-token gap x0.5": chunked[itl]["max"] <= 0.5 * whole[itl]["max"]}
    return [f"{k} failed ({numbers})" for k, ok in checks.items() if not ok]


@pytest.mark.slow
def test_continuous_beats_static_on_tail_latency():
    # measured (2 busy cores): e2e p99 6.5-12 vs 3.5-4.3 s, TTFT p99 5.5-8.1 vs 0.8-1.2 s; (2 quiet cores, one
    # torch thread) TTFT p99 1.1-1.6 vs 0.03 s
    holds_in_one_of_two("static-vs-continuous", _static_vs_continuous(_LATENCY))


@pytest.mark.slow
def test_continuous_beats_static_on_throughput_when_static_batching_saturates():
    # Throughput is capped by the offered load: at the preset's own rate a quiet machine's static batching
    # nearly keeps up (2 quiet cores, one torch thread: 386-435 vs 475-526 tok/s, x1.13-1.29). At twice the
    # rate a faster machine's static batching kept up too (in the suite, 2026-12-02: 1,043-1,112 vs
    # 1,137-1,223 tok/s, x1.03-1.15, failing in most runs); at four times it saturates, and the ratio is the
    # two capacities': x1.46-1.56 (run alone, the same machine).
    holds_in_one_of_two("static-vs-continuous", _static_vs_continuous(_THROUGHPUT), rate_scale=4.0)


@pytest.mark.slow
def test_chunked_prefill_lowers_the_worst_inter_token_gap():
    # the worst gap between two tokens of a request (TPOT, a mean per request, hides the stalls chunking removes)
    holds_in_one_of_two("chunked-prefill", _chunked_prefill)
