"""Who may steer the engine: the engine behind a mosquitto password file + the README's ACL, the
password never on the command line, --no-results, and the warning for an engine without credentials."""
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from batchdeck.cli import build_parser, main
from batchdeck.engine.service.async_engine import AsyncEngine
from batchdeck.engine.service.bus import Bus
from batchdeck.engine.service.headless import mqtt_settings, open_control_warning
from batchdeck.engine.service.mqtt_bridge import MqttBridge, MqttSettings
from batchdeck.engine.service.protocol import CONFIG, CONTROL_REPLY, STATUS, TELEMETRY_TOPICS, topic_prefix
from tests.helpers import make_engine
from tests.mqtt_broker import (Broker, MqttProbe, ThreadProbe, broker, eventually, mosquitto_binary,  # noqa: F401
                               one_torch_thread, retained, run_batchdeck)

REPO = Path(__file__).resolve().parents[1]
ACL = REPO / "docs" / "mosquitto" / "acl.conf"
USERS = {"engine": "e-pass", "operator": "o-pass", "viewer": "v-pass", "intruder": "i-pass"}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_the_readme_shows_the_acl_file_that_is_tested():
    readme = (REPO / "README.md").read_text()
    acl = ACL.read_text()
    assert acl.strip() in readme, "README's ACL example and docs/mosquitto/acl.conf differ"
    assert "Retained messages on `PREFIX/control` are ignored" in readme and "only an acl" in readme.lower()


def test_password_from_a_file_and_help_says_how(tmp_path, monkeypatch):
    pw = tmp_path / "pw"
    pw.write_text("s3cret\nignored second line\n")
    monkeypatch.setenv("BATCHDECK_MQTT_PASSWORD", "from-env")
    parse = build_parser().parse_args
    args = parse(["engine", "--mqtt", "h", "--mqtt-username", "u", "--mqtt-password-file", str(pw)])
    assert mqtt_settings(args).password == "s3cret"
    assert mqtt_settings(parse(["engine", "--mqtt", "h", "--mqtt-username", "u"])).password == "from-env"
    assert main(["engine", "--mqtt", "h", "--mqtt-password-file", str(tmp_path / "missing")]) == 2
    assert main(["engine", "--mqtt", "h", "--mqtt-password-file", str(pw), "--mqtt-password", "x"]) == 2
    (tmp_path / "empty").write_text("\n")
    assert main(["engine", "--mqtt", "h", "--mqtt-password-file", str(tmp_path / "empty")]) == 2
    help_text = " ".join(build_parser()._subparsers._group_actions[0].choices["engine"].format_help().split())
    assert "--mqtt-password-file FILE" in help_text and "not visible in ps" in help_text
    assert "BATCHDECK_MQTT_PASSWORD" in help_text and "--no-results" in help_text


def test_console_attach_takes_the_password_from_the_environment(monkeypatch):
    from batchdeck.console.cli import attach_target

    monkeypatch.setenv("BATCHDECK_MQTT_PASSWORD", "from-env")
    assert attach_target("mqtt://operator@h:1884/lab1").password == "from-env"
    assert attach_target("mqtt://operator:inline@h/lab1").password == "inline"
    assert attach_target("mqtt://h/lab1").password is None


def test_the_warning_for_control_without_credentials():
    open_broker = MqttSettings("10.0.0.5", 1883)
    text = open_control_warning(open_broker, "lab1", read_only=False, publish_results=True)
    assert text.startswith("no broker credentials") and "10.0.0.5:1883" in text
    assert "batchdeck/lab1/control" in text and "batchdeck/lab1/results" in text and "ACL" in text
    quiet = open_control_warning(open_broker, "lab1", read_only=True, publish_results=False)
    assert "control" not in quiet.split(";")[0] and "results" not in quiet and "retained" in quiet
    assert open_control_warning(MqttSettings("h", 1, username="engine", password="p"), "lab1", False, True) is None
    assert open_control_warning(MqttSettings("h", 1, certfile="c.pem"), "lab1", False, True) is None


@pytest.mark.mqtt
async def test_no_results_publishes_no_prompts(model_dirs, broker):
    bus = Bus()
    eng = AsyncEngine(make_engine(model_dirs["llama"], sink=bus))
    await eng.start()
    bridge = MqttBridge(eng, bus, "nr", MqttSettings(broker.host, broker.port), publish_results=False, log=None)
    await bridge.start()
    try:
        await bridge.wait_connected(60)
        async with MqttProbe(broker, "nr") as probe:
            reply = await probe.command({"op": "submit", "request": {"id": "q", "prompt": "secret", "max_tokens": 3}})
            assert reply["ok"], reply
            await probe.wait_for(lambda: [r for r in probe.json_on("telemetry/request") if r["request_id"] == "q"],
                                 what="q's RequestRecord")
            assert (await probe.command({"op": "pause"}))["ok"]  # its event follows any result on the same pump
            await probe.wait_for(lambda: any(e["kind"] == "pause" for e in probe.json_on("events")), what="pause")
            assert probe.on("results") == []
    finally:
        await bridge.close()
        await eng.stop()


