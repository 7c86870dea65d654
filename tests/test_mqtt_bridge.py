"""The MQTT bridge against a real mosquitto broker: topic contract, control, bad commands, faults."""
import asyncio
import json

import pytest

from batchdeck.engine.service.async_engine import AsyncEngine
from batchdeck.engine.service.bus import Bus
from batchdeck.engine.service.mqtt_bridge import MqttBridge, MqttSettings, parse_broker
from batchdeck.engine.request import SamplingParams
from tests.helpers import make_engine
from tests.mqtt_broker import MqttProbe, broker, eventually, one_torch_thread, retained  # noqa: F401 - fixtures

pytestmark = [pytest.mark.mqtt, pytest.mark.usefixtures("one_torch_thread")]


async def start_stack(model_dirs, broker, engine_id, *, read_only=False, bus=None, engine=None, **bridge_kw):
    if engine is None:
        bus = Bus()
        engine = AsyncEngine(make_engine(model_dirs["llama"], sink=bus, max_num_seqs=4), snapshot_interval=0.05)
        await engine.start()
    bridge = MqttBridge(engine, bus, engine_id, MqttSettings(broker.host, broker.port), read_only=read_only,
                        log=None, reconnect_min=0.05, reconnect_max=0.3, **bridge_kw)
    await bridge.start()
    await bridge.wait_connected(60)
    return bus, engine, bridge


async def test_topic_contract_and_control(model_dirs, broker):
    async with MqttProbe(broker, "e1") as probe:
        bus, eng, bridge = await start_stack(model_dirs, broker, "e1")
        try:
            assert await retained(broker, "batchdeck/e1/status") == b"online"
            cfg = json.loads(await retained(broker, "batchdeck/e1/config"))
            assert cfg["version"] == 0 and cfg["config"]["max_num_seqs"] == 4
            assert cfg["bounds"]["max_num_seqs"] == [1, 256] and cfg["paused"] is False

            reply = await probe.command({"op": "submit", "request": {"id": "r1", "prompt_token_ids": [1, 2, 3],
                                                                     "max_tokens": 40, "ignore_eos": True}})
            assert reply["ok"] is True and reply["request_id"] == "r1", reply
            reply = await probe.command({"op": "set", "params": {"max_num_seqs": 3, "chunk_size": 64}})
            assert reply["ok"] is True and reply["config"]["max_num_seqs"] == 3, reply
            assert reply["config"]["version"] == 1 and isinstance(reply["applied_iteration"], int)
            applied = reply["applied_iteration"]
            # The retained config was republished before the reply.
            cfg = json.loads(await retained(broker, "batchdeck/e1/config"))
            assert cfg["version"] == 1 and cfg["config"]["chunk_size"] == 64

            # r1 may have finished before the change on a fast machine: r2 runs after it in any case.
            reply = await probe.command({"op": "submit", "request": {"id": "r2", "prompt_token_ids": [4, 5],
                                                                     "max_tokens": 2, "ignore_eos": True}})
            assert reply["ok"] is True, reply
            done = await probe.wait_for(lambda: [r for r in probe.json_on("telemetry/request")
                                                 if r["request_id"] == "r1"], what="r1's RequestRecord")
            assert done[0]["output_tokens"] == 40 and done[0]["finish_reason"] == "length"
            result = await probe.wait_for(lambda: [r for r in probe.json_on("results") if r["id"] == "r1"],
                                          what="r1's result line")
            assert len(result) == 1 and len(result[0]["output_token_ids"]) == 40

            # Iteration records travel on their own (batched) pump: wait for those after the change.
            await probe.wait_for(lambda: [r for r in probe.iteration_records() if r["iteration"] >= applied],
                                 what="iteration records after the change")
            bodies = probe.json_on("telemetry/iteration")
            assert bodies and all(isinstance(b, (dict, list)) for b in bodies)
            records = probe.iteration_records()
            assert [r["iteration"] for r in records] == sorted(r["iteration"] for r in records)
            later = [r for r in records if r["iteration"] >= applied]
            assert later and all(r["config_version"] == 1 for r in later)
            assert all(r["config_version"] == 0 for r in records if r["iteration"] < applied)
            assert {"kv_cache_usage", "num_prefill_tokens", "step_time"} <= set(records[0])

            for op, paused in (("pause", True), ("resume", False)):
                reply = await probe.command({"op": op})
                assert reply["ok"] is True and reply["paused"] is paused, reply
                await probe.wait_for(lambda: any(e["kind"] == op for e in probe.json_on("events")), what=f"{op} event")
                cfg = await probe.wait_for(lambda: [c for c in probe.json_on("config") if c["paused"] is paused],
                                           what=f"config with paused={paused}")
            reply = await probe.command({"op": "get"})
            assert reply["ok"] and reply["version"] == 1 and reply["bounds"]["max_num_seqs"] == [1, 256]
            changes = [e for e in probe.json_on("events") if e["kind"] == "config_change"]
            assert changes[0]["source"] == "mqtt" and changes[0]["applied_iteration"] == applied
            await probe.wait_for(lambda: probe.json_on("telemetry/requests"), what="request-table snapshots")
            assert probe.json_on("telemetry/gpu") == []  # no monitor in this stack

            bus.publish("gpu", {"available": False, "reason": "test"})
            await probe.wait_for(lambda: probe.json_on("telemetry/gpu"), what="a gpu sample")
        finally:
            await bridge.close()
            await eng.stop()
        await probe.wait_for(lambda: probe.on("status")[-1:] == [b"offline"], what="offline")
    assert await retained(broker, "batchdeck/e1/status") == b"offline"
    assert bridge.stats()["dropped"] == 0


