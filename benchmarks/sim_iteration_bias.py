"""How a profile prices recorded iterations: the busy iterations `calibrate --samples-out` or
`gpu_sim_accuracy.py --samples-dir` wrote (JSON lines, optionally gzipped), priced by one or more
profiles at the limits the runs had, as the bias of the total time (predicted / measured - 1) per
regime and band of rows: decode-only iterations by rows (1-2, 3-8, 9-40, 41+), mixed ones split
into small (at most 400 tokens over at most 3 rows: a lightly loaded engine's prefills) and the rest.
Runs on a CPU in seconds; no engine is built.

    PYTHONPATH=. python benchmarks/sim_iteration_bias.py --profile engine/sim/profiles/h200-qwen3-0.6b.json \\
        --samples benchmarks/results/sim_samples_h200-qwen3-0.6b/*.jsonl.gz --limits 64,2048
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from batchdeck.engine.sim.calibrate import read_samples as calibration_samples  # noqa: E402
from batchdeck.engine.sim.cost_model import CostModel, IterationShape  # noqa: E402
from batchdeck.engine.sim.profile import load_profile  # noqa: E402

DECODE_BANDS = ((1, 2), (3, 8), (9, 40), (41, None))
BAND_ORDER = [f"decode {lo}-{hi}" if hi is not None else f"decode {lo}+" for lo, hi in DECODE_BANDS] + \
    ["mixed small", "mixed other"]


def read_samples(path: str) -> list[tuple[IterationShape, float]]:
    """(shape, measured gap in seconds) per line (`calibrate.read_samples`)."""
    return [(shape, row["gap_s"]) for row, shape in calibration_samples(path)]


def band(shape: IterationShape) -> str:
    if not shape.decode_only:
        return "mixed small" if shape.tokens <= 400 and shape.rows <= 3 else "mixed other"
    for lo, hi in DECODE_BANDS:
        if shape.decode_rows >= lo and (hi is None or shape.decode_rows <= hi):
            return BAND_ORDER[DECODE_BANDS.index((lo, hi))]
    raise AssertionError("a decode-only shape has at least one row")


def bias_by_band(model: CostModel, samples: list[tuple[IterationShape, float]]) -> dict[str, dict[str, float]]:
    """{band: {"samples", "measured_mean_ms", "bias"}}."""
    sums: dict[str, list[float]] = {}
    for shape, gap in samples:
        s = sums.setdefault(band(shape), [0, 0.0, 0.0])
        s[0] += 1
        s[1] += gap
        s[2] += model.predict(shape)
    return {b: {"samples": n, "measured_mean_ms": 1e3 * m / n, "bias": p / m - 1}
            for b, (n, m, p) in sorted(sums.items(), key=lambda kv: BAND_ORDER.index(kv[0]))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", action="append", required=True, help="a profile (shipped name or file); repeatable")
    ap.add_argument("--samples", nargs="+", required=True, help="JSON-lines files of iterations (.jsonl or .jsonl.gz)")
    ap.add_argument("--limits", default=None, metavar="ROWS,TOKENS",
                    help="the engine limits the samples ran under (CUDA-graph buckets), e.g. 64,2048 for the "
                         "accuracy benchmark's runs; default: the profile's own")
    ap.add_argument("--out", default=None, help="also write the table as JSON")
    args = ap.parse_args()
    limits = None
    if args.limits:
        try:
            rows, tokens = (int(v) for v in args.limits.split(","))
        except ValueError:
            ap.error(f"--limits {args.limits!r}: expected ROWS,TOKENS, e.g. 64,2048")
        limits = (rows, tokens)
    result = {}
    for name in args.profile:
        cost = load_profile(name).cost
        model = cost.for_limits(*limits) if limits else cost
        for path in args.samples:
            table = bias_by_band(model, read_samples(path))
            result.setdefault(name, {})[Path(path).name] = table
            print(f"{name} on {Path(path).name}: " + "; ".join(
                f"{b} n={v['samples']} {v['measured_mean_ms']:.2f} ms {v['bias']:+.1%}" for b, v in table.items()))
    if args.out:
        Path(args.out).write_text(json.dumps({"limits": limits, "bias": result}, indent=1) + "\n")


if __name__ == "__main__":
    main()
