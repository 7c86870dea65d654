"""Run by tests/test_small_m_linear.py in a child process with TRITON_INTERPRET=1 (set before the kernel is
defined): the small-M linear on the CPU through Triton's interpreter, float32, against F.linear (and
SiLU(gate) * up for a gate|up weight) for ragged and even shapes, every mode, split-K and epilogue.
Prints one JSON line: a list of {case, config, max_rel_err, counters_zero}."""
from __future__ import annotations

import json

import torch
import torch.nn.functional as F

from batchdeck.engine.small_m_linear import counters, small_m_linear
from batchdeck.engine.small_m_rule import SmallMConfig, pick_config

# (M, N, K): M=1, ragged N and K (not multiples of the tiles), K over several splits, the most rows
SHAPES = [(1, 96, 256), (1, 33, 80), (2, 64, 512), (3, 50, 200), (4, 40, 96), (5, 72, 160), (8, 128, 384),
          (16, 64, 256), (16, 17, 48)]
CONFIGS = [SmallMConfig("dot", 16, 32, 1), SmallMConfig("dot", 32, 64, 2), SmallMConfig("dot", 16, 32, 4),
           SmallMConfig("dot", 32, 16, 3), SmallMConfig("fma", 8, 32, 1), SmallMConfig("fma", 16, 32, 2),
           SmallMConfig("fma", 8, 16, 5)]


def reference(x, w, b, silu):
    y = F.linear(x, w, b)
    if silu:
        i = w.shape[0] // 2
        return F.silu(y[:, :i]) * y[:, i:]
    return y


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    results = []
    for m, n, k in SHAPES:
        for epilogue in ("none", "bias", "silu"):
            rows = 2 * n if epilogue == "silu" else n
            x = torch.randn(m, k, generator=gen)
            w = torch.randn(rows, k, generator=gen) / k ** 0.5
            b = torch.randn(rows, generator=gen) if epilogue == "bias" else None
            want = reference(x, w, b, epilogue == "silu")
            picked = pick_config(m, n, k, 132, silu=epilogue == "silu")
            for config in [picked] + CONFIGS:
                try:
                    got = small_m_linear(x, w, b, silu_mul=epilogue == "silu", config=config)
                except ValueError as exc:  # a config that does not fit the shape is refused, by name
                    assert "does not fit" in str(exc), exc
                    continue
                err = ((got - want).abs().max() / want.abs().max()).item()
                results.append({"case": [m, n, k, epilogue], "config": config.label(), "max_rel_err": err,
                                "shape_ok": list(got.shape) == list(want.shape),
                                "counters_zero": int(counters("cpu").abs().sum()) == 0})
    # a 3-D input [1, T, K] (how the HF modules pass hidden states) keeps its leading dims
    x = torch.randn(1, 3, 64, generator=gen)
    w = torch.randn(40, 64, generator=gen)
    got = small_m_linear(x, w)
    results.append({"case": [3, 40, 64, "3-d input"], "config": "rule",
                    "max_rel_err": ((got - F.linear(x, w)).abs().max() / F.linear(x, w).abs().max()).item(),
                    "shape_ok": list(got.shape) == [1, 3, 40],
                    "counters_zero": int(counters("cpu").abs().sum()) == 0})
    print(json.dumps(results))


if __name__ == "__main__":
    main()
