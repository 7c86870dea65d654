"""The fused Triton kernels (engine/triton_fused.py) on the CPU through Triton's interpreter: float32
greedy tokens equal the stock modules', and the cross-module fusions (level 2: residual add fused into
the next RMSNorm, rotary table, K/V written by the q/k kernel) give bit-identical log-probabilities to
the per-module ones (level 1); level 3 (the layer's linears through the small-M kernel at decode row
counts, SiLU-mul in the gate|up epilogue) keeps the tokens. Skipped where Triton is not installed or its
interpreter cannot run."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from tests.triton_interpreter import interpreter_broken_reason  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize("model", ["synthetic:tiny", "synthetic:tiny-llama"])
def test_fusion_levels_match_stock_in_float32(model):
    reason = interpreter_broken_reason()
    if reason:
        pytest.skip(reason)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, os.path.join(HERE, "fused_interpreter_check.py"), model], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = json.loads(out.stdout.strip().splitlines()[-1])
    stock_tokens, stock_lp = runs["None"]
    for level in ("1", "2", "3"):
        tokens, lp = runs[level]
        assert tokens == stock_tokens, level
        assert max(abs(a - b) for k in stock_lp for a, b in zip(stock_lp[k], lp[k])) < 1e-4
    assert runs["2"][1] == runs["1"][1]
