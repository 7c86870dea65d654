"""Refit a profile's cost model from the calibration samples it was fitted on (`batchdeck calibrate
--samples-out`): the same fit `calibrate` runs (engine/sim/calibrate.py `fit_samples`, held-out
workloads as it picks them: every third of each kind), on the CPU, in seconds. The base profile
gives everything else: device, model shape, pool, graph buckets, decode splits and the idle wakes
(the samples hold busy iterations only, so the wakes stay the base's: residuals against the base's
iteration cost, which the profile's `fit.idle_wake_fitted_on` says). A workload with no busy
iteration is not in the file, so the held-out report can differ from the calibration's then; the
model, fitted on every sample, does not.

    PYTHONPATH=. python benchmarks/sim_refit.py --samples calibration.jsonl.gz \\
        --base engine/sim/profiles/h200-qwen3-0.6b.json --out engine/sim/profiles/h200-qwen3-0.6b.json
"""
from __future__ import annotations

import argparse
import dataclasses

from batchdeck.engine.sim.calibrate import Sample, fit_samples, held_out_of_kinds
from batchdeck.engine.sim.calibrate import read_samples as calibration_samples
from batchdeck.engine.sim.cost_model import CostModel
from batchdeck.engine.sim.profile import load_profile


def read_samples(path: str) -> tuple[list[Sample], dict[int, str]]:
    """Samples whose consecutive time stamps reproduce each saved busy gap (a workload's first sample
    stands for its idle start), and each workload's kind."""
    samples: list[Sample] = []
    kinds: dict[int, str] = {}
    t = 0.0
    try:
        rows = calibration_samples(path)
    except (OSError, ValueError) as exc:
        raise SystemExit(str(exc)) from None
    for n, (row, shape) in enumerate(rows, 1):
        try:
            w, gap, wait = int(row["workload"]), row["gap_s"], float(row["sync_wait_s"])
        except (ValueError, KeyError, TypeError) as exc:
            raise SystemExit(f"{path}:{n}: not a calibration sample ({exc})") from None
        if w not in kinds:
            kinds[w] = row.get("kind") or "unknown"
            t += 1.0
            samples.append(Sample(w, t, shape, True, t))  # the idle start a busy gap is measured from
        t += gap
        samples.append(Sample(w, t, shape, False, t, wait))
    return samples, kinds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", required=True, help="calibrate --samples-out file (.jsonl or .jsonl.gz)")
    ap.add_argument("--base", required=True, help="the profile the samples were calibrated for")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    base = load_profile(args.base)
    samples, kinds = read_samples(args.samples)
    c = base.cost.to_dict()
    buckets = {"decode_buckets": c["decode_buckets"], "token_buckets": c["token_buckets"], "max_rows": c["max_rows"],
               "decode_splits": c.get("decode_splits")}
    model, report = fit_samples(samples, buckets, held_out_of_kinds(kinds), set(), kinds)
    cost = {**model.to_dict(), "cuda_graphs": c["cuda_graphs"], "idle_wake_s": c["idle_wake_s"],
            "idle_wake_by_idle": c.get("idle_wake_by_idle")}
    for key in ("idle_wake_s", "idle_samples", "idle_wake_by_idle"):
        report.pop(key, None)  # the samples hold busy iterations only: the base's idle fit stands
    fitted = {**base.fit, **report, "refit_from": args.samples.rsplit("/", 1)[-1],
              "idle_wake_fitted_on": "the base profile's cost model (the samples hold busy iterations only)"}
    profile = dataclasses.replace(base, cost=CostModel(cost), fit=fitted)
    profile.save(args.out)
    held = report.get("held_out_by_regime", {})
    print(f"refit {report['num_shapes']} busy iterations: host model {'yes' if 'host' in cost else 'no'}; held-out "
          + ", ".join(f"{k} mean {v['mean_rel_error']:.1%} (total {v['total_bias']:+.1%})" for k, v in held.items())
          + "; serving " + ", ".join(f"{k} {v['mean_rel_error']:.1%} ({v['total_bias']:+.1%})"
                                     for k, v in report.get("held_out_by_kind", {}).get("serving", {}).items()))


if __name__ == "__main__":
    main()
