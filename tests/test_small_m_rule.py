"""The small-M linear's launch rule (engine/small_m_rule.py): pure, so it runs without Triton or a GPU,
checked against the H200 measurement of every candidate config (benchmarks/results/gpu_gemv_h200.json)."""
from __future__ import annotations

import json
import os

import pytest

from batchdeck.engine.small_m_rule import (MAX_ROWS, SHARED_MEMORY_BYTES, SmallMConfig, candidate_configs, fits,
                                           pick_config, shared_memory_estimate)

HERE = os.path.dirname(os.path.abspath(__file__))
# qwen3-0.6b's per-layer linears (N, K, SiLU-mul epilogue): qkv, o_proj, gate|up (N = I), down_proj
QWEN3_SHAPES = [(4096, 1024, False), (1024, 2048, False), (3072, 1024, True), (1024, 3072, False)]


@pytest.mark.parametrize("m", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("n, k, silu", QWEN3_SHAPES)
def test_rule_picks_a_fitting_measured_config(m, n, k, silu):
    config = pick_config(m, n, k, 132, silu=silu)
    assert config is not None and fits(config, m, n, k, silu)
    assert pick_config(m, n, k, 132, silu=silu) == config  # shapes only
    assert config in candidate_configs(m, n, k, silu=silu)  # the GPU benchmark measures what the rule picks
    fp32 = pick_config(m, n, k, 132, elem_bytes=4, silu=silu)
    assert fits(fp32, m, n, k, silu) and shared_memory_estimate(fp32, 4, silu) <= SHARED_MEMORY_BYTES


def test_rule_is_near_the_best_config_measured_on_the_h200():
    """benchmarks/results/gpu_gemv_h200.json times every candidate of every qwen3-0.6b and llama-3.1-8b
    layer linear at 1-16 rows: the rule's pick is within 10% of the fastest there, and the layer's four
    linears through the rule beat cuBLAS (+ the SiLU-mul kernel) at every row count of qwen3-0.6b."""
    with open(os.path.join(HERE, "..", "benchmarks", "results", "gpu_gemv_h200.json")) as f:
        saved = json.load(f)
    layer: dict[tuple[str, int], list[float]] = {}
    for p in saved["points"]:
        times = {c["config"]: c["us"] for c in p["configs"] if c.get("us")}
        pick = pick_config(p["M"], p["N"], p["K"], saved["sms"], silu=p["silu_mul"]).label()
        assert times[pick] <= 1.10 * min(times.values()), (p["model"], p["linear"], p["M"], pick)
        cublas = p["cublas_plus_silu_mul_us"] if p["silu_mul"] else p["cublas_us"]
        sums = layer.setdefault((p["model"], p["M"]), [0.0, 0.0])
        sums[0] += times[pick]
        sums[1] += cublas
    for (model, m), (rule_us, cublas_us) in layer.items():
        if model == "qwen3-0.6b":
            assert rule_us < cublas_us, (m, rule_us, cublas_us)


def test_rule_above_16_rows_and_for_lm_heads_against_the_h200():
    """benchmarks/results/gpu_gemv_h200_wide.json times the same linears and both lm_heads at 16-64 rows
    (row tiles of 32 and 64): where the rule takes a shape its pick is within 10% of the fastest candidate
    and at most 3% over cuBLAS (+ the SiLU-mul kernel); a layer's four linears through the rule take no
    longer than through cuBLAS at every row count above 16, and less for llama-3.1-8b at 64 rows."""
    with open(os.path.join(HERE, "..", "benchmarks", "results", "gpu_gemv_h200_wide.json")) as f:
        saved = json.load(f)
    with open(os.path.join(HERE, "..", "benchmarks", "results", "gpu_gemv_h200.json")) as f:
        small_file_rows = max(json.load(f)["rows"])  # the rows the test above covers
    layer: dict[tuple[str, int], list[float]] = {}
    taken = set()
    for p in saved["points"]:
        if p["M"] <= small_file_rows and p["linear"] != "lm_head":
            continue  # the test above, on gpu_gemv_h200.json
        times = {c["config"]: c["us"] for c in p["configs"] if c.get("us")}
        cublas = p["cublas_plus_silu_mul_us"] if p["silu_mul"] else p["cublas_us"]
        pick = pick_config(p["M"], p["N"], p["K"], saved["sms"], silu=p["silu_mul"])
        got = times[pick.label()] if pick else cublas
        where = (p["model"], p["linear"], p["M"], pick and pick.label())
        if pick:
            taken.add((p["model"], p["linear"], p["M"]))
            assert got <= 1.10 * min(times.values()) and got <= 1.03 * cublas, where
        if p["linear"] != "lm_head":
            sums = layer.setdefault((p["model"], p["M"]), [0.0, 0.0])
            sums[0] += got
            sums[1] += cublas
    for (model, m), (rule_us, cublas_us) in layer.items():
        assert rule_us <= cublas_us, (model, m, rule_us, cublas_us)
    assert layer[("llama-3.1-8b", 64)][0] < 0.98 * layer[("llama-3.1-8b", 64)][1]
    assert {("llama-3.1-8b", "gate_up", 64), ("llama-3.1-8b", "down_proj", 64), ("llama-3.1-8b", "lm_head", 64),
            ("qwen3-0.6b", "lm_head", 64)} <= taken


def test_rule_leaves_larger_batches_to_cublas():
    assert pick_config(MAX_ROWS + 1, 4096, 1024, 132) is None
    assert pick_config(0, 4096, 1024, 132) is None
    assert pick_config(40, 4096, 4096, 132) is None  # a 16 Mi-element weight above 32 rows: cuBLAS's
    assert pick_config(24, 4096, 4096, 132) is not None
    for m in (1, 8, 15):  # a vocabulary-sized weight, measured from 16 rows only
        assert pick_config(m, 128256, 4096, 132) is None and pick_config(m, 151936, 1024, 132) is None
    assert pick_config(16, 128256, 4096, 132) is not None


@pytest.mark.parametrize("m", [17, 32, 33, 64])
@pytest.mark.parametrize("elem_bytes", [2, 4])
def test_wide_picks_fit_and_are_measured_candidates(m, elem_bytes):
    for n, k, silu in [(14336, 4096, True), (4096, 14336, False), (128256, 4096, False), (151936, 1024, False)]:
        config = pick_config(m, n, k, 132, elem_bytes=elem_bytes, silu=silu)
        assert config is not None and fits(config, m, n, k, silu)
        assert shared_memory_estimate(config, elem_bytes, silu, m) <= SHARED_MEMORY_BYTES
        if elem_bytes == 2:  # the GPU benchmark measures 16-bit weights
            assert config in candidate_configs(m, n, k, elem_bytes, silu)


def test_configs_refuse_what_they_cannot_run():
    assert not fits(SmallMConfig("fma", 16, 128, 1), 5, 64, 256)  # fma takes at most 4 rows
    assert not fits(SmallMConfig("dot", 32, 256, 8), 1, 64, 1024)  # slices shorter than one K block
    fp32_gate_up = SmallMConfig("dot", 64, 128, 1, 4, 4)
    assert shared_memory_estimate(fp32_gate_up, 4, silu=True) > SHARED_MEMORY_BYTES  # did not build on the H200
    assert fp32_gate_up not in candidate_configs(8, 3072, 1024, elem_bytes=4, silu=True)


def test_a_gate_up_at_one_row_keeps_its_two_accumulators_in_registers():
    """A gate|up at one row with K >= 2048 (e.g. a 2048-wide hidden state): 8 x 1024 per accumulator fits
    the register budget, twice that does not, so the rule takes 512-wide K steps there."""
    wide = SmallMConfig("fma", 8, 1024, 1, 4, 1)
    assert fits(wide, 1, 6144, 2048) and not fits(wide, 1, 6144, 2048, silu=True)
    pick = pick_config(1, 6144, 2048, 132, silu=True)
    assert pick.block_k == 512 and fits(pick, 1, 6144, 2048, silu=True)
    assert pick_config(1, 6144, 2048, 132).block_k == 1024
