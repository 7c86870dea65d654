"""Preset replay: seeded determinism through the CLI, the driver's timeline, recordings, and the
exact phase split of reports."""
from __future__ import annotations

import json

import pytest

from batchdeck.cli import main
from batchdeck.engine.config import LiveConfig
from batchdeck.presets.preset_driver import preset_configs, scale_preset
from batchdeck.engine.telemetry import Event, IterationRecord, RequestRecord
from batchdeck.presets import parse_preset
from batchdeck.presets.report import build_report, phase_boundaries, split_phases
from tests.helpers import fail_steps

PRESET = """
name: replay-test
description: every stream kind the driver runs, and every timeline action
model: synthetic:tiny
engine: {device: cpu, dtype: float32, block_size: 16, num_blocks: 256}
config: {policy: fcfs, max_num_seqs: 4, max_batched_tokens: 256, chunk_size: 64}
workload:
  - kind: poisson
    rate: 8
    duration: 1.2
    input_tokens: {dist: lognormal, mean: 48, sigma: 0.5, max: 200}
    output_tokens: {dist: uniform, min: 4, max: 24}
    tenant: a
  - kind: burst
    at: 0.3
    count: 4
    input_tokens: 96
    output_tokens: 8
    tenant: b
    slo_class: batch
  - kind: closed-loop
    concurrency: 2
    count: 5
    input_tokens: {dist: uniform, min: 8, max: 40}
    output_tokens: 6
    tenant: c
timeline:
  - at_iteration: 10
    set: {chunk_size: 32}
  - at: 0.5
    pause: 0.2
  - at: 0.9
    set: {max_num_seqs: 6, policy: sjf}
seed: 123
"""


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """The test preset replayed twice through `batchdeck replay --headless` (the second one recorded)."""
    root = tmp_path_factory.mktemp("replay")
    preset = root / "replay-test.yaml"
    preset.write_text(PRESET)
    reports = []
    for i in range(2):
        out = root / f"run{i}.json"
        argv = ["replay", str(preset), "--headless", "--quiet", "--report", str(out)]
        if i == 1:
            argv += ["--record", str(root / "run.jsonl")]
        assert main(argv) == 0
        reports.append(json.loads(out.read_text()))
    return reports[0], reports[1], root / "run.jsonl"


def _workload(report):
    return [(r["request_id"], r["prompt_hash"], r["prompt_tokens"], r["max_tokens"], r["tenant"], r["slo_class"])
            for r in sorted(report["requests"], key=lambda r: r["request_id"])]


def test_two_replays_same_workload_and_tokens(two_runs):
    a, b, _ = two_runs
    assert len(a["requests"]) == 5 + 4 + len([r for r in a["requests"] if r["stream_index"] == 0])
    assert _workload(a) == _workload(b)
    open_loop = lambda rep: sorted((r["request_id"], r["scheduled_arrival"]) for r in rep["requests"]  # noqa: E731
                                   if r["stream_index"] != 2)
    assert open_loop(a) == open_loop(b)
    tokens = lambda rep: {r["request_id"]: r["output_token_ids"] for r in rep["requests"]}  # noqa: E731
    assert tokens(a) == tokens(b)
    for r in a["requests"]:  # greedy, ignore_eos: every request runs to max_tokens
        assert r["finish_reason"] == "length" and len(r["output_token_ids"]) == r["max_tokens"] == r["output_tokens"]
    assert {r["request_id"] for r in a["requests"] if r["stream_index"] == 2} == {f"2-{n}" for n in range(5)}


def test_timeline_applied_in_order_with_iterations(two_runs):
    a, _, _ = two_runs
    tl = a["timeline"]
    assert [t["status"] for t in tl] == ["applied"] * 3
    assert tl[0]["applied_iteration"] >= 10
    assert tl[0]["applied_iteration"] <= tl[1]["applied_iteration"] <= tl[2]["applied_iteration"]
    changes = [e for e in a["events"] if e["kind"] == "config_change"]
    assert [(e["changes"], e["applied_iteration"], e["source"]) for e in changes] == [
        ({"chunk_size": 32}, tl[0]["applied_iteration"], "preset"),
        ({"max_num_seqs": 6, "policy": "sjf"}, tl[2]["applied_iteration"], "preset")]
    pause = [e for e in a["events"] if e["kind"] in ("pause", "resume")]
    assert [e["kind"] for e in pause] == ["pause", "resume"] and all(e["source"] == "preset" for e in pause)
    assert pause[1]["time"] - pause[0]["time"] >= 0.2 - 1e-3
    series = a["series"]
    paused = [t for t in series["time"] if pause[0]["time"] < t - 1e-9 and t < pause[1]["time"]]
    assert paused == []  # nothing ran while paused
    assert tl[2]["config"]["policy"] == "sjf" and tl[2]["config"]["chunk_size"] == 32


