"""benchmarks/sim_refit.py: a profile refitted from the samples its calibration wrote is the fit the
calibration made (same busy gaps, same waits, same held-out workloads)."""
import dataclasses

import numpy as np
import pytest

from batchdeck.engine.sim.calibrate import Sample, fit_samples, held_out_of_kinds, write_samples
from batchdeck.engine.sim.cost_model import CostModel, IterationShape
from benchmarks.sim_refit import read_samples
from tests.test_calibrate import TRUTH

KINDS = ("decode", "mixed", "prefill", "serving")


def _samples(seed: int = 0) -> tuple[list[Sample], dict[int, str]]:
    truth, host = CostModel(TRUTH), CostModel({**TRUTH, "decode": {"constant": 2.5e-3}, "mixed": {"constant": 3e-3}})
    rng = np.random.default_rng(seed)
    out, kinds, t = [], {}, 0.0
    for w in range(12):
        kinds[w] = KINDS[w % 4]
        for k in range(60):
            rows = [(int(rng.integers(10, 4000)), 1) for _ in range(int(rng.integers(1, 48)))]
            if w % 2:
                rows.append((int(rng.integers(0, 2000)), int(rng.choice([32, 100, 400]))))
            shape = IterationShape.of_rows(rows)
            d, h = truth.predict(shape), host.predict(shape)
            t += max(d, h) * (1 + rng.normal(0, 0.01))
            out.append(Sample(w, t, shape, after_idle=k == 0, newest_arrival=t, sync_wait=max(0.0, d - h)))
        t += 1.0
    return out, kinds


@pytest.mark.parametrize("gz", [False, True])
def test_the_refit_is_the_calibrations_fit(tmp_path, gz):
    samples, kinds = _samples()
    buckets = {k: TRUTH[k] for k in ("decode_buckets", "token_buckets", "max_rows")}
    calibrated, report = fit_samples(samples, buckets, held_out_of_kinds(kinds), set(), kinds)
    path = tmp_path / ("s.jsonl.gz" if gz else "s.jsonl")
    if gz:
        import gzip
        plain = tmp_path / "plain.jsonl"
        write_samples(str(plain), samples, kinds)
        with open(plain, "rb") as f, gzip.open(path, "wb") as g:
            g.write(f.read())
    else:
        write_samples(str(path), samples, kinds)
    read, read_kinds = read_samples(str(path))
    assert read_kinds == kinds
    refit, refit_report = fit_samples(read, buckets, held_out_of_kinds(read_kinds), set(), read_kinds)
    assert "host" in calibrated.coefficients
    for part in (calibrated.coefficients, calibrated.coefficients["host"]):  # the device's models and the host's
        got = refit.coefficients if part is calibrated.coefficients else refit.coefficients["host"]
        for regime in ("decode", "mixed"):
            for name, value in part[regime].items():
                assert got[regime][name] == pytest.approx(value, rel=1e-6, abs=1e-12)
    assert refit.coefficients.get("attention_max") == calibrated.coefficients.get("attention_max")
    for regime, row in report["held_out_by_regime"].items():
        assert refit_report["held_out_by_regime"][regime]["mean_rel_error"] == pytest.approx(row["mean_rel_error"])


def test_the_held_out_rule_takes_every_third_of_each_kind_with_two_or_more():
    kinds = {0: "decode", 1: "mixed", 2: "decode", 3: "serving", 4: "decode", 5: "decode", 6: "prefill",
             7: "mixed", 9: "idle", 10: "decode"}  # 8: a workload without busy iterations, not in the file
    assert held_out_of_kinds(kinds) == {2, 10, 7}  # the second and fifth decode, the second mixed


def test_a_line_that_is_not_a_sample_is_refused_by_number(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"workload": 0, "gap_s": 0.001, "sync_wait_s": 0.0, "decode_rows": 1}\n{"gap_s": "x"}\n')
    with pytest.raises(SystemExit, match="bad.jsonl:2"):
        read_samples(str(path))


def test_the_refitted_profile_keeps_the_base_calibrations_record(tmp_path, monkeypatch):
    """The profile sim_refit writes: the refit's cost model and errors, and every other fact the base
    profile's calibration recorded (its driver, budget, cut-short workloads, ...) as it was."""
    import sys

    from batchdeck.engine.sim.profile import load_profile
    from benchmarks import sim_refit
    from tests.helpers import save_tiny_profile

    samples, kinds = _samples()
    write_samples(str(tmp_path / "s.jsonl"), samples, kinds)
    base_path = save_tiny_profile(tmp_path / "base.json")
    base = load_profile(base_path)
    buckets = {k: TRUTH[k] for k in ("decode_buckets", "token_buckets", "max_rows", "cuda_graphs")}
    wake = {"idle_wake_s": 0.0021, "idle_wake_by_idle": [[0.02, 0.002], [0.4, 0.003]]}  # kept: not refitted
    base = dataclasses.replace(base, cost=CostModel({**base.cost.to_dict(), **buckets, **wake}),
                               fit={"driver": "serving loop", "budget_s": 45.0, "cut_short": ["decode-x"],
                                    "workloads_by_kind": {"decode": 3}, "idle_wake_s": 0.002})
    base.save(base_path)
    monkeypatch.setattr(sys, "argv", ["sim_refit.py", "--samples", str(tmp_path / "s.jsonl"), "--base", base_path,
                                      "--out", str(tmp_path / "new.json")])
    sim_refit.main()
    new = load_profile(str(tmp_path / "new.json"))
    for key, value in base.fit.items():
        assert new.fit[key] == value, key
    assert new.fit["refit_from"] == "s.jsonl" and new.fit["num_shapes"] > 0
    assert "host" in new.cost.coefficients
    assert new.cost.coefficients["idle_wake_s"] == 0.0021
    assert [list(p) for p in new.cost.coefficients["idle_wake_by_idle"]] == wake["idle_wake_by_idle"]