BAD_COMMANDS = [
    (b"not json {", None, "not JSON"),
    (b"\xff\xfe\x00", None, "UTF-8"),
    (b"[1, 2]", None, "JSON object"),
    (b"", None, "empty"),
    ({"op": "get"}, None, "missing \"id\""),
    ({"id": ["x"], "op": "get"}, None, "\"id\" must be a string"),
    ({"id": "a", "op": "explode"}, "a", "unknown op"),
    ({"id": "b", "op": "set", "params": {"max_num_seqs": 0}}, "b", "max_num_seqs=0"),
    ({"id": "c", "op": "set", "params": {"max_num_seqs": "8"}}, "c", "max_num_seqs"),
    ({"id": "d", "op": "set", "params": {"bogus": 1}}, "d", "unknown key \"bogus\""),
    ({"id": "e", "op": "get", "extra": 1}, "e", "unknown key \"extra\""),
    ({"id": "f", "op": "set"}, "f", "needs 'params'"),
    ({"id": "g", "op": "abort", "request_id": "nope"}, "g", "not in flight"),
    ({"id": "h", "op": "submit", "request": {"prompt_token_ids": "x"}}, "h", "prompt_token_ids"),
    ({"id": "i", "op": "set", "params": {"policy": "lottery"}}, "i", "policy"),
    (b'{"id": "j", "op": "set", "params": {"max_num_seqs": 1e400}}', "j", "finite"),
]


async def test_every_bad_command_is_refused_and_changes_nothing(model_dirs, broker):
    async with MqttProbe(broker, "e2") as probe, MqttProbe(broker, "e2ro") as ro_probe:
        bus, eng, bridge = await start_stack(model_dirs, broker, "e2")
        _, _, ro_bridge = await start_stack(model_dirs, broker, "e2ro", read_only=True, bus=bus, engine=eng)
        try:
            for n, (payload, want_id, fragment) in enumerate(BAD_COMMANDS, start=1):
                await probe.send(payload if isinstance(payload, bytes) else json.dumps(payload))
                await probe.wait_for(lambda: len(probe.json_on("control/reply")) >= n, what=f"reply {n}")
                reply = probe.json_on("control/reply")[n - 1]
                assert reply["ok"] is False and reply["id"] == want_id, (payload, reply)
                assert fragment in reply["error"], (payload, reply)
            for op, extra in (("set", {"params": {"max_num_seqs": 2}}), ("pause", {}), ("resume", {}),
                              ("abort", {"request_id": "x"}), ("submit", {"request": {"prompt": "hi"}})):
                reply = await ro_probe.command({"op": op, **extra})
                assert reply["ok"] is False and "read-only" in reply["error"], reply
            reply = await ro_probe.command({"op": "get"})
            assert reply["ok"] is True and reply["version"] == 0
            assert eng.engine.live.version == 0 and eng.engine.target_config.max_num_seqs == 4
            assert not eng.paused and eng.engine.num_requests_added == 0
            assert json.loads(await retained(broker, "batchdeck/e2/config"))["version"] == 0
        finally:
            await ro_bridge.close()
            await bridge.close()
            await eng.stop()