def test_phases_split_exactly_at_applied_iterations(two_runs):
    a, _, _ = two_runs
    applied = [t["applied_iteration"] for t in a["timeline"] if t["action"] == "set"]
    phases = a["phases"]
    assert [p["start_iteration"] for p in phases] == [0, *applied]
    assert [p["end_iteration"] for p in phases] == [*applied, None]
    iterations = a["series"]["iteration"]
    versions = dict(zip(iterations, a["series"]["config_version"]))
    total = 0
    for k, p in enumerate(phases):
        hi = p["end_iteration"] if p["end_iteration"] is not None else max(iterations) + 1
        inside = [i for i in iterations if p["start_iteration"] <= i < hi]
        assert p["num_iterations"] == len(inside)
        assert p["iterations"] == [inside[0], inside[-1]]
        assert {versions[i] for i in inside} == {k}  # every iteration ran under exactly that phase's config
        total += p["num_iterations"]
    assert total == a["summary"]["num_iterations"] == len(iterations)
    assert [p["config"]["chunk_size"] for p in phases] == [64, 32, 32]
    assert [p["config"]["max_num_seqs"] for p in phases] == [4, 4, 6]
    # requests by arrival: each in exactly one phase, in the phase whose time span holds its arrival
    assert sum(p["num_requests"] for p in phases) == len(a["requests"])
    for p in phases:
        inside = [r for r in a["requests"] if p["start_time"] <= r["arrival"] < p["end_time"]
                  or (p["index"] == len(phases) - 1 and r["arrival"] >= p["start_time"])]
        assert len(inside) == p["num_requests"]
    assert sum(p["num_generation_tokens"] for p in phases) == a["summary"]["num_generation_tokens"]
    assert sum(p["num_requests_finished"] for p in phases) == len(a["requests"])
    for p in phases:  # completions count in the phase whose iterations produced the last token
        hi = p["end_iteration"] if p["end_iteration"] is not None else float("inf")
        assert p["num_requests_finished"] == sum(1 for r in a["requests"]
                                                 if p["start_iteration"] <= r["finish_iteration"] < hi)


def test_recording_jsonl(two_runs):
    _, b, path = two_runs
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    types = {line["type"] for line in lines}
    assert {"config", "action", "iteration", "request", "event", "requests"} <= types
    assert types <= {"config", "action", "iteration", "request", "event", "requests", "gpu"}
    assert lines[0]["type"] == "config" and lines[1] == {**lines[1], "type": "action", "op": "replay",
                                                         "preset": "replay-test"}
    changes = [line for line in lines if line["type"] == "event" and line["kind"] == "config_change"]
    assert [c["applied_iteration"] for c in changes] == [e["applied_iteration"] for e in b["events"]
                                                         if e["kind"] == "config_change"]
    actions = [line for line in lines if line["type"] == "action" and line["op"] != "replay"]
    assert [(x["op"], x["ok"], x["applied_iteration"]) for x in actions] == [
        (t["action"], True, t["applied_iteration"]) for t in b["timeline"]]
    assert sum(1 for line in lines if line["type"] == "iteration") == b["summary"]["num_iterations"]
    assert sum(1 for line in lines if line["type"] == "request") == len(b["requests"])


# -- pure units ---------------------------------------------------------------------------------------


def _it(i: int, t: float, version: int = 0) -> IterationRecord:
    return IterationRecord(iteration=i, time=t, step_time=0.01, schedule_time=0, prepare_time=0, forward_time=0,
                           sample_time=0, num_prefill_tokens=10, num_decode_tokens=2, num_prefill_chunks=1,
                           num_requests_running=2, num_requests_waiting=0, num_preemptions=0, kv_blocks_used=1,
                           kv_blocks_total=10, kv_cache_usage=0.1, config_version=version, num_generated_tokens=2)


def _req(rid: str, arrival: float, finish_iteration: int = 1) -> RequestRecord:
    return RequestRecord(request_id=rid, tenant="t", slo_class="interactive", priority=0, prompt_tokens=10,
                         output_tokens=4, arrival=arrival, queue_time=0.0, ttft=0.1, tpot=0.01, itl_p50=0.01,
                         itl_p99=0.02, itl_max=0.02, e2e_latency=0.2, finish_reason="length", num_preemptions=0,
                         slo_met=True, first_token_iteration=0, finish_iteration=finish_iteration,
                         finish=arrival + 0.2)


