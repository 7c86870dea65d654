"""The simulator: cost model fit, profiles, the simulated engine under replay/sweep/generate/console,
determinism and monotone cases. A tiny hand-made profile: no GPU needed."""
from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest

from batchdeck.cli import main as batchdeck_main
from batchdeck.engine.config import EngineConfig, LiveConfig
from batchdeck.engine.request import SamplingParams
from batchdeck.engine.settings import defaults_for
from batchdeck.engine.sim.clock import VirtualClock
from batchdeck.engine.sim.cost_model import CostModel, IterationShape, fit, regime_errors, relative_errors
from batchdeck.engine.sim.engine import SimulatedEngine, make_engine
from batchdeck.engine.sim.profile import load_profile
from batchdeck.presets.analytic import mg1_estimate, throughput_bound
from tests.helpers import TINY_SIM_COST as COST, save_tiny_profile


@pytest.fixture
def profile_path(tmp_path):
    path = tmp_path / "test-tiny.json"
    save_tiny_profile(path)
    return path


def saturated_preset(tmp_path, name="sat", rate=200, duration=2.0):
    path = tmp_path / f"{name}.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: {name}
        description: a Poisson load well past capacity
        model: synthetic:tiny
        config: {{policy: fcfs, max_num_seqs: 8, max_batched_tokens: 2048, chunk_size: 512}}
        workload:
          - kind: poisson
            rate: {rate}
            duration: {duration}
            input_tokens: {{dist: uniform, min: 64, max: 256}}
            output_tokens: {{dist: uniform, min: 32, max: 128}}
        timeline: []
        seed: 3
        """))
    return path


def test_fit_recovers_a_known_cost_model_and_reports_held_out_error():
    rng = np.random.default_rng(0)
    truth = CostModel(dict(COST))  # a first-format profile: one linear model, both regimes
    shapes = [IterationShape.of_rows([(int(rng.integers(0, 2000)), int(rng.choice([1, 1, 64, 512])))
                                      for _ in range(int(rng.integers(1, 64)))]) for _ in range(60)]
    shapes += [IterationShape.of_rows([(int(rng.integers(0, 2000)), 1) for _ in range(int(rng.integers(1, 64)))])
               for _ in range(40)]
    seconds = [truth.predict(s) * (1 + rng.normal(0, 0.01)) for s in shapes]
    model = fit(shapes[::2], seconds[::2])
    assert relative_errors(model, shapes[1::2], seconds[1::2]).mean() < 0.03
    for regime in ("decode", "mixed"):
        assert all(v >= 0 for v in model.coefficients[regime].values())
    per_token = sum(model.coefficients["mixed"][k] for k in ("prefill_tokens", "tokens", "padded_tokens"))
    assert per_token == pytest.approx(COST["prefill_tokens"], rel=0.3)  # collinear without buckets: their sum
    errs = regime_errors(model, shapes, seconds)
    assert errs["decode"]["samples"] > 20 and abs(errs["mixed"]["total_bias"]) < 0.02


def test_decode_cost_steps_with_the_cuda_graph_bucket():
    cm = CostModel({"format": "regimes/1", "decode": {"constant": 1e-3, "padded_rows": 1e-4, "rows": 1e-6},
                    "mixed": {"constant": 2e-3, "eager": 5e-3, "padded_tokens": 1e-5},
                    "decode_buckets": [1, 2, 4, 8, 16, 32], "token_buckets": [32, 64, 128], "max_rows": 32})
    d = lambda r: cm.predict(IterationShape.of_rows([(100, 1)] * r))  # noqa: E731
    assert d(17) == pytest.approx(d(32) - 15e-6)  # 17 rows replay the 32-row graph
    assert d(16) < d(17) - 1e-3
    assert d(40) == pytest.approx(1e-3 + 40e-4 + 40e-6)  # past the largest bucket: eager, its own size
    m = lambda rows: cm.predict(IterationShape.of_rows(rows))  # noqa: E731
    assert m([(0, 40)]) == pytest.approx(2e-3 + 64e-5)  # pads to the 64-token graph
    assert m([(0, 200)]) == pytest.approx(2e-3 + 5e-3 + 200e-5)  # fits no bucket: eager


def test_first_format_cost_models_load_and_predict_as_before():
    cm = CostModel(dict(COST))
    rows = [(100, 1), (2000, 1), (0, 512), (512, 64)]
    pt, pa = 512 + 64, (512 * 256.5 + 64 * (512 + 32.5)) / 1e6
    old = COST["constant"] + COST["prefill_tokens"] * pt + COST["prefill_attention"] * pa + COST["decode_rows"] * 2 \
        + COST["decode_context"] * 2.102
    assert cm.predict(IterationShape.of_rows(rows)) == pytest.approx(old)
    assert CostModel(cm.to_dict()).predict(IterationShape.of_rows(rows)) == pytest.approx(old)
    with pytest.raises(ValueError, match="unknown decode feature"):
        CostModel({"format": "regimes/1", "decode": {"nope": 1.0}, "mixed": {}})


def test_profiles_written_before_the_longest_row_terms_predict_as_before():
    """The h200-qwen3-0.6b profile as shipped before them names no `max_context` and no
    `decode_splits`: a batch costs what the sum of its contexts says, whatever its longest row."""
    cost = CostModel({"format": "regimes/1", "decode_buckets": [1, 2, 4, 8, 16, 32, 64, 96, 128],
                      "token_buckets": [32, 64, 128, 256, 512], "max_rows": 256, "idle_wake_s": 0.000865,
                      "cuda_graphs": True,
                      "decode": {"constant": 0.0013, "rows": 4.9e-06, "padded_rows": 0.0, "context": 4.2e-05},
                      "mixed": {"constant": 0.0023, "padded_tokens": 1.08e-06, "attention": 0.00152,
                                "decode_context": 3.4e-05}})
    d = cost.coefficients["decode"]
    assert "decode_splits" not in cost.to_dict() and d["max_context"] == 0.0
    even, skewed = [(379, 1)] * 34, [(99, 1)] * 30 + [(2479, 1)] * 4  # the same total context
    want = d["constant"] + d["rows"] * 34 + d["padded_rows"] * 64 + d["context"] * 34 * 0.38
    assert cost.predict(IterationShape.of_rows(even)) == pytest.approx(want)
    assert cost.predict(IterationShape.of_rows(skewed)) == pytest.approx(want)


def test_plan_seconds_matches_predict():
    from batchdeck.engine.request import Request
    from batchdeck.engine.step_plan import ScheduledChunk

    rows = [(100, 1), (2000, 1), (0, 512), (512, 64)]
    chunks = [ScheduledChunk(Request(str(i), [1] * (c + n)), c, n, True, n == 1) for i, (c, n) in enumerate(rows)]
    shipped = load_profile("h200-qwen3-0.6b").cost  # every feature, the longest rows and walk included
    assert shipped.coefficients["mixed"]["prefill_max_context"] > 0
    for cm in (CostModel(dict(COST)), shipped):
        assert cm.plan_seconds(chunks) == pytest.approx(cm.predict(IterationShape.of_rows(rows)))
        assert cm.plan_seconds(chunks[:2]) == pytest.approx(cm.predict(IterationShape.of_rows(rows[:2])))
    assert IterationShape.of_rows(rows).prefill_max_context == pytest.approx(0.576)  # 512 + 64 keys walked


def test_bad_profiles_are_refused_with_the_reason(tmp_path, profile_path):
    with pytest.raises(ValueError, match="not a shipped profile"):
        load_profile("no-such-profile")
    d = json.loads(profile_path.read_text())
    del d["num_blocks"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="missing 'num_blocks'"):
        load_profile(bad)
    d = json.loads(profile_path.read_text())
    d["cost"]["warp_speed"] = 1.0
    bad.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="unknown key"):
        load_profile(bad)


def test_simulated_engine_runs_the_real_scheduler_on_virtual_time(profile_path):
    clock = VirtualClock()
    e = make_engine(EngineConfig(sim=str(profile_path)), LiveConfig(max_num_seqs=4), clock=clock, check_invariants=True)
    assert isinstance(e, SimulatedEngine) and e.blocks.num_blocks == 8192
    for i in range(6):
        e.add_request(str(i), [3] * 100, SamplingParams(max_tokens=20, ignore_eos=True), arrival_time=0.0)
    records = []
    e.sink = lambda topic, rec: records.append(rec) if topic == "iteration" else None
    while e.has_unfinished:
        e.step()
    assert all(len(e.requests[str(i)].output_token_ids) == 20 for i in range(6))
    assert max(r.num_requests_running for r in records) == 4  # the live cap holds
    # time is the cost model's: every step lasts what the model says, and the clock is their sum
    assert sum(r.step_time for r in records) == pytest.approx(clock())
    decode = next(r for r in records if r.num_prefill_tokens == 0)
    assert decode.step_time == pytest.approx(COST["constant"] + decode.num_decode_tokens * COST["decode_rows"], rel=0.5)
    assert e.config_snapshot()["engine"]["simulation"]["profile"] == "test-tiny"


def test_speculation_accounting_runs_on_the_simulator(profile_path):
    d = json.loads(profile_path.read_text())
    d["spec_acceptance"] = 0.5
    d["model_shape"]["vocab_size"] = 12  # stand-ins then recur in the prompt, so the n-gram drafter finds drafts
    profile_path.write_text(json.dumps(d))
    e = make_engine(EngineConfig(sim=str(profile_path)), LiveConfig(max_num_seqs=4, spec_k=4), clock=VirtualClock(),
                    check_invariants=True)
    for i in range(3):
        e.add_request(str(i), [7, 8, 9, 10] * 20, SamplingParams(max_tokens=40, ignore_eos=True))
    while e.has_unfinished:
        e.step()
    reqs = [e.requests[str(i)] for i in range(3)]
    assert all(r.num_output_tokens == 40 for r in reqs)
    assert sum(r.spec_proposed for r in reqs) > 0
    assert 0 < sum(r.spec_accepted for r in reqs) < sum(r.spec_proposed for r in reqs)


def _replay(preset, profile_path, **over):
    from batchdeck.presets.replay import run_preset

    return run_preset(preset, overrides={"sim": str(profile_path), **over}).report()


def test_same_seed_gives_the_same_report(tmp_path, profile_path):
    preset = saturated_preset(tmp_path, rate=50, duration=1.0)
    a, b = _replay(preset, profile_path), _replay(preset, profile_path)
    assert a["summary"]["num_requests"] > 20
    for key in ("generation_throughput", "time_to_first_token", "e2e_request_latency", "num_iterations"):
        assert a["summary"][key] == b["summary"][key]
    assert [r["ttft"] for r in a["requests"]] == [r["ttft"] for r in b["requests"]]
    assert a["run"]["engine"]["simulation"]["profile"] == "test-tiny"
    assert a["analytic"]["throughput_bound"]["output_tokens_per_s"] > 0 and "rho" in a["analytic"]["mg1"]


def test_more_running_slots_never_lower_simulated_throughput_on_a_saturated_load(tmp_path, profile_path):
    preset = saturated_preset(tmp_path)
    tput = [_replay(preset, profile_path, max_num_seqs=n)["summary"]["generation_throughput"] for n in (2, 4, 8, 16)]
    assert all(b >= a for a, b in zip(tput, tput[1:])), tput
    assert tput[-1] > 2 * tput[0]


def test_sweep_prints_the_grid_and_writes_the_html(tmp_path, profile_path, capsys):
    preset = saturated_preset(tmp_path, rate=40, duration=1.0)
    html, out = tmp_path / "sweep.html", tmp_path / "sweep.json"
    rc = batchdeck_main(["sweep", str(preset), "--sim", str(profile_path), "--set", "max_num_seqs=2,8",
                         "--set", "chunk_size=128,512", "--metric", "ttft_p99", "--html", str(html), "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "SIMULATED on Test GPU (profile test-tiny)" in text and "<- best ttft_p99" in text
    sweep = json.loads(out.read_text())
    assert len(sweep["points"]) == 4 and {tuple(p["settings"].values()) for p in sweep["points"]} == {
        (2, 128), (2, 512), (8, 128), (8, 512)}
    page = html.read_text()
    assert "data:image/png;base64," in page and "SIMULATED" in page


def test_sweep_metrics_read_the_summary_values_their_names_say():
    from batchdeck.presets.sweep import metric_value

    summary = {"time_per_output_token": {"p99": 0.002}, "inter_token_latency": {"p99": 0.009},
               "time_to_first_token": {"p50": 0.1, "p99": 0.3}, "e2e_request_latency": {"p50": 1.0, "p99": 2.0}}
    assert metric_value(summary, "tpot_p99") == 0.002  # TPOT (per request), not ITL (every gap)
    assert (metric_value(summary, "ttft_p50"), metric_value(summary, "ttft_p99")) == (0.1, 0.3)
    assert (metric_value(summary, "e2e_p50"), metric_value(summary, "e2e_p99")) == (1.0, 2.0)


def test_sweep_refuses_a_bad_value_before_running(tmp_path, profile_path):
    preset = saturated_preset(tmp_path)
    assert batchdeck_main(["sweep", str(preset), "--sim", str(profile_path), "--set", "max_num_seqs=4,0"]) == 2


def test_generate_and_replay_take_sim(tmp_path, profile_path, capsys):
    inp, outp = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text('{"id": "a", "prompt": "hello", "max_tokens": 12}\n'
                   '{"id": "b", "prompt": "later", "max_tokens": 4, "arrival_time": 30.0}\n')
    assert batchdeck_main(["generate", "--sim", str(profile_path), "--input", str(inp), "--output", str(outp)]) == 0
    lines = [json.loads(x) for x in outp.read_text().splitlines()]
    assert [len(x["output_token_ids"]) for x in lines] == [12, 4]
    assert lines[1]["metrics"]["first_token"] > 30.0  # virtual time jumped to the arrival
    assert all(x["simulated"] == "test-tiny" for x in lines)  # every result names the simulation
    assert "SIMULATED engine (profile test-tiny" in capsys.readouterr().err
    preset = saturated_preset(tmp_path, rate=20, duration=0.5)
    rep, page, rec = tmp_path / "r.json", tmp_path / "r.html", tmp_path / "r.jsonl"
    assert batchdeck_main(["replay", str(preset), "--headless", "--sim", str(profile_path), "--report", str(rep),
                           "--html", str(page), "--record", str(rec)]) == 0
    from batchdeck.console.player import ReplayClient

    assert "SIMULATED Test GPU (profile test-tiny)" in ReplayClient(rec).description  # the recording says so too
    out = capsys.readouterr().out
    assert "SIMULATED: Test GPU (profile test-tiny)" in out and "throughput bound" in out and "M/G/1" in out
    assert "SIMULATED: no model ran" in page.read_text() and "Queueing theory beside the run" in page.read_text()
    assert json.loads(rep.read_text())["run"]["simulated_iterations_per_s"] > 0


def test_analytic_formulas():
    b = throughput_bound(COST, max_num_seqs=8, pool_tokens=1 << 20, mean_prompt=100, mean_output=50)
    t_dec = COST["constant"] + 8 * COST["decode_rows"] + 8 * (125) / 1e3 * COST["decode_context"]
    t_pre = 100 * COST["prefill_tokens"] + 100 * 101 / 2e6 * COST["prefill_attention"]
    assert b["output_tokens_per_s"] == pytest.approx(50 / (50 * t_dec / 8 + t_pre))
    reqs = [{"arrival": i * 1.0, "e2e_latency": 0.5, "queue_time": 0.0, "finish_reason": "length"} for i in range(11)]
    m = mg1_estimate(reqs, 2.0)
    assert m["rho"] == pytest.approx(0.5) and m["estimate"] == pytest.approx(1 - 0.5 ** 4)
    assert m["measured_attainment"] == 1.0


def test_calibrate_on_cpu_writes_a_profile_the_simulator_runs(tmp_path):
    out = tmp_path / "cpu.json"
    assert batchdeck_main(["calibrate", "--model", "synthetic:tiny", "--device", "cpu", "--quick",
                           "--max-num-seqs", "4", "--max-batched-tokens", "64", "--num-blocks", "256",
                           "--out", str(out), "--samples-out", str(tmp_path / "samples.jsonl")]) == 0
    p = load_profile(out)
    assert p.num_blocks == 256 and p.fit["num_shapes"] >= 5 and p.fit["held_out_mean_rel_error"] is not None
    assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == p.fit["num_shapes"]  # what it fitted
    assert p.fit["cut_short"] == []  # every workload played to its end within the budget
    assert p.gpu_memory_fraction == defaults_for("cpu")["gpu_memory_fraction"]  # the setting the engine ran with
    assert p.device_name.startswith("CPU") and p.versions["torch"]
    split = p.fit["gap_split_by_regime"]  # where the busy gaps' time went: the wait for the device, the host
    assert split and all(v["host_mean_s"] + v["sync_wait_mean_s"] == pytest.approx(v["measured_mean_s"])
                         for v in split.values())
    assert "decode_splits" not in p.cost.to_dict()  # no GPU kernel ran: its longest-row term has no split rule
    e = make_engine(EngineConfig(sim=str(out)), LiveConfig(max_num_seqs=4, max_batched_tokens=64, chunk_size=64),
                    clock=VirtualClock())
    e.add_request("x", [5] * 30, SamplingParams(max_tokens=5, ignore_eos=True))
    while e.has_unfinished:
        e.step()
    assert e.requests["x"].num_output_tokens == 5 and e.clock() > 0


def test_sim_fixes_model_dtype_and_pool_and_refuses_a_conflicting_model(tmp_path, profile_path):
    from batchdeck.engine.config import ConfigError, resolve_configs
    from batchdeck.presets.preset_driver import preset_configs

    from batchdeck.presets import load_preset

    cfg, live = preset_configs(load_preset(saturated_preset(tmp_path)), {"sim": str(profile_path)})
    assert (cfg.model, cfg.dtype, cfg.device, cfg.num_blocks, cfg.sim) == (
        "synthetic:tiny", "bfloat16", "cpu", 8192, str(profile_path))
    assert live.max_num_seqs == 8  # the preset's live settings still apply
    cfg, live = resolve_configs({"sim": str(profile_path), "block_size": 32})
    assert cfg.num_blocks == 4096 and live.max_num_seqs == 256  # the same pool in bigger blocks; GPU defaults
    with pytest.raises(ConfigError, match="model='synthetic:qwen3-0.6b' is not allowed: synthetic:tiny"):
        resolve_configs({"sim": str(profile_path), "model": "synthetic:qwen3-0.6b"})
    with pytest.raises(ValueError, match="not a shipped profile"):
        resolve_configs({"sim": "no-such-profile"})
