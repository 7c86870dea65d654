"""The small-M linear (engine/small_m_linear.py; its launch rule: tests/test_small_m_rule.py): its kernel on the CPU through
Triton's interpreter in float32 against F.linear, and on CUDA in bf16/float32 at the qwen3-0.6b layer
shapes, inside a CUDA graph too. Skipped where Triton is not installed (the CUDA tests without a GPU)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from batchdeck.engine.small_m_linear import counters, small_m_linear  # noqa: E402
from batchdeck.engine.small_m_rule import (MAX_ROWS, SHARED_MEMORY_BYTES, SmallMConfig,  # noqa: E402
                                           candidate_configs, pick_config)
from tests.test_small_m_rule import QWEN3_SHAPES  # noqa: E402
from tests.triton_interpreter import interpreter_broken_reason  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")



def test_the_kernel_refuses_what_it_cannot_run():
    x, w = torch.randn(MAX_ROWS + 1, 64), torch.randn(32, 64)
    with pytest.raises(ValueError, match="at most 64 rows"):
        small_m_linear(x, w)
    with pytest.raises(ValueError, match="K contiguous"):
        small_m_linear(x[:2], torch.randn(64, 32).t())
    with pytest.raises(ValueError, match=r"silu_mul needs a gate\|up weight"):
        small_m_linear(x[:2], torch.randn(33, 64), silu_mul=True)


def test_kernel_matches_f_linear_in_the_interpreter():
    reason = interpreter_broken_reason()
    if reason:
        pytest.skip(reason)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, os.path.join(HERE, "small_m_linear_check.py")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    cases = {tuple(r["case"]) for r in results}
    assert len(cases) == 9 * 3 + 1
    assert {r["config"].split()[0] for r in results} >= {"dot", "fma"}
    assert any(" s1 " not in r["config"] and r["config"] != "rule" for r in results)  # split-K ran
    for r in results:
        assert r["shape_ok"] and r["counters_zero"], r
        assert r["max_rel_err"] < 1e-5, r


def _reference(x, w, b, silu):
    from batchdeck.engine.triton_fused import silu_mul

    y = F.linear(x, w, b)
    return silu_mul(y) if silu else y


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, k, silu", QWEN3_SHAPES)
def test_every_candidate_matches_f_linear_on_cuda(dtype, n, k, silu):
    torch.manual_seed(0)
    w = torch.randn(2 * n if silu else n, k, device="cuda", dtype=dtype) / k ** 0.5
    for m in (1, 3, 8, 16):
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        want = _reference(x, w, None, silu).double()
        elem = torch.tensor([], dtype=dtype).element_size()
        for config in [pick_config(m, n, k, 132, elem, silu)] + candidate_configs(m, n, k, elem, silu):
            got = small_m_linear(x, w, silu_mul=silu, config=config).double()
            err = ((got - want).norm() / want.norm()).item()
            assert err < (1e-5 if dtype == torch.float32 else 1e-2), (m, config.label(), err)
    assert int(counters("cuda").abs().sum()) == 0


LLAMA_LARGE = [(14336, 4096, True), (4096, 14336, False), (32768, 1024, False)]  # gate|up, down_proj, an lm_head


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, k, silu", LLAMA_LARGE)
def test_more_than_16_rows_match_f_linear_on_cuda(dtype, n, k, silu):
    """17-64 rows (row tiles of 32 and 64, ragged counts masked): the rule's pick and every fourth wide
    candidate against F.linear; a weight the rule leaves to cuBLAS above 32 rows is refused by name."""
    torch.manual_seed(0)
    w = torch.randn(2 * n if silu else n, k, device="cuda", dtype=dtype) / k ** 0.5
    elem = torch.tensor([], dtype=dtype).element_size()
    for m in (17, 40, 64):
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        want = _reference(x, w, None, silu).double()
        picked = pick_config(m, n, k, 132, elem, silu)
        assert picked is not None and picked.mode == "dot"
        for config in [picked] + candidate_configs(m, n, k, elem, silu)[::4]:
            got = small_m_linear(x, w, silu_mul=silu, config=config).double()
            err = ((got - want).norm() / want.norm()).item()
            assert err < (1e-5 if dtype == torch.float32 else 1e-2), (m, config.label(), err)
        assert torch.equal(small_m_linear(x, w, silu_mul=silu), small_m_linear(x, w, silu_mul=silu, config=picked))
    assert int(counters("cuda").abs().sum()) == 0
    with pytest.raises(ValueError, match="no launch rule for 40 rows"):
        small_m_linear(torch.randn(40, 1024, device="cuda", dtype=dtype), torch.randn(1024, 1024, device="cuda", dtype=dtype))


@pytest.mark.cuda
@cuda
def test_bias_and_split_k_inside_a_cuda_graph():
    """Calls captured in a graph replay with new inputs, the split-K counters back at zero after each."""
    torch.manual_seed(0)
    dtype = torch.bfloat16
    w = torch.randn(1024, 3072, device="cuda", dtype=dtype) / 3072 ** 0.5
    b = torch.randn(1024, device="cuda", dtype=dtype)
    config = pick_config(4, 1024, 3072, torch.cuda.get_device_properties(0).multi_processor_count)
    assert config.split_k > 1
    x = torch.randn(4, 3072, device="cuda", dtype=dtype)
    counters("cuda")
    small_m_linear(x, w, b)  # compiles outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = small_m_linear(x, w, b)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        want = F.linear(x, w, b).double()
        assert ((y.double() - want).norm() / want.norm()).item() < 1e-2
    assert int(counters("cuda").abs().sum()) == 0


def _compile_for_hopper(config: SmallMConfig, m: int, silu: bool):
    """Triton's ahead-of-time compile of the kernel for sm_90 (no GPU needed: ptxas ships with Triton)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from batchdeck.engine.small_m_linear import block_m_for, small_m_linear_kernel

    pointers = {"X": "*bf16", "W": "*bf16", "B": "*bf16", "OUT": "*bf16", "WS": "*fp32", "CNT": "*i32"}
    ints = ["M", "N", "K", "k_per_split", "stride_x", "stride_w", "stride_out"]
    constexprs = {"BLOCK_M": block_m_for(config.mode, m), "BLOCK_N": config.block_n, "BLOCK_K": config.block_k,
                  "USE_DOT": config.mode == "dot", "SPLIT": config.split_k > 1, "SILU": silu, "HAS_BIAS": False,
                  "EVEN_K": True, "IEEE": False}
    signature = {**pointers, **{i: "i32" for i in ints}, **{c: "constexpr" for c in constexprs}}
    divisible = [i for i, name in enumerate(signature) if name in pointers or (name in ints and name != "M")]
    src = ASTSource(fn=small_m_linear_kernel, signature=signature, constexprs=constexprs,
                    attrs={(i,): [["tt.divisibility", 16]] for i in divisible})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": config.num_warps, "num_stages": config.num_stages})