def _passwords(tmp_path: Path) -> Path:
    tool = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    path = tmp_path / "passwd"
    try:
        for n, (user, password) in enumerate(USERS.items()):
            subprocess.run([tool, "-b", *(["-c"] if n == 0 else []), str(path), user, password],
                           check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"mosquitto_passwd unavailable: {exc}")
    return path


@pytest.mark.mqtt
def test_engine_behind_the_readme_acl(model_dirs, tmp_path):
    """Only the operator steers the engine and reads results; a viewer reads telemetry only; nobody
    but the engine can publish its retained status or config; the password is not in ps."""
    binary = mosquitto_binary()
    if binary is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    acl = tmp_path / "acl.conf"
    acl.write_text(ACL.read_text())
    broker = Broker(binary, tmp_path, extra_config=f"allow_anonymous false\npassword_file {_passwords(tmp_path)}\n"
                                                   f"acl_file {acl}\n",
                    client_kwargs={"username": "operator", "password": USERS["operator"]})
    broker.start()
    pw_file = tmp_path / "engine.pw"
    pw_file.write_text(USERS["engine"] + "\n")
    args = ["engine", "--model", model_dirs["llama"], "--device", "cpu", "--mqtt", broker.address, "--engine-id", "lab1",
            "--num-blocks", "64", "--status-interval", "0", "--gpu-interval", "0", "--mqtt-username", "engine",
            "--mqtt-password-file", str(pw_file)]
    try:
        status, text = run_batchdeck(args, lambda proc: _check_acl(broker, proc), env_drop=("BATCHDECK_MQTT_PASSWORD",))
    finally:
        broker.stop()
    assert status == 0, text
    assert "warning" not in text.lower() and "mqtt: connected" in text, text


async def _check_acl(broker: Broker, proc: subprocess.Popen) -> None:
    operator = ThreadProbe(broker, "lab1").connect()
    viewer = ThreadProbe(broker, "lab1", username="viewer", password=USERS["viewer"],
                         topics=(STATUS, CONFIG, "telemetry/#", TELEMETRY_TOPICS["event"], TELEMETRY_TOPICS["result"],
                                 CONTROL_REPLY))
    intruder = ThreadProbe(broker, "lab1", username="intruder", password=USERS["intruder"])
    try:
        await eventually(lambda: proc.poll() is not None or b"online" in operator.on("status"), timeout=120,
                         what="the engine online")
        assert proc.poll() is None, proc.communicate()[1].decode()[-3000:]
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        assert USERS["engine"].encode() not in cmdline, "the password is visible in ps"
        viewer.connect()
        intruder.connect()
        for probe, who in ((viewer, "viewer"), (intruder, "intruder")):
            probe.send({"id": f"{who}-1", "op": "pause"})
            probe.send({"id": f"{who}-2", "op": "submit", "request": {"prompt": "x", "max_tokens": 2}})
            probe.publish("status", b"offline", retain=True)
            probe.publish("config", {"version": 99}, retain=True)
        # Acknowledged by the broker (and dropped by its ACL) before the operator's commands go out:
        # had they reached the engine, their replies would come first.
        operator.send({"id": "o1", "op": "submit", "request": {"id": "q1", "prompt_token_ids": [5, 6, 7],
                                                                "max_tokens": 4, "ignore_eos": True}})
        await eventually(lambda: [r for r in operator.json_on("results") if r["id"] == "q1"], what="q1's result")
        operator.send({"id": "o2", "op": "pause"})
        await eventually(lambda: len(operator.replies()) >= 2, what="the reply to o2")
        await eventually(lambda: any(e["kind"] == "pause" for e in viewer.json_on("events")),
                         what="the viewer to see the pause event")
        assert [r["id"] for r in operator.replies()] == ["o1", "o2"]
        assert all(r["ok"] for r in operator.replies()), operator.replies()
        assert viewer.on("results") == [] and viewer.on("control/reply") == [], "the viewer reads no prompts"
        assert viewer.on("telemetry/iteration") and viewer.on("status")
        assert intruder.messages == []
        assert await retained(broker, f"{topic_prefix('lab1')}/{STATUS}") == b"online"
        assert json.loads(await retained(broker, f"{topic_prefix('lab1')}/{CONFIG}"))["version"] == 0
    finally:
        for probe in (operator, viewer, intruder):
            probe.close()
