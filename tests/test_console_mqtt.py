"""The console attached over MQTT to a real engine behind the real bridge, on a real mosquitto the
test starts: steering (valid, invalid, refused by the engine), the link dropping and coming back,
and the engine going offline."""
from __future__ import annotations

import pytest

from batchdeck.console.app import ConsoleApp
from batchdeck.console.client import ConnectionState
from batchdeck.console.mqtt_client import MqttClient
from batchdeck.engine.service.async_engine import AsyncEngine
from batchdeck.engine.service.bus import Bus
from batchdeck.engine.config import EngineConfig, LiveConfig
from batchdeck.engine.llm_engine import LLMEngine
from batchdeck.engine.service.mqtt_bridge import MqttBridge, MqttSettings
from tests.mqtt_broker import DEADLINE_S, broker  # noqa: F401 - a fixture
from tests.test_console_app import busy_process_pilot  # noqa: F401 - a fixture
from tests.test_console_app import SIZE, log_texts, notes, palette, set_in_panel, spec_shown
from tests.test_console_app import wait_for as wait_in_app

pytestmark = [pytest.mark.mqtt, pytest.mark.usefixtures("busy_process_pilot")]


async def wait_for(pilot, predicate, timeout: float = DEADLINE_S, what: str = "condition"):
    """Over a broker on a loaded machine: the same wait, with the MQTT tests' generous deadline."""
    return await wait_in_app(pilot, predicate, timeout=max(timeout, DEADLINE_S), what=what)


async def start_engine(broker, engine_id: str):
    bus = Bus()
    llm = LLMEngine(EngineConfig(model="synthetic:tiny", num_blocks=256), LiveConfig(max_num_seqs=4), sink=bus)
    engine = AsyncEngine(llm, snapshot_interval=0.1)
    await engine.start()
    bridge = MqttBridge(engine, bus, engine_id, MqttSettings(broker.host, broker.port), log=None,
                        reconnect_min=0.05, reconnect_max=0.3, flush_interval=0.02)
    await bridge.start()
    await bridge.wait_connected(DEADLINE_S)
    return engine, bridge


def attached_app(broker, engine_id: str) -> tuple[ConsoleApp, MqttClient]:
    client = MqttClient(f"mqtt://{broker.host}:{broker.port}/{engine_id}", backoff=(0.05, 0.3), reply_timeout=30.0)
    return ConsoleApp(client, refresh_hz=10), client


async def test_attached_console_steers_a_headless_engine(broker):
    engine, bridge = await start_engine(broker, "e1")
    llm = engine.engine
    app, client = attached_app(broker, "e1")
    try:
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: client.state == ConnectionState.CONNECTED, what="connected")
            await wait_for(pilot, lambda: app.state.bounds and app.state.config["max_num_seqs"] == 4,
                           what="the retained config")
            assert "● connected" in str(app.query_one("#status").render())
            # burst (b): requests submitted over MQTT, telemetry flows back
            await pilot.press("b")
            await wait_for(pilot, lambda: llm.num_requests_added == app.burst_size, what="the burst")
            await wait_for(pilot, lambda: app.last_result is not None and app.last_result.op == "submit",
                           what="the burst's replies")
            assert app.last_result.ok and len(app.last_result.data) == app.burst_size
            await wait_for(pilot, lambda: app.state.latest is not None, what="iteration telemetry")
            # a valid change from the palette
            await palette(pilot, "policy sjf")
            await wait_for(pilot, lambda: llm.live.policy == "sjf", what="the engine on sjf")
            await wait_for(pilot, lambda: any("policy=sjf → it" in t and "(mqtt)" in t for t in log_texts(app)),
                           what="the change in the log")
            await wait_for(pilot, lambda: app.last_result.op == "set", what="the set's reply")
            assert app.last_result.ok and app.last_result.applied_iteration is not None
            # an invalid one: refused before anything is sent
            await palette(pilot, "chunk_size 100000")
            assert any("chunk_size=100000 is not allowed" in n for n in notes(app)) and llm.live.version == 1
            # refused by the engine itself (bypassing the console's own check)
            refused = await client.set({"max_num_seqs": 0})
            assert not refused.ok and "max_num_seqs=0 is not allowed" in refused.error
            # the config panel
            await set_in_panel(pilot, {"max_num_seqs": 2})
            await wait_for(pilot, lambda: llm.live.max_num_seqs == 2, what="the panel's change")
            # pause / resume (p)
            await pilot.press("p")
            await wait_for(pilot, lambda: engine.paused and app.state.paused, what="paused")
            await pilot.press("p")
            await wait_for(pilot, lambda: not engine.paused, what="resumed")
            # abort the selected request (x)
            long = await client.submit({"id": "long-1", "prompt_token_ids": [3] * 16, "max_tokens": 3000,
                                        "ignore_eos": True})
            assert long.ok and long.data == ["long-1"]
            table = app.query_one("#requests")
            await wait_for(pilot, lambda: "long-1" in table.rows, what="the long request in the table")
            table.move_cursor(row=table.get_row_index("long-1"))
            victim = table.selected_request_id
            assert victim == "long-1"
            await pilot.press("x", "x")  # the first names it, the second aborts it
            await wait_for(pilot, lambda: llm.requests[victim].is_finished, what="the abort")
            assert llm.requests[victim].finish_reason.value == "abort"
            await app.shutdown()
    finally:
        await bridge.close()
        await engine.stop()


