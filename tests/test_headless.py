"""`batchdeck engine`: flags, a preset served headless in-process, and SIGTERM on a real subprocess."""
import asyncio
import logging
import json
import signal
from pathlib import Path

import pytest

from batchdeck.engine.service.bus import Bus
from batchdeck.cli import build_parser, main
from batchdeck.engine.service.headless import HeadlessRunner, engine_setup
from batchdeck.engine.telemetry import ListSink
from batchdeck.presets import parse_preset
from batchdeck.presets.preset_driver import headless_driver
from tests.helpers import make_engine
from tests.mqtt_broker import MqttProbe, broker, one_torch_thread, retained, run_batchdeck, wait_online  # noqa: F401

REPO = Path(__file__).resolve().parents[1]

PRESET = """
name: tiny-headless
model: synthetic:tiny
engine: {device: cpu, dtype: float32, block_size: 16, num_blocks: 128}
config: {max_num_seqs: 4, max_batched_tokens: 256, chunk_size: 64}
workload:
  - {kind: burst, count: 3, at: 0.0, input_tokens: 20, output_tokens: 8, tenant: a}
  - {kind: closed-loop, concurrency: 2, count: 4, input_tokens: 10, output_tokens: 6, tenant: b}
timeline:
  - {at_iteration: 2, set: {max_num_seqs: 2}}
  - {at: 0.01, pause: 0.1}
seed: 1
"""

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_flags_override_the_preset_and_nothing_to_serve_is_an_error(capsys):
    args = build_parser().parse_args(["engine", "--preset", "quickstart", "--max-num-seqs", "3", "--num-blocks", "99"])
    cfg, live, preset = engine_setup(args)
    assert preset.name == "quickstart"
    assert cfg.num_blocks == 99 and cfg.block_size == 16 and cfg.model == "synthetic:tiny"
    assert live.max_num_seqs == 3 and live.chunk_size == 256 and live.policy == "fcfs"
    args = build_parser().parse_args(["engine", "--mqtt", "localhost", "--chunk-size", "32"])
    cfg, live, preset = engine_setup(args)
    assert preset is None and cfg.model == "synthetic:tiny" and cfg.block_size == 16 and live.chunk_size == 32
    assert main(["engine"]) == 2
    assert "nothing to serve" in capsys.readouterr().err
    assert main(["engine", "--mqtt", "h:notaport"]) == 2
    assert main(["engine", "--mqtt", "h", "--engine-id", "a/b"]) == 2
    for command in (["generate", "--input", "i", "--output", "o"], ["engine"], ["console"], ["replay", "x"],
                    ["compare", "a"]):
        assert build_parser().parse_args([*command, "--log-level", "DEBUG"]).log_level == "debug"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["engine", "--log-level", "loud"])


def test_speculation_flags_apply_with_and_without_a_preset():
    """--spec-k, --spec-k-limit, --drafter and --draft-model (alone it implies drafter=model) reach the
    engine's settings whether a preset is played or not."""
    for base in (["engine", "--preset", "quickstart"], ["engine", "--mqtt", "localhost"]):
        args = build_parser().parse_args([*base, "--spec-k", "3", "--spec-k-limit", "5", "--draft-model", "synthetic:tiny",
                                          "--policy-params", '{"aging_s": 4}', "--policy", "sjf"])
        cfg, live, _ = engine_setup(args)
        assert (cfg.drafter, cfg.draft_model, cfg.spec_k_limit) == ("model", "synthetic:tiny", 5), base
        assert live.spec_k == 3 and live.policy == "sjf" and live.policy_params["aging_s"] == 4, base
        args = build_parser().parse_args([*base, "--drafter", "ngram"])
        cfg, _, _ = engine_setup(args)
        assert cfg.drafter == "ngram" and cfg.draft_model is None


async def test_headless_runs_a_preset_to_the_end(model_dirs, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="batchdeck")
    preset = parse_preset(PRESET, str(tmp_path / "p.yaml"))
    bus = Bus()
    sink = ListSink()
    bus.add_listener(sink)
    engine = make_engine(model_dirs["llama"], sink=bus, num_blocks=128, max_num_seqs=4, max_batched_tokens=256,
                         chunk_size=64)
    err = (tmp_path / "stderr.txt").open("w+")
    runner = HeadlessRunner(engine, bus, preset=preset, make_driver=headless_driver, status_interval=0.1, out=err, install_signals=False)
    assert await asyncio.wait_for(runner.run(), 60) == 0
    err.seek(0)
    text = err.read()
    assert "preset tiny-headless finished: 7 request(s) (0 rejected)" in caplog.text, caplog.text
    assert "Avg prompt throughput" in text and "final:" in text
    assert sorted(r.request_id for r in sink.requests) == ["0-0", "0-1", "0-2", "1-0", "1-1", "1-2", "1-3"]
    assert all(r.finish_reason == "length" for r in sink.requests)
    changes = [e for e in sink.events if e.kind == "config_change"]
    assert len(changes) == 1 and changes[0].data["source"] == "preset" and changes[0].data["applied_iteration"] >= 2
    kinds = [e.kind for e in sink.events]
    assert kinds.count("pause") == 1 and kinds.count("resume") == 1
    assert not runner.engine.running


