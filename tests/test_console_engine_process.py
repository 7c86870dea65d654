"""The console with its engine in a child process (console/engine_process.py): telemetry and every
steering path over the pipe, startup errors as in-process, the recording, and no orphan children."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from batchdeck.cli import main as batchdeck_main
from batchdeck.console.cli import build_app
from batchdeck.console.engine_process import EngineProcessClient, EngineSpec, ExceptionBlob
from batchdeck.engine.settings import ConfigError
from tests.test_console_app import busy_process_pilot  # noqa: F401 - a fixture
from tests.test_console_app import SIZE, log_texts, notes, palette, wait_for

pytestmark = pytest.mark.usefixtures("busy_process_pilot")
ENGINE = {"num_blocks": 512, "model": "synthetic:tiny"}
SLOW = 60.0  # a child process imports torch and builds its engine first


async def test_steady_load_policy_change_and_recording_through_the_child(tmp_path):
    path = tmp_path / "session.jsonl"
    app = build_app(None, overrides=dict(ENGINE), record=path, log=lambda line: None, engine_process=True)
    client = app.client
    assert isinstance(client, EngineProcessClient) and client.process.is_alive()
    assert app.refresh_hz == 10.0 and "engine process" in client.description
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.state.latest is not None and app.state.latest.iteration >= 5,
                       timeout=SLOW, what="iterations from the child on screen")
        await palette(pilot, "policy sjf")
        await wait_for(pilot, lambda: any("policy=sjf → it" in t for t in log_texts(app)), timeout=SLOW,
                       what="the logged change")
        applied = app.last_result.applied_iteration
        assert client.config_snapshot["config"]["policy"] == "sjf"
        await wait_for(pilot, lambda: app.state.latest.iteration > applied + 2, timeout=SLOW,
                       what="iterations after the change")
        await wait_for(pilot, lambda: app.state.finished_total > 0 and app.state.gpu is not None, timeout=SLOW,
                       what="a finished request and a GPU sample")
        assert client.now() is not None
        await app.shutdown()
    assert not client.process.is_alive() and client.process.exitcode == 0
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0]["type"] == "config" and lines[0]["config"]["policy"] == "fcfs"
    (change,) = [line for line in lines if line["type"] == "event" and line["kind"] == "config_change"]
    assert change["changes"] == {"policy": "sjf"} and change["source"] == "console"
    assert change["applied_iteration"] == applied
    iterations = [line for line in lines if line["type"] == "iteration"]
    assert all(r["config_version"] == (1 if r["iteration"] >= applied else 0) for r in iterations)
    assert {"request", "requests", "gpu"} <= {line["type"] for line in lines}


async def test_every_steering_path_over_the_pipe():
    app = build_app(None, overrides={**ENGINE, "max_num_seqs": 4}, log=lambda line: None, engine_process=True,
                    steady_load=False)
    client = app.client
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.state.config is not None, timeout=SLOW, what="config")
        await pilot.press("p")
        await wait_for(pilot, lambda: app.state.paused, timeout=SLOW, what="paused")
        await pilot.press("b")  # a burst while paused: queued, not run
        await wait_for(pilot, lambda: any("paused before it 0 (console)" in e for e in log_texts(app)),
                       timeout=SLOW, what="the pause in the event log")
        assert app.state.latest is None
        await pilot.press("p")
        await wait_for(pilot, lambda: not app.state.paused and app.state.latest is not None, timeout=SLOW,
                       what="resumed")
        long = await client.submit({"id": "long-1", "prompt_token_ids": [5] * 16, "max_tokens": 3000,
                                    "ignore_eos": True})
        assert long.ok and long.data == ["long-1"]
        await wait_for(pilot, lambda: "long-1" in app.state.requests, timeout=SLOW, what="the long request")
        aborted = await client.abort("long-1")
        assert aborted.ok and aborted.data == "long-1"
        await wait_for(pilot, lambda: "long-1" not in app.state.requests, timeout=SLOW, what="the abort")
        await palette(pilot, "max_num_seqs 1000")  # refused in the UI, against the snapshot's bounds
        assert any("an integer in [1, 256]" in n for n in notes(app))
        result = await client.set({"max_num_seqs": 0})  # refused by the engine in the child
        assert not result.ok and result.error == ("max_num_seqs=0 is not allowed: an integer in [1, 256] "
                                                   "(max_num_seqs_limit, fixed at start)")
        ok = await client.set({"max_num_seqs": 2, "preemption": "drain"})
        assert ok.ok and ok.op == "set" and ok.applied_iteration is not None
        got = await client.get_config()
        assert got.ok and got.config["config"]["max_num_seqs"] == 2 and got.config["version"] == 1
        missing = await client.abort("no-such-request")
        assert not missing.ok and "not running or waiting" in missing.error
        bad = await client.submit({"prompt_token_ids": [1, 2], "max_tokens": 0})
        assert not bad.ok and "max_tokens" in bad.error
        await app.shutdown()
    assert not client.process.is_alive()
    after = await client.pause()
    assert not after.ok and "stopped" in after.error


async def test_preset_mode_plays_in_the_child():
    app = build_app("quickstart", overrides={"num_blocks": 512}, duration_scale=0.05, log=lambda line: None,
                    engine_process=True)
    assert app.title == "batchdeck · quickstart" and app.drivers == []  # the child plays it
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.state.latest is not None and app.state.finished_total > 0, timeout=SLOW,
                       what="the preset's requests finishing")
        await app.shutdown()
    assert not app.client.process.is_alive()


def test_startup_errors_reach_the_operator_as_in_process(capsys):
    with pytest.raises(ValueError) as in_child:
        EngineProcessClient(EngineSpec(None, {"model": "synthetic:no-such-shape"}, announce=False))
    with pytest.raises(ValueError) as here:
        build_app(None, overrides={"model": "synthetic:no-such-shape"}, log=lambda line: None)
    assert type(in_child.value) is type(here.value) and str(in_child.value) == str(here.value)
    # a refused setting keeps its type and fields (ConfigError cannot be unpickled as is)
    rebuilt = ExceptionBlob.of(ConfigError("max_num_seqs", 0, "an integer in [1, 256]")).rebuild()
    assert isinstance(rebuilt, ConfigError) and rebuilt.key == "max_num_seqs"
    assert str(rebuilt) == "max_num_seqs=0 is not allowed: an integer in [1, 256]"
    from batchdeck.engine.request import QueueFullError

    full = ExceptionBlob.of(QueueFullError(5, 5)).rebuild()  # serve's 400-or-503 choice reads max_waiting
    assert isinstance(full, QueueFullError) and full.max_waiting == 5 and "max_waiting is 5" in str(full)
    assert batchdeck_main(["console", "--model", "synthetic:no-such-shape", "--num-blocks", "64"]) == 2
    err = capsys.readouterr().err
    assert "batchdeck: " in err and "no-such-shape" in err


def chatty_builder():
    """An engine-process build (EngineSpec.builder) whose one driver prints while the UI would run."""
    from batchdeck.console.cli import _inprocess

    client, _drivers, _title = _inprocess(None, None, {"model": "synthetic:tiny", "num_blocks": 64}, 1.0, 1.0, None,
                                          lambda line: None, False)

    async def chatter() -> None:
        print("hello from the engine process")
        print("a warning", file=sys.stderr)

    return client, [chatter], "chatty"


async def test_what_the_child_prints_is_kept_for_after_the_ui():
    client = EngineProcessClient(EngineSpec(builder=chatty_builder, announce=False))
    assert client.title == "chatty"
    try:
        await client.start()
        deadline = time.monotonic() + SLOW
        expected = "hello from the engine process\na warning\n"
        # the child's writes may arrive in several pieces: wait until everything it wrote is here
        while not "".join(client.output).startswith(expected):
            assert time.monotonic() < deadline, client.output
            await asyncio.sleep(0.02)
        assert "".join(client.output) == expected
    finally:
        await client.stop()
    assert not client.process.is_alive()


async def test_a_killed_engine_process_is_named_with_its_signal_once_and_refuses_commands():
    app = build_app(None, overrides=dict(ENGINE), log=lambda line: None, engine_process=True)
    client = app.client
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.state.latest is not None, timeout=SLOW, what="iterations from the child")
        os.kill(client.process.pid, signal.SIGKILL)
        await wait_for(pilot, lambda: "the engine process was killed by SIGKILL" in notes(app), timeout=SLOW,
                       what="the notification naming the signal")
        assert str(client.state) == "engine offline"
        result = await client.pause()
        assert not result.ok and result.error == "the engine process was killed by SIGKILL"
        await pilot.pause()
        assert notes(app).count("the engine process was killed by SIGKILL") == 1
        await app.shutdown()


def test_exit_notes():
    from batchdeck.console.engine_process import exit_note

    assert exit_note(-signal.SIGKILL) == "the engine process was killed by SIGKILL"
    assert exit_note(3) == "the engine process ended (exit code 3)"
    assert exit_note(-200) == "the engine process was killed by signal 200"


PARENT = textwrap.dedent("""
    import sys
    from batchdeck.console.engine_process import EngineProcessClient, EngineSpec
    if __name__ == "__main__":
        client = EngineProcessClient(EngineSpec(None, {"model": "synthetic:tiny", "num_blocks": 64}, announce=False))
        print(client.process.pid, flush=True)
        sys.stdin.read()  # until killed
""")


def test_the_child_dies_with_a_killed_parent(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    parent = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                              text=True)
    try:
        child = int(parent.stdout.readline())
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + SLOW
        while _alive(child):
            assert time.monotonic() < deadline, f"the engine process {child} outlived its parent"
            time.sleep(0.05)
    finally:
        if parent.poll() is None:
            parent.kill()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False