async def test_attached_console_steers_speculation_and_shows_acceptance(broker):
    """spec_k over MQTT: bounds from the retained config, set from the palette, refused out of range
    (by the console, and by the engine when the console's check is bypassed), acceptance from the
    telemetry that comes back."""
    engine, bridge = await start_engine(broker, "e3")
    llm = engine.engine
    app, client = attached_app(broker, "e3")
    try:
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: client.state == ConnectionState.CONNECTED, what="connected")
            await wait_for(pilot, lambda: app.state.bounds and app.state.config, what="the retained config")
            assert app.state.bounds["spec_k"] == [0, 8] and app.state.config["spec_k"] == 0
            await palette(pilot, "spec_k 99")
            assert any("spec_k=99 is not allowed: an integer in [0, 8]" in n for n in notes(app))
            refused = await client.set({"spec_k": 99})
            assert not refused.ok and refused.error == "spec_k=99 is not allowed: an integer in [0, 8] (spec_k_limit, fixed at start)"
            assert llm.live.version == 0
            await palette(pilot, "spec_k 3")
            await wait_for(pilot, lambda: llm.live.spec_k == 3, what="the engine speculating")
            await wait_for(pilot, lambda: any("spec_k=3 → it" in t and "(mqtt)" in t for t in log_texts(app)),
                           what="the change in the log")
            await wait_for(pilot, lambda: app.last_result is not None and app.last_result.op == "set",
                           what="the set's reply")
            assert app.last_result.ok and app.state.config["spec_k"] == 3
            done = await client.submit({"id": "rep-1", "prompt_token_ids": [4, 5, 6] * 16, "max_tokens": 40,
                                        "ignore_eos": True})
            assert done.ok
            await wait_for(pilot, lambda: spec_shown(app).startswith("accepted ") and "accepted -" not in
                           spec_shown(app), what="the acceptance rate from MQTT telemetry")
            await wait_for(pilot, lambda: app.state.finished_total == 1, what="the request to finish")
            assert llm.requests["rep-1"].spec_proposed > 0
            await set_in_panel(pilot, {"spec_k": 0})
            await wait_for(pilot, lambda: llm.live.spec_k == 0, what="speculation off from the panel")
            await app.shutdown()
    finally:
        await bridge.close()
        await engine.stop()


async def test_link_drop_keeps_the_picture_and_resumes_then_engine_goes_offline(broker):
    engine, bridge = await start_engine(broker, "e2")
    app, client = attached_app(broker, "e2")
    try:
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: client.state == ConnectionState.CONNECTED, what="connected")
            await client.submit([{"id": f"r{i}", "prompt_token_ids": [1] * 8, "max_tokens": 2000, "ignore_eos": True}
                                 for i in range(2)])
            await wait_for(pilot, lambda: app.state.latest is not None and app.state.requests, what="telemetry")
            broker.stop()
            await wait_for(pilot, lambda: client.state == ConnectionState.RECONNECTING, what="reconnecting")
            app.tick()  # whatever arrived before the drop
            before = app.state.latest.iteration
            await pilot.pause(0.3)
            app.tick()
            assert "● reconnecting" in str(app.query_one("#status").render())
            assert app.query_one("#requests").row_count > 0 and app.state.latest.iteration == before  # kept
            down = await client.pause()
            assert not down.ok and "not connected" in down.error
            broker.start()
            await wait_for(pilot, lambda: client.state == ConnectionState.CONNECTED, timeout=60, what="reconnected")
            await wait_for(pilot, lambda: app.state.latest.iteration > before, what="telemetry resuming")
            assert "● connected" in str(app.query_one("#status").render())
            # the engine goes away: its retained status says offline
            await bridge.close()
            await wait_for(pilot, lambda: client.state == ConnectionState.OFFLINE, what="engine offline")
            app.tick()
            assert "● engine offline" in str(app.query_one("#status").render())
            refused = await client.set({"policy": "sjf"})
            assert not refused.ok and "offline" in refused.error
            await app.shutdown()
    finally:
        await bridge.close()
        await engine.stop()