async def test_an_engine_that_fails_ends_the_run_with_exit_1_and_says_why(model_dirs, tmp_path, caplog):
    """A step that raises stops the engine for good: the runner must not keep serving as if healthy (it
    used to wait for the preset or a signal, then exit 0)."""
    from tests.helpers import fail_steps

    caplog.set_level(logging.INFO, logger="batchdeck")
    preset = parse_preset(PRESET.replace("count: 4,", "count: 400,"), str(tmp_path / "p.yaml"))  # runs long
    bus = Bus()
    engine = make_engine(model_dirs["llama"], sink=bus, num_blocks=128, max_num_seqs=4, max_batched_tokens=256,
                         chunk_size=64)
    fail_steps(engine, lambda: engine.iteration >= 5, "boom")
    runner = HeadlessRunner(engine, bus, preset=preset, make_driver=headless_driver, status_interval=0,
                            out=(tmp_path / "stderr.txt").open("w"), install_signals=False)
    assert await asyncio.wait_for(runner.run(), 60) == 1
    assert "the engine failed: RuntimeError: boom; shutting down (exit 1)" in caplog.text, caplog.text
    assert caplog.text.count("the engine failed") == 1
    assert not runner.engine.running


async def test_an_engine_serving_no_preset_that_fails_ends_the_run(model_dirs, tmp_path, caplog):
    """The MQTT case: nothing but a signal would end the run, so the failure must."""
    from tests.helpers import fail_steps, greedy

    caplog.set_level(logging.INFO, logger="batchdeck")
    bus = Bus()
    engine = make_engine(model_dirs["llama"], sink=bus, num_blocks=128)
    fail_steps(engine, lambda: engine.iteration >= 2, "boom")
    runner = HeadlessRunner(engine, bus, status_interval=0, out=(tmp_path / "stderr.txt").open("w"),
                            install_signals=False)
    run = asyncio.create_task(runner.run())
    await runner.wait_started()
    await runner.engine.add_request("r", [1, 2, 3], greedy(50))
    assert await asyncio.wait_for(run, 60) == 1
    assert "the engine failed: RuntimeError: boom; shutting down (exit 1)" in caplog.text, caplog.text


@pytest.mark.mqtt
def test_sigterm_aborts_in_flight_publishes_offline_and_exits_0(model_dirs, broker):
    args = ["engine", "--model", model_dirs["llama"], "--device", "cpu", "--mqtt", broker.address, "--engine-id", "hl",
            "--num-blocks", "64", "--status-interval", "0.5", "--gpu-interval", "0.5"]
    status, text = run_batchdeck(args, lambda proc: _drive_and_terminate(broker, proc), sigterm=False)
    assert status == 0, text
    assert "SIGTERM: aborted 1 in-flight request(s): r1" in text, text
    assert "SIGTERM: dropped 1 scheduled submission(s) not yet due: later" in text, text
    assert "WARNING" in text and "no broker credentials given" in text and "batchdeck/hl/control" in text, text
    assert "Avg prompt throughput" in text
    assert asyncio.run(retained(broker, "batchdeck/hl/status")) == b"offline"


async def _drive_and_terminate(broker, proc):
    async with MqttProbe(broker, "hl") as probe:
        await wait_online(probe, proc)
        config = await probe.wait_for(lambda: probe.json_on("config"), what="retained config")
        assert config[-1]["version"] == 0 and "bounds" in config[-1]
        reply = await probe.command({"op": "submit", "request": {"id": "r1", "prompt_token_ids": [5, 6, 7],
                                                                 "max_tokens": 400, "ignore_eos": True}})
        assert reply["ok"], reply
        reply = await probe.command({"op": "submit", "request": {"id": "later", "prompt_token_ids": [5],
                                                                 "max_tokens": 2, "arrival_time": 3000}})
        assert reply["ok"] and reply["scheduled"], reply  # never due before the SIGTERM below
        await probe.wait_for(lambda: probe.iteration_records(), what="iteration telemetry")
        reply = await probe.command({"op": "pause"})  # keep r1 in flight, whatever the machine's speed
        assert reply["ok"], reply
        await probe.wait_for(lambda: probe.json_on("telemetry/gpu"), what="a gpu sample")
        proc.send_signal(signal.SIGTERM)
        await probe.wait_for(lambda: probe.on("status")[-1:] == [b"offline"], timeout=60, what="offline")
        records = [r for r in probe.json_on("telemetry/request") if r["request_id"] == "r1"]
        assert records and records[0]["finish_reason"] == "abort"
        assert json.loads(probe.on("telemetry/gpu")[0])["available"] in (True, False)
