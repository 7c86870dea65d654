"""The console on a real in-process engine (synthetic:tiny): the end-to-end policy change seen in the
engine and in the --record file, and every steering path against the real AsyncEngine."""
from __future__ import annotations

import argparse
import json

import pytest

from batchdeck.console.cli import build_app
from batchdeck.cli import main as batchdeck_main
from tests.test_console_app import busy_process_pilot  # noqa: F401 - a fixture
from tests.test_console_app import SIZE, log_texts, notes, palette, set_in_panel, spec_shown, wait_for

pytestmark = pytest.mark.usefixtures("busy_process_pilot")
ENGINE = {"num_blocks": 512}


async def test_end_to_end_policy_change_from_the_palette_reaches_engine_and_recording(tmp_path):
    path = tmp_path / "session.jsonl"
    app = build_app(None, overrides={**ENGINE, "model": "synthetic:tiny"}, record=path, log=lambda line: None)
    engine = app.client.engine.engine
    async with app.run_test(size=SIZE) as pilot:
        # the default steady workload gets things moving at once
        await wait_for(pilot, lambda: app.state.latest is not None and app.state.latest.iteration >= 5,
                       what="iterations on screen")
        await palette(pilot, "policy sjf")
        await wait_for(pilot, lambda: engine.live.policy == "sjf", what="the engine on sjf")
        await wait_for(pilot, lambda: any("policy=sjf → it" in t for t in log_texts(app)), what="the logged change")
        applied = app.last_result.applied_iteration
        await wait_for(pilot, lambda: app.state.latest.iteration > applied + 2, what="iterations after the change")
        assert app.state.marks and app.state.marks[-1].iteration == applied  # the mark on the plots
        await wait_for(pilot, lambda: app.state.finished_total > 0 and app.state.gpu is not None,
                       what="a finished request and a GPU sample")
        await app.shutdown()
    assert not app.client.engine.running
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0]["type"] == "config" and lines[0]["config"]["policy"] == "fcfs"
    changes = [line for line in lines if line["type"] == "event" and line["kind"] == "config_change"]
    assert len(changes) == 1
    change = changes[0]
    assert change["changes"] == {"policy": "sjf"} and change["source"] == "console"
    assert change["applied_iteration"] == applied
    (action,) = [line for line in lines if line["type"] == "action" and line["op"] == "set"]
    assert action["ok"] is True and action["applied_iteration"] == applied and action["changes"] == {"policy": "sjf"}
    iterations = [line for line in lines if line["type"] == "iteration"]
    assert all(r["config_version"] == (1 if r["iteration"] >= applied else 0) for r in iterations)
    assert {"request", "requests", "gpu"} <= {line["type"] for line in lines}
    gpu = next(line for line in lines if line["type"] == "gpu")
    assert gpu["available"] is False or gpu["memory_total"]  # "unavailable" without a GPU


def quiet_app():
    """(app, client, engine) of an in-process console with no background load: the test submits its own."""
    app = build_app(None, overrides={**ENGINE, "model": "synthetic:tiny", "max_num_seqs": 4}, log=lambda line: None)
    app.drivers = []
    return app, app.client, app.client.engine.engine


async def pause_burst_resume(pilot, app, client, engine) -> None:
    """The first steering paths of a fresh console: pause (key p) stops iterating, a burst (key b)
    while paused is queued and not run, p again resumes."""
    await wait_for(pilot, lambda: app.state.config is not None, what="config")
    await pilot.press("p")
    await wait_for(pilot, lambda: client.engine.paused and app.state.paused, what="paused")
    await pilot.press("b")
    await wait_for(pilot, lambda: engine.num_requests_added == app.burst_size, what="the burst")
    assert engine.iteration == 0
    await pilot.press("p")
    await wait_for(pilot, lambda: not client.engine.paused and engine.iteration > 0, what="resumed")


