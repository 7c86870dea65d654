"""The bridge with broker authentication (username/password) and TLS, against real mosquitto brokers."""
import shutil
import subprocess

import pytest

from batchdeck.engine.service.async_engine import AsyncEngine
from batchdeck.engine.service.bus import Bus
from batchdeck.engine.service.mqtt_bridge import MqttBridge, MqttSettings
from tests.helpers import make_engine
from tests.mqtt_broker import Broker, MqttProbe, eventually, mosquitto_binary, one_torch_thread  # noqa: F401

pytestmark = [pytest.mark.mqtt, pytest.mark.usefixtures("one_torch_thread")]


def _binary():
    binary = mosquitto_binary()
    if binary is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    return binary


async def _engine(model_dirs):
    bus = Bus()
    eng = AsyncEngine(make_engine(model_dirs["llama"], sink=bus))
    await eng.start()
    return bus, eng


async def test_username_password(model_dirs, tmp_path):
    binary = _binary()
    passwd = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    pwfile = tmp_path / "passwd"
    try:
        subprocess.run([passwd, "-b", "-c", str(pwfile), "deck", "s3cret"], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"mosquitto_passwd unavailable: {exc}")
    broker = Broker(binary, tmp_path, extra_config=f"allow_anonymous false\npassword_file {pwfile}\n",
                    client_kwargs={"username": "deck", "password": "s3cret"})
    broker.start()
    try:
        await _check_username_password(model_dirs, broker)
    finally:
        broker.stop()


async def _check_username_password(model_dirs, broker):
    bus, eng = await _engine(model_dirs)
    warned: list[str] = []
    wrong = MqttBridge(eng, bus, "auth-bad", MqttSettings(broker.host, broker.port, username="deck", password="nope"),
                       log=None, warn=warned.append, reconnect_min=0.05, reconnect_max=0.2)
    good = MqttBridge(eng, bus, "auth", MqttSettings(broker.host, broker.port, username="deck", password="s3cret"),
                      log=None)
    try:
        await wrong.start()
        await good.start()
        await good.wait_connected(60)
        async with MqttProbe(broker, "auth") as probe:
            reply = await probe.command({"op": "get"})
            assert reply["ok"] and reply["version"] == 0
        await eventually(lambda: wrong.last_error, what="the refused connection's error")
        assert not wrong.connected and wrong.connects == 0
        assert "authori" in (wrong.last_error or "").lower(), wrong.last_error
        await eventually(lambda: warned, what="the refused login's warning")
        assert "the broker refused the login" in warned[0] and "--mqtt-username" in warned[0], warned
    finally:
        await wrong.close()
        await good.close()
        await eng.stop()


async def test_tls(model_dirs, tmp_path):
    binary = _binary()
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    ca_key, ca, key, csr, cert = (tmp_path / n for n in ("ca.key", "ca.crt", "server.key", "server.csr", "server.crt"))
    ext = tmp_path / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for cmd in (["openssl", "req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", "1",
                 "-subj", "/CN=batchdeck-test-ca"],
                ["openssl", "req", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1"],
                ["openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert,
                 "-days", "1", "-extfile", ext]):
        subprocess.run([str(c) for c in cmd], check=True, capture_output=True)
    import aiomqtt

    broker = Broker(binary, tmp_path, extra_config=f"cafile {ca}\ncertfile {cert}\nkeyfile {key}\n",
                    client_kwargs={"tls_params": aiomqtt.TLSParameters(ca_certs=str(ca))})
    broker.start()
    try:
        await _check_tls(model_dirs, broker, ca)
    finally:
        broker.stop()


async def _check_tls(model_dirs, broker, ca):
    bus, eng = await _engine(model_dirs)
    bridge = MqttBridge(eng, bus, "tls", MqttSettings(broker.host, broker.port, tls=True, ca_certs=str(ca)), log=None)
    plain = MqttBridge(eng, bus, "plain", MqttSettings(broker.host, broker.port), log=None,
                       reconnect_min=0.05, reconnect_max=0.2)
    try:
        await bridge.start()
        await plain.start()
        await bridge.wait_connected(60)
        async with MqttProbe(broker, "tls") as probe:
            await probe.wait_for(lambda: probe.on("status") == [b"online"], what="status over TLS")
            reply = await probe.command({"op": "get"})
            assert reply["ok"]
        assert not plain.connected and plain.connects == 0
    finally:
        await plain.close()
        await bridge.close()
        await eng.stop()