def _change(applied: int, t: float, **changes) -> Event:
    return Event("config_change", t, applied, {"changes": changes, "applied_iteration": applied, "source": "preset"})


def test_split_phases_units():
    iterations = [_it(i, 0.1 * (i + 1)) for i in range(10)]
    requests = [_req("a", 0.0), _req("b", 0.349, 5), _req("c", 0.35, 6), _req("d", 0.9, 9)]
    events = [_change(0, 0.0, max_num_seqs=2), _change(4, 0.35, chunk_size=8), _change(4, 0.351, policy="sjf"),
              _change(7, 0.65, chunk_size=16), Event("pause", 0.5, 5, {"source": "preset"})]
    phases = phase_boundaries(events, LiveConfig().to_dict())
    assert [(p.start_iteration, p.end_iteration) for p in phases] == [(0, 4), (4, 7), (7, None)]
    assert phases[0].config["max_num_seqs"] == 2 and phases[0].changes == {"max_num_seqs": 2}
    assert phases[1].changes == {"chunk_size": 8, "policy": "sjf"} and phases[1].start_time == 0.35
    assert phases[2].config["chunk_size"] == 16 and phases[2].config["policy"] == "sjf"
    split = split_phases(phases, iterations, requests)
    assert [[it.iteration for it in its] for its, _ in split] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert [[r.request_id for r in reqs] for _, reqs in split] == [["a", "b"], ["c"], ["d"]]
    report = build_report(preset={"name": "x"}, iterations=iterations, requests=requests, events=events,
                          initial_config=LiveConfig().to_dict())
    assert [p["num_iterations"] for p in report["phases"]] == [4, 3, 3]
    assert [p["num_requests"] for p in report["phases"]] == [2, 1, 1]  # by arrival
    assert [p["num_requests_finished"] for p in report["phases"]] == [1, 2, 1]  # by finish iteration
    assert report["phases"][1]["request_throughput"] == pytest.approx(2 / 0.3)
    assert report["phases"][1]["span_s"] == pytest.approx(0.3)
    assert report["phases"][1]["generation_throughput"] == pytest.approx(3 * 2 / 0.3)
    assert report["summary"]["num_requests"] == 4 and len(report["events"]) == 5


def test_scale_preset_and_engine_configs(tmp_path):
    preset = parse_preset(PRESET, str(tmp_path / "p.yaml"), tmp_path)
    half = scale_preset(preset, 0.5)
    assert half.workload[0].duration == pytest.approx(0.6)
    assert half.workload[1].at == pytest.approx(0.15) and half.workload[1].count == 2
    assert half.workload[2].count == 3
    assert [t.at for t in half.timeline] == [None, 0.25, 0.45] and half.timeline[0].at_iteration == 5
    assert half.timeline[1].pause == pytest.approx(0.1)
    assert scale_preset(preset, 1.0) is preset
    with pytest.raises(ValueError):
        scale_preset(preset, 0)
    cfg, live = preset_configs(preset, {"num_blocks": 64, "chunk_size": 16, "device": None})
    assert (cfg.model, cfg.seed, cfg.num_blocks, cfg.block_size) == ("synthetic:tiny", 123, 64, 16)
    assert (live.max_num_seqs, live.max_batched_tokens, live.chunk_size, live.version) == (4, 256, 16, 0)
    with pytest.raises(ValueError, match="unknown override"):
        preset_configs(preset, {"bogus": 1})
    big = parse_preset(PRESET.replace("max_batched_tokens: 256", "max_batched_tokens: 12000"), "p.yaml", tmp_path)
    assert preset_configs(big)[0].max_batched_tokens_limit == 12000


def test_replay_cli_errors(tmp_path, capsys):
    assert main(["replay", "no-such-preset", "--headless"]) == 2
    assert "no such preset" in capsys.readouterr().err
    assert main(["replay", "quickstart", "--headless", "--set", "max_num_seqs=0"]) == 2
    assert "max_num_seqs" in capsys.readouterr().err
    assert main(["replay", "--list"]) == 0
    assert "static-vs-continuous" in capsys.readouterr().out
    # output paths are checked before the run, not after it (the run's results would be lost)
    assert main(["replay", "quickstart", "--headless", "--report", "/proc/no-such/r.json"]) == 2
    assert "--report '/proc/no-such/r.json': cannot make its directory" in capsys.readouterr().err
    assert main(["replay", "quickstart", "--headless", "--html", str(tmp_path)]) == 2
    assert f"--html {str(tmp_path)!r} is a directory" in capsys.readouterr().err
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    for headless in (["--headless"], []):  # in the console too: checked before it opens
        assert main(["replay", "quickstart", *headless, "--record", str(a_file / "sub" / "run.jsonl")]) == 2
        assert f"{str(a_file)!r} is a file, not a directory" in capsys.readouterr().err


