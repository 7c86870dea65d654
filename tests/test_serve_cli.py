"""`batchdeck serve` as a command: --mqtt makes the same process publish telemetry and obey control
exactly as `batchdeck engine` does; SIGINT drains and exits 0."""
from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.mqtt_broker import MqttProbe, broker, free_port, retained, run_batchdeck, wait_online  # noqa: F401

REPO = Path(__file__).resolve().parent.parent


def test_serve_flag_errors(capsys):
    from batchdeck.cli import main

    assert main(["serve", "--port", "70000"]) == 2
    assert "--port" in capsys.readouterr().err
    assert main(["serve", "--read-only"]) == 2  # read-only is about MQTT control
    assert "--mqtt" in capsys.readouterr().err


@pytest.mark.mqtt
def test_serve_with_mqtt_is_steered_like_the_headless_engine(broker):
    port = free_port()
    args = ["serve", "synthetic:tiny", "--device", "cpu", "--port", str(port), "--num-blocks", "256",
            "--mqtt", broker.address, "--engine-id", "sv", "--status-interval", "0", "--served-model-name", "tiny"]
    status, text = run_batchdeck(args, lambda proc: _drive(broker, proc, port), sigterm=False)
    assert status == 0, text
    assert "serving 'tiny' at http://127.0.0.1:" in text
    assert "SIGINT: aborted 1 in-flight request(s)" in text, text
    assert asyncio.run(retained(broker, "batchdeck/sv/status")) == b"offline"


async def _drive(broker, proc, port):
    base = f"http://127.0.0.1:{port}"
    async with MqttProbe(broker, "sv") as probe, httpx.AsyncClient(timeout=60) as http:
        await wait_online(probe, proc, timeout=120, what="the server")
        deadline = time.monotonic() + 120
        while True:  # MQTT is up before HTTP: wait for the listener too
            try:
                if (await http.get(base + "/health")).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "no /health"
            await asyncio.sleep(0.05)
        r = await http.post(base + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 3,
                                                            "user": "carol"})
        assert r.status_code == 200
        # the HTTP request's telemetry went out over MQTT
        await probe.wait_for(lambda: [x for x in probe.json_on("telemetry/request") if x["tenant"] == "carol"],
                             what="the HTTP request's record over MQTT")
        reply = await probe.command({"op": "set", "params": {"policy": "sjf"}})
        assert reply["ok"], reply
        # the engine (in its own process) answered over MQTT; its telemetry reaches /metrics within a flush
        while 'batchdeck:policy_info{model_name="tiny",policy="sjf"} 1.0' not in (await http.get(base + "/metrics")).text:
            assert time.monotonic() < deadline, "the policy change never reached /metrics"
            await asyncio.sleep(0.02)
        body = {"prompt": "long", "max_tokens": 3000, "ignore_eos": True, "stream": True}
        finish = None
        async with http.stream("POST", base + "/v1/completions", json=body) as resp:
            async for line in resp.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                if finish is None and '"finish_reason":null' in line and proc.poll() is None:
                    proc.send_signal(signal.SIGINT)  # a request is streaming: drain it away
                    finish = "signalled"
                if '"finish_reason":"' in line:
                    finish = line.split('"finish_reason":"')[1].split('"')[0]
        assert finish == "abort"
        await probe.wait_for(lambda: probe.on("status")[-1:] == [b"offline"], timeout=60, what="offline")