async def test_broker_restart_mid_run_is_survived(model_dirs, broker):
    bus, eng, bridge = await start_stack(model_dirs, broker, "e3")
    streams = []
    stop_load = asyncio.Event()

    async def load():  # a closed loop of 2 clients until told to stop
        async def client(c):
            n = 0
            while not stop_load.is_set():
                s = await eng.add_request(f"c{c}-{n}", [1 + c, 2, 3, 4], SamplingParams(max_tokens=24, ignore_eos=True))
                streams.append(s)
                await s.collect()
                n += 1
        await asyncio.gather(client(0), client(1))

    load_task = asyncio.create_task(load())
    try:
        async with MqttProbe(broker, "e3") as probe:
            await probe.wait_for(lambda: probe.iteration_records(), what="iteration telemetry")
        broker.stop()
        await eventually(lambda: not bridge.connected, what="the bridge to see the broker gone")
        before = eng.engine.iteration
        await eventually(lambda: eng.engine.iteration > before + 5,
                         what="the engine serving while the broker is away")
        reply_before = eng.engine.live.version
        broker.start()
        async with MqttProbe(broker, "e3") as probe:
            await bridge.wait_connected(60)
            # Retained status and config are republished on reconnect (the broker lost them).
            await probe.wait_for(lambda: probe.on("status") == [b"online"], what="status online again")
            await probe.wait_for(lambda: probe.json_on("config"), what="config again")
            assert probe.json_on("config")[-1]["version"] == reply_before
            await probe.wait_for(lambda: [r for r in probe.iteration_records() if r["iteration"] > before],
                                 what="iteration telemetry resuming")
            reply = await probe.command({"op": "set", "params": {"max_num_seqs": 2}})
            assert reply["ok"], reply
        assert bridge.connects == 2
    finally:
        stop_load.set()
        await asyncio.wait_for(load_task, 30)
        await bridge.close()
        await eng.stop()
    assert streams and all(s.finished and s.finish_reason == "length" for s in streams)
    assert all(len(s.token_ids) == 24 for s in streams), "no request lost or cut short"
    assert bridge.stats()["dropped"] >= 0


async def test_stalled_broker_never_blocks_the_engine(model_dirs, broker):
    """A broker that stops reading (SIGSTOP): the engine keeps its pace, the bridge's buffers drop
    and count, and once the broker continues telemetry flows again on the same connection."""
    import signal

    bus, eng, bridge = await start_stack(model_dirs, broker, "e4", iteration_buffer=64)
    try:
        async with MqttProbe(broker, "e4") as probe:
            streams = [await eng.add_request(f"s{i}", [1, 2, 3], SamplingParams(max_tokens=300, ignore_eos=True))
                       for i in range(2)]
            await probe.wait_for(lambda: probe.iteration_records(), what="iteration telemetry")
            broker.proc.send_signal(signal.SIGSTOP)
            try:
                before = eng.engine.iteration
                await eventually(lambda: eng.engine.iteration > before + 5,
                                 what="iterations while the broker is stalled")
            finally:
                broker.proc.send_signal(signal.SIGCONT)
            await asyncio.gather(*(s.collect() for s in streams))
            last = eng.engine.iteration - 1
            await probe.wait_for(lambda: any(r["iteration"] == last for r in probe.iteration_records()),
                                 what="the last iteration's record after the stall")
            reply = await probe.command({"op": "get"})
            assert reply["ok"]
        assert all(len(s.token_ids) == 300 for s in streams)
        assert bridge.connects == 1  # the same connection survived the stall
    finally:
        await bridge.close()
        await eng.stop()


def test_parse_broker():
    assert parse_broker("localhost") == ("localhost", 1883)
    assert parse_broker("10.0.0.1:1884") == ("10.0.0.1", 1884)
    assert parse_broker("[::1]:1885") == ("::1", 1885)
    for bad in ("", ":1883", "host:0", "host:x"):
        with pytest.raises(ValueError):
            parse_broker(bad)


async def test_two_engines_on_one_engine_id_say_so_and_the_survivor_stays_online(model_dirs, broker):
    """Both run every command on the shared control topic: each warns, naming the other. When one leaves,
    its retained "offline" would say the id is gone while the other serves: the other answers "online"."""
    warned = {"a": [], "b": []}
    bus, eng, a = await start_stack(model_dirs, broker, "twin", warn=warned["a"].append)
    b = None
    try:
        _, _, b = await start_stack(model_dirs, broker, "twin", bus=bus, engine=eng, warn=warned["b"].append)
        await eventually(lambda: warned["a"] and warned["b"], what="both engines' warnings")
        assert f"pid {b.instance['pid']}" in warned["a"][0] and "give each engine its own --engine-id" in warned["a"][0]
        assert "another engine uses engine id 'twin'" in warned["b"][0]
        assert len(warned["a"]) == len(warned["b"]) == 1  # one announcement back, no ping-pong
        await b.close()
        b = None
        async def online() -> bool:  # b's "offline", then a's answer
            return await retained(broker, "batchdeck/twin/status") == b"online"

        await eventually(online, what="the survivor's online status")
    finally:
        if b is not None:
            await b.close()
        await a.close()
        await eng.stop()
    assert await retained(broker, "batchdeck/twin/status") == b"offline"  # the last one out says so