async def test_every_steering_path_on_the_real_engine():
    app, client, engine = quiet_app()
    async with app.run_test(size=SIZE) as pilot:
        await pause_burst_resume(pilot, app, client, engine)
        # the pause event reaches the log through the telemetry stream, possibly a frame later
        await wait_for(pilot, lambda: [e for e in log_texts(app) if "paused before it 0 (console)" in e],
                       what="the pause in the event log")
        # abort the selected request (key x)
        long = await client.submit({"id": "long-1", "prompt_token_ids": [5] * 16, "max_tokens": 3000,
                                    "ignore_eos": True})
        assert long.ok and long.data == ["long-1"]
        table = app.query_one("#requests")
        await wait_for(pilot, lambda: "long-1" in table.rows, what="the long request in the table")
        table.focus()
        table.move_cursor(row=table.get_row_index("long-1"))
        victim = table.selected_request_id
        assert victim == "long-1"
        await pilot.press("x", "x")  # the first names it, the second aborts it
        await wait_for(pilot, lambda: engine.requests[victim].is_finished, what="the abort")
        assert engine.requests[victim].finish_reason.value == "abort"
        # invalid values from the palette: refused with the reason, the engine untouched
        await palette(pilot, "max_num_seqs 1000")
        assert any("an integer in [1, 256]" in n for n in notes(app)) and engine.target_config.version == 0
        # the config panel: two settings in one change
        await set_in_panel(pilot, {"max_num_seqs": 2, "preemption": "drain"})
        await wait_for(pilot, lambda: engine.live.max_num_seqs == 2 and engine.live.preemption == "drain",
                       what="the panel's change")
        assert engine.live.version == 1
        # a refusal from the engine itself reaches the operator as such
        result = await client.set({"max_num_seqs": 0})
        assert not result.ok and result.error == ("max_num_seqs=0 is not allowed: an integer in [1, 256] "
                                                   "(max_num_seqs_limit, fixed at start)")
        aborted = await client.abort("no-such-request")
        assert not aborted.ok and "not running or waiting" in aborted.error
        bad = await client.submit({"prompt_token_ids": [1, 2], "max_tokens": 0})
        assert not bad.ok and "max_tokens" in bad.error
        await app.shutdown()


async def test_spec_k_from_the_console_reaches_the_engine_and_acceptance_is_shown():
    """Speculation turned on from the palette, a repetitive prompt (the n-gram drafter finds drafts in
    it), the acceptance rate on screen; out-of-bounds refused with the range; off again from the panel."""
    app, client, engine = quiet_app()
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.state.config is not None, what="config")
        await palette(pilot, "spec_k 9")
        assert any("spec_k=9 is not allowed: an integer in [0, 8]" in n for n in notes(app))
        assert engine.target_config.version == 0
        await palette(pilot, "spec_k 4")
        await wait_for(pilot, lambda: engine.live.spec_k == 4, what="the engine speculating")
        await wait_for(pilot, lambda: any("spec_k=4 → it" in t for t in log_texts(app)), what="the logged change")
        submitted = await client.submit([{"id": f"rep-{i}", "prompt_token_ids": [7, 8, 9, 10] * 12, "max_tokens": 48,
                                          "ignore_eos": True} for i in range(2)])
        assert submitted.ok
        await wait_for(pilot, lambda: app.state.snapshot(None)["speculation"]["proposed"] > 0, what="speculative iterations")
        await wait_for(pilot, lambda: spec_shown(app).startswith("accepted ") and "accepted -" not in spec_shown(app),
                       what="the acceptance rate on screen")
        shown = spec_shown(app)
        rate = int(shown.split()[1].rstrip("%"))
        assert 0 <= rate <= 100 and shown.endswith(" tok/it")
        await wait_for(pilot, lambda: app.state.finished_total == 2, what="the requests to finish")
        assert all(engine.requests[f"rep-{i}"].spec_proposed > 0 for i in range(2))
        await set_in_panel(pilot, {"spec_k": 0})
        await wait_for(pilot, lambda: engine.live.spec_k == 0, what="speculation off from the panel")
        assert engine.live.version == 2
        await app.shutdown()