def test_a_replay_where_no_request_arrives_says_so_and_exits_1(tmp_path, capsys):
    trace = tmp_path / "t.csv"
    trace.write_text("t,i,o\n0,5,6\n1,5,6\n")
    preset = tmp_path / "p.yaml"
    preset.write_text("name: empty\nmodel: synthetic:tiny\nworkload:\n  - {kind: trace, path: t.csv, start: 3600, "
                      "columns: {time: t, input: i, output: o}}\n")
    assert main(["replay", str(preset), "--headless", "--quiet", "--report", str(tmp_path / "r.json")]) == 1
    assert "no request arrived" in capsys.readouterr().err
    assert json.loads((tmp_path / "r.json").read_text())["summary"]["num_requests"] == 0


def test_the_default_report_name_stays_in_the_working_directory():
    from batchdeck.presets.cli import default_report_path

    assert default_report_path("static-vs-continuous") == "static-vs-continuous-report.json"
    assert default_report_path("../elsewhere/x") == "elsewhere-x-report.json"  # a free-text name, not a path
    assert default_report_path("my preset v1.2") == "my-preset-v1.2-report.json"
    assert default_report_path("/") == "preset-report.json"


def test_the_timeline_is_checked_against_the_engine_that_will_play_it(tmp_path, capsys):
    """The file is checked against the CPU defaults; --set, flags and --sim (CUDA defaults) change where the
    timeline starts from, so it is checked again before the run, naming the entry (it failed mid-run, exit 0)."""
    assert main(["replay", "chunked-prefill", "--headless", "--sim", "h200-qwen3-0.6b", "--set", "max_batched_tokens=128",
                 "--set", "chunk_size=128", "--report", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert "chunked-prefill.yaml: timeline[0] (at 15 s) set {'chunk_size': 256} would be refused" in err, err
    assert "chunk_size=256 is not allowed: an integer in [1, 128]" in err and not (tmp_path / "r.json").exists()
    assert "(its settings before that entry: max_batched_tokens=128, chunk_size=128)" in err, err
    preset = tmp_path / "t.yaml"
    preset.write_text("name: t\nmodel: synthetic:tiny\nworkload:\n  - {kind: burst, count: 2, at: 0, input_tokens: 8, "
                      "output_tokens: 2}\ntimeline:\n  - {at: 0, set: {max_batched_tokens: 1024}}\n"
                      "  - {at: 0.1, set: {policy: fair, policy_params: {nonsense_param: -1}}}\n")
    assert main(["replay", str(preset), "--headless", "--sim", "h200-qwen3-0.6b"]) == 2  # CUDA's chunk_size 2048
    assert "timeline[0] (at 0 s) set {'max_batched_tokens': 1024} would be refused" in capsys.readouterr().err
    assert main(["replay", str(preset), "--headless", "--report", str(tmp_path / "cpu.json")]) == 2
    err = capsys.readouterr().err  # on the CPU the first entry fits; the second's parameters never did
    assert "timeline[1] (at 0.1 s)" in err and "nonsense_param" in err, err


def test_a_timeline_entry_that_fails_mid_run_is_said_and_exits_1(tmp_path, capsys, monkeypatch):
    from batchdeck.engine.service.async_engine import AsyncEngine

    async def refuse(self, changes, source="api"):
        raise RuntimeError("refused for the test")

    monkeypatch.setattr(AsyncEngine, "update_config", refuse)
    preset = tmp_path / "t.yaml"
    preset.write_text("name: t\nmodel: synthetic:tiny\nworkload:\n  - {kind: burst, count: 2, at: 0, input_tokens: 8, "
                      "output_tokens: 2}\ntimeline:\n  - {at: 0, set: {max_num_seqs: 2}}\n")
    assert main(["replay", str(preset), "--headless", "--quiet", "--report", str(tmp_path / "r.json")]) == 1
    err = capsys.readouterr().err
    assert "timeline[0] set failed: RuntimeError: refused for the test" in err, err
    assert json.loads((tmp_path / "r.json").read_text())["timeline"][0]["status"] == "error"  # the report is kept


def test_speed_and_engine_failure(tmp_path):
    from batchdeck.presets.replay import run_preset

    preset = parse_preset(PRESET, str(tmp_path / "p.yaml"), tmp_path)
    fast = run_preset(preset, speed=4.0, duration_scale=0.5)
    rows = fast.report()["requests"]
    for r in rows:
        if r["stream_index"] != 2:  # open loop: submitted at workload time / speed
            assert r["arrival"] == pytest.approx(r["scheduled_arrival"] / 4.0)
    assert [t["at"] for t in fast.report()["timeline"]] == [None, 0.25, 0.45]

    def fail_at_iteration_5(driver):
        llm = driver.engine.engine
        fail_steps(llm, lambda: llm.iteration >= 5, "boom")

    broken = run_preset(preset, on_start=fail_at_iteration_5)
    assert broken.error == "RuntimeError: boom"
    report = broken.report()
    assert report["run"]["error"] == "RuntimeError: boom"
    assert any(e["kind"] == "error" and "boom" in e["message"] for e in report["events"])
    assert report["summary"]["num_unfinished"] > 0 and report["summary"]["num_iterations"] == 5


def _fail_while_requests_run(driver):
    """From iteration 5, the first step with requests running raises (the engine then stops stepping)."""
    llm = driver.engine.engine
    fail_steps(llm, lambda: llm.iteration >= 5 and bool(llm.scheduler.running), "boom")


@pytest.mark.parametrize("clock", ["wall", "virtual"])
def test_replay_reports_the_engines_own_failure_while_requests_are_open(tmp_path, clock):
    """The requests open when the engine fails end with an EngineDeadError (their streams no longer
    hang); the run still ends reporting the engine's failure itself, not that error."""
    from batchdeck.presets.replay import run_preset
    from tests.helpers import save_tiny_profile

    preset = parse_preset(PRESET, str(tmp_path / "p.yaml"), tmp_path)
    overrides = None
    if clock == "virtual":  # a simulated engine: InlineAsyncEngine on a VirtualTimeLoop
        profile = tmp_path / "tiny-profile.json"
        save_tiny_profile(profile)
        overrides = {"sim": str(profile)}
    result = run_preset(preset, overrides=overrides, on_start=_fail_while_requests_run)
    assert result.error == "RuntimeError: boom"
    assert result.report()["run"]["error"] == "RuntimeError: boom"
    assert isinstance(result.driver.engine.error, RuntimeError) and str(result.driver.engine.error) == "boom"
    assert result.driver.finished < result.driver.submitted  # requests were open when it failed


def test_replay_without_headless_opens_the_console(monkeypatch, capsys):
    app = pytest.importorskip("batchdeck.console.cli")
    calls = []

    def fake_run_console(preset=None, *, overrides=None, record=None, speed=1.0, duration_scale=1.0):
        calls.append((preset.name, overrides, record, speed, duration_scale, [t.set for t in preset.timeline]))
        return 0

    monkeypatch.setattr(app, "run_console", fake_run_console, raising=False)
    assert main(["replay", "chunked-prefill", "--speed", "2", "--record", "r.jsonl", "--device", "cpu"]) == 0
    assert calls == [("chunked-prefill", {"device": "cpu"}, "r.jsonl", 2.0, 1.0, [{"chunk_size": 256}])]
    assert main(["replay", "quickstart", "--report", "x.json"]) == 2  # reports come from headless runs
    assert "--headless" in capsys.readouterr().err


def test_a_replay_result_has_a_short_repr_however_much_it_holds(paced_preset):
    """asyncio formats the finished main task with its result when `asyncio.run` restores SIGINT: a
    field-by-field repr of every record cost a minute after an hour-long simulated replay."""
    from batchdeck.presets.replay import run_preset

    result = run_preset(paced_preset)  # a simulated engine on a virtual clock
    assert len(result.telemetry.iterations) > 100
    text = repr(result)
    assert len(text) < 200 and paced_preset.name in text and f"iterations={len(result.telemetry.iterations)}" in text


def test_overlapping_timed_pauses_keep_the_engine_paused_until_the_last_ends(tmp_path):
    from batchdeck.presets.replay import run_preset

    text = ("name: pauses\nmodel: synthetic:tiny\nengine: {device: cpu, num_blocks: 128}\nworkload:\n"
            "  - {kind: poisson, rate: 20, duration: 1.0, input_tokens: 8, output_tokens: 4}\n"
            "timeline:\n  - {at: 0.2, pause: 0.5}\n  - {at: 0.3, pause: 0.2}\nseed: 3\n")
    result = run_preset(parse_preset(text, str(tmp_path / "p.yaml"), tmp_path))
    assert result.error is None
    events = [e for e in result.report()["events"] if e["kind"] in ("pause", "resume")]
    assert [e["kind"] for e in events] == ["pause", "resume"], events  # pausing a paused engine says nothing
    first_pause = events[0]["time"]
    assert events[-1]["time"] - first_pause >= 0.5 - 1e-6  # not at the inner pause's end (0.3 s after the first)


def test_ctrl_c_ends_a_headless_replay_with_its_report_so_far(tmp_path):
    """The first SIGINT stops the replay; the report of what ran is still written (no traceback), exit 130."""
    import signal
    import subprocess
    import sys
    import time

    report, record = tmp_path / "r.json", tmp_path / "run.jsonl"
    # SIGINT's default action in the child: a shell that ran this suite in the background ignores SIGINT, and
    # the child would inherit that (Python then never turns SIGINT into Ctrl-C handling)
    proc = subprocess.Popen([sys.executable, "-m", "batchdeck.cli", "replay", "quickstart", "--headless", "--quiet",
                             "--report", str(report), "--record", str(record)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while '{"type":"request"' not in (record.read_text() if record.exists() else ""):  # a request finished
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the replay never finished a request"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted: the report covers the replay up to then" in err, err
    doc = json.loads(report.read_text())
    assert doc["run"]["interrupted"] is True and doc["summary"]["num_requests_finished"] >= 1


def test_refused_requests_count_as_slo_misses_of_their_class():
    """Attainment over finished requests alone rises as a setting rejects more of the load (a sweep would
    pick the setting that refuses most): the report counts refused requests as misses."""
    from batchdeck.presets.compare import metric_rows
    from batchdeck.presets.report import build_report

    requests = [_req("a", 0.0), _req("b", 0.1)]
    rows = [{"request_id": "a", "slo_class": "interactive"}, {"request_id": "b", "slo_class": "interactive"},
            {"request_id": "c", "slo_class": "interactive", "error": "queue full"},
            {"request_id": "d", "slo_class": "batch", "error": "queue full"}]
    report = build_report(preset={"name": "x"}, iterations=[_it(i, 0.1 * (i + 1)) for i in range(5)],
                          requests=requests, events=[], initial_config=LiveConfig().to_dict(), request_rows=rows)
    slo = report["summary"]["slo_attainment"]
    assert slo["interactive"] == {"met": 2, "count": 3, "fraction": 2 / 3, "rejected": 1}
    assert slo["batch"] == {"met": 0, "count": 1, "fraction": 0.0, "rejected": 1}
    cells = {label: cells for label, _, cells in metric_rows([report["summary"]])}
    assert cells["SLO met: interactive"] == ["66.7% (2/3, 1 rejected)"]


def test_a_bad_trace_row_fails_before_the_engine_is_built_or_the_recording_opened(tmp_path, capsys, monkeypatch):
    import batchdeck.presets.replay as replay

    rows = ["time,input,output"] + [f"{i * 0.05:.2f},{50 + i},8" for i in range(40)]
    rows[31] = "1.50,abc,8"  # line 32 of the file
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "p.yaml").write_text("""name: bad-trace
description: a trace with a bad row after good ones
model: synthetic:tiny
engine: {device: cpu, dtype: float32, block_size: 16, num_blocks: 256}
config: {max_num_seqs: 4, max_batched_tokens: 256, chunk_size: 128}
workload:
  - kind: trace
    path: t.csv
    columns: {time: time, input: input, output: output}
""")
    record = tmp_path / "run.jsonl"
    record.write_text("an earlier recording\n")

    def no_engine(*args, **kwargs):
        raise AssertionError("the engine was built before the trace was read")

    def no_console(*args, **kwargs):
        raise AssertionError("the console opened before the trace was read")

    import batchdeck.console.cli as console_cli

    monkeypatch.setattr(replay, "build_engine_for_preset", no_engine)
    monkeypatch.setattr(console_cli, "run_console", no_console)
    for headless in (["--headless"], []):
        assert main(["replay", str(tmp_path / "p.yaml"), *headless, "--record", str(record)]) == 2
        assert "t.csv: line 32, column 'input': cannot parse 'abc'" in capsys.readouterr().err
        assert record.read_text() == "an earlier recording\n"