def test_the_rules_picks_build_for_hopper_within_shared_memory():
    """What the rule picks for qwen3-0.6b and llama-3.1-8b compiles for sm_90 and fits its shared memory."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"Triton's CUDA backend is not importable: {exc}")
    llama = [(6144, 4096, False), (4096, 4096, False), (14336, 4096, True), (4096, 14336, False)]
    picks = {(pick_config(m, n, k, 132, silu=silu), silu) for n, k, silu in QWEN3_SHAPES + llama for m in (1, 16)}
    for config, silu in sorted(picks, key=lambda p: (p[0].label(), p[1])):
        kernel = _compile_for_hopper(config, 16, silu)
        assert kernel.metadata.shared <= SHARED_MEMORY_BYTES, (config.label(), silu, kernel.metadata.shared)
        if config.mode == "dot":
            assert "mma" in kernel.asm["ptx"]  # the tensor cores do the arithmetic


def test_gpu_benchmark_smoke_runs_on_the_cpu(tmp_path):
    """benchmarks/gpu_gemv_bench.py --smoke: its measuring code path through the interpreter, outputs checked."""
    reason = interpreter_broken_reason()
    if reason:
        pytest.skip(reason)
    root = os.path.dirname(HERE)
    out_path = tmp_path / "gemv.json"
    out = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "gpu_gemv_bench.py"), "--smoke",
                          "--rows", "1,16", "--smoke-stride", "9", "--out", str(out_path)],
                         capture_output=True, text=True, timeout=600, cwd=root,
                         env={**os.environ, "PYTHONPATH": root})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out_path.read_text())
    assert result["device"].startswith("cpu")
    points = result["points"]
    assert {(p["linear"], p["M"]) for p in points} == {(name, m) for name in ("qkv", "o_proj", "gate_up", "down_proj")
                                                         for m in (1, 16)}
    for p in points:
        assert p["rule_pick"] and p["rule_us"] is not None and p["best"] is not None
        assert all(r["rel_err"] < 1e-5 for r in p["configs"])