def test_console_flags_start_the_engine_speculating():
    from batchdeck.console.cli import _overrides
    from batchdeck.cli import build_parser

    args = build_parser().parse_args(["console", "--spec-k", "3", "--num-blocks", "64"])
    assert _overrides(args) == {"spec_k": 3, "num_blocks": 64}  # flags not given leave the defaults be
    drafting = build_parser().parse_args(["console", "--draft-model", "synthetic:tiny", "--spec-k-limit", "4"])
    assert _overrides(drafting) == {"draft_model": "synthetic:tiny", "drafter": "model", "spec_k_limit": 4}
    app = build_app(None, args=args, overrides={"model": "synthetic:tiny"}, log=lambda line: None)
    assert app.client.engine.engine.live.spec_k == 3 and app.state.config["spec_k"] == 3


def test_cli_refuses_conflicting_modes(capsys, tmp_path):
    assert batchdeck_main(["console", "--attach", "mqtt://h:1/e", "--replay", "x.jsonl"]) == 2
    assert "--attach and --replay exclude each other" in capsys.readouterr().err
    assert batchdeck_main(["console", "--preset", "quickstart", "--attach", "mqtt://h:1/e"]) == 2
    assert "--preset needs an in-process engine" in capsys.readouterr().err
    assert batchdeck_main(["console", "--refresh-hz", "30"]) == 2
    assert "--refresh-hz must be in (0, 10]" in capsys.readouterr().err
    assert batchdeck_main(["console", "--attach", "mqtt://h:1"]) == 2
    assert "engine id" in capsys.readouterr().err
    assert batchdeck_main(["console", "--replay", "/nonexistent/x.jsonl"]) == 2
    assert "--replay '/nonexistent/x.jsonl' does not exist" in capsys.readouterr().err
    not_a_dir = tmp_path / "a-file"
    not_a_dir.write_text("")
    record = str(not_a_dir / "run.jsonl")
    assert batchdeck_main(["console", "--record", record, "--num-blocks", "64"]) == 2
    err = capsys.readouterr().err  # refused before the model loads
    assert f"--record {record!r}: {str(not_a_dir)!r} is a file, not a directory" in err
    assert "loading" not in err


def test_record_makes_its_directory_as_replay_does(tmp_path):
    from batchdeck.console.cli import _check_files

    record = tmp_path / "runs" / "today" / "run.jsonl"
    _check_files(argparse.Namespace(replay=None, record=str(record)))
    assert record.parent.is_dir() and not record.exists()


@pytest.mark.parametrize("preset", ["quickstart"])
async def test_preset_mode_drives_the_engine_with_the_timeline(preset):
    """--preset: the preset's workload and timeline run through presets.replay (PresetDriver)."""
    app = build_app(preset, overrides={**ENGINE}, duration_scale=0.05, log=lambda line: None)
    engine = app.client.engine.engine
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: engine.num_requests_added > 0 and app.state.latest is not None,
                       what="the preset's requests")
        assert app.title == f"batchdeck · {preset}"
        await app.shutdown()


async def test_an_in_process_engine_that_fails_is_shown_failed_and_refuses_steering():
    """It used to stay green 'in-process', report a set as applied, and lose the resume's error."""
    from tests.helpers import fail_steps

    app = build_app(None, overrides={**ENGINE, "model": "synthetic:tiny"}, log=lambda line: None)
    engine = app.client.engine.engine
    fail_steps(engine, lambda: engine.iteration >= 5, "boom")
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.client.state == "engine failed", timeout=60, what="the failed state")
        await wait_for(pilot, lambda: any("RuntimeError: boom" in n for n in notes(app)), what="the notification")
        result = await app.client.set({"max_num_seqs": 2})
        assert not result.ok and "the engine failed: RuntimeError: boom" in result.error
        result = await app.run_command("resume")
        assert not result.ok and "the engine failed" in result.error
        assert engine.target_config.max_num_seqs != 2
        await app.shutdown()
