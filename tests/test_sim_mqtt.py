"""`batchdeck engine --sim` steered over MQTT: the retained config says it is simulated; submit, set,
pause, resume and SIGTERM work as on the real engine."""
from __future__ import annotations

from tests.mqtt_broker import MqttProbe, broker, run_batchdeck, wait_online  # noqa: F401 - fixtures
from tests.test_sim import profile_path  # noqa: F401 - a fixture


def test_simulated_engine_over_mqtt(broker, profile_path):  # noqa: F811
    status, err = run_batchdeck(["engine", "--sim", str(profile_path), "--mqtt", broker.address, "--engine-id", "sim1",
                                 "--status-interval", "0.5"], lambda proc: _drive(broker, proc))
    assert status == 0, err
    assert "simulated Test GPU (profile test-tiny)" in err


async def _drive(broker, proc):  # noqa: F811
    async with MqttProbe(broker, "sim1") as probe:
        await wait_online(probe, proc)
        config = await probe.wait_for(lambda: probe.json_on("config"), what="retained config")
        engine = config[-1]["engine"]
        assert engine["simulation"]["profile"] == "test-tiny" and engine["device"].startswith("simulated")
        reply = await probe.command({"op": "set", "params": {"policy": "sjf", "max_num_seqs": 4}})
        assert reply["ok"], reply
        reply = await probe.command({"op": "submit", "request": {"id": "r1", "prompt_token_ids": [5, 6, 7],
                                                                 "max_tokens": 30, "ignore_eos": True}})
        assert reply["ok"], reply
        await probe.wait_for(lambda: [r for r in probe.json_on("telemetry/request") if r["request_id"] == "r1"],
                             what="r1 finished")
        assert (await probe.command({"op": "pause"}))["ok"]
        assert (await probe.command({"op": "resume"}))["ok"]
        reply = await probe.command({"op": "set", "params": {"max_num_seqs": 0}})
        assert not reply["ok"] and "max_num_seqs" in reply["error"]
