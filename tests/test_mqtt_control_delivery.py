"""MQTT control delivery: every acknowledged command is answered exactly once, across a broker
restart; many commands run at one iteration boundary; retained control messages are ignored."""
import asyncio
import json
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchdeck.engine.request import SamplingParams
from batchdeck.engine.service.async_engine import AsyncEngine
from batchdeck.engine.service.bus import Bus
from batchdeck.engine.service.mqtt_bridge import MqttBridge, MqttSettings
from tests.helpers import make_engine
from tests.mqtt_broker import ThreadProbe, broker, eventually, one_torch_thread, restart_broker  # noqa: F401

pytestmark = [pytest.mark.mqtt, pytest.mark.usefixtures("one_torch_thread")]


async def start_stack(model_dirs, broker, engine_id, **engine_kw):
    bus = Bus()
    engine = AsyncEngine(make_engine(model_dirs["llama"], sink=bus, **{"max_num_seqs": 4, **engine_kw}),
                         snapshot_interval=0.05)
    await engine.start()
    bridge = MqttBridge(engine, bus, engine_id, MqttSettings(broker.host, broker.port), log=None,
                        reconnect_min=0.05, reconnect_max=0.3)
    await bridge.start()
    await bridge.wait_connected(60)
    return engine, bridge


async def stop_stack(engine, bridge):
    await bridge.close()
    await engine.stop()


class EngineGate:
    """Holds the engine's worker thread at an iteration boundary until opened, so that commands
    queue up behind it (the backlog a slow iteration or a burst builds)."""

    def __init__(self, engine: AsyncEngine):
        self.engine = engine
        self._entered = threading.Event()
        self._release = threading.Event()
        self._task: asyncio.Future | None = None

    async def hold(self) -> None:
        self._task = asyncio.ensure_future(self.engine.call(lambda e: (self._entered.set(), self._release.wait(120))))
        await eventually(self._entered.is_set, what="the engine held at a boundary")

    async def open(self) -> None:
        self._release.set()
        if self._task is not None:
            await self._task


def commands_running(bridge: MqttBridge) -> int:
    return bridge.stats()["commands_running"]


async def test_acknowledged_backlog_is_answered_after_a_broker_restart(model_dirs, broker):
    """Commands acknowledged while the engine is busy are not lost when the connection drops:
    all run, and each is answered once the broker is back, in the order they were sent."""
    eng, bridge = await start_stack(model_dirs, broker, "dl1")
    probe = ThreadProbe(broker, "dl1").connect()
    gate = EngineGate(eng)
    try:
        await gate.hold()
        commands = [{"id": "s1", "op": "set", "params": {"max_num_seqs": 3}},
                    {"id": "g1", "op": "get"},
                    *({"id": f"r{i}", "op": "submit", "request": {"id": f"q{i}", "prompt_token_ids": [1, 2, 3 + i],
                                                                  "max_tokens": 4, "ignore_eos": True}}
                      for i in range(20)),
                    {"id": "p1", "op": "pause"}, {"id": "u1", "op": "resume"},
                    {"id": "bad", "op": "set", "params": {"max_num_seqs": 0}}]
        for cmd in commands:
            probe.send(cmd)
        await eventually(lambda: bridge.commands_received == len(commands), what="every command acknowledged")

        async def run_backlog_while_down():
            await gate.open()
            await eventually(lambda: commands_running(bridge) == 0, what="the backlog executed")

        await restart_broker(broker, probe, bridge, run_backlog_while_down)
        replies = await eventually(lambda: len(probe.replies()) >= len(commands) and probe.replies(),
                                   what=f"{len(commands)} replies")
        assert [r["id"] for r in replies] == [c["id"] for c in commands], "each answered once, in order"
        by_id = {r["id"]: r for r in replies}
        assert by_id["s1"]["ok"] and by_id["g1"]["config"]["max_num_seqs"] == 3, "get ran after set"
        assert all(by_id[f"r{i}"]["ok"] for i in range(20))
        assert by_id["bad"]["ok"] is False and "max_num_seqs=0" in by_id["bad"]["error"]
        await eventually(lambda: eng.engine.num_requests_added == 20 and not eng.engine.has_unfinished,
                         what="the 20 submitted requests served")
        await eventually(lambda: bridge.stats()["replies_pending"] == 0, what="the outbox empty")
        assert bridge.connects == 2
    finally:
        await gate.open()
        probe.close()
        await stop_stack(eng, bridge)


async def test_many_commands_run_at_one_iteration_boundary(model_dirs, broker):
    eng, bridge = await start_stack(model_dirs, broker, "dl2")
    probe = ThreadProbe(broker, "dl2").connect()
    gate = EngineGate(eng)
    try:
        long = await eng.add_request("long", [1, 2, 3], SamplingParams(max_tokens=400, ignore_eos=True))
        await eventually(lambda: eng.engine.iteration > 2, what="the engine stepping")
        await gate.hold()
        sizes = [2, 3, 4, 5, 6, 7, 8, 3, 2, 4]
        for n, size in enumerate(sizes):
            probe.send({"id": f"s{n}", "op": "set", "params": {"max_num_seqs": size}})
        await eventually(lambda: bridge.control.handled == len(sizes), what="every set started")
        await gate.open()
        replies = await eventually(lambda: len(probe.replies()) == len(sizes) and probe.replies(), what="replies")
        assert [r["id"] for r in replies] == [f"s{n}" for n in range(len(sizes))]
        assert all(r["ok"] for r in replies), replies
        assert len({r["applied_iteration"] for r in replies}) == 1, "all applied at one boundary"
        assert [r["version"] for r in replies] == list(range(1, len(sizes) + 1))
        assert eng.engine.live.max_num_seqs == sizes[-1]
        assert await eng.abort("long")
        await asyncio.wait_for(long.collect(), 60)
        assert long.finish_reason == "abort"
    finally:
        await gate.open()
        probe.close()
        await stop_stack(eng, bridge)


async def test_retained_control_messages_are_ignored(model_dirs, broker):
    """A retained command is replayed by the broker on every subscribe: it must not run (a retained
    `pause` would pause every start; a retained `submit` without an id would add a request each time)."""
    stale = {"id": "stale", "op": "submit", "request": {"prompt_token_ids": [1, 2], "max_tokens": 2}}
    publisher = ThreadProbe(broker, "dl3").connect()
    publisher.send(stale, retain=True)
    eng, bridge = await start_stack(model_dirs, broker, "dl3")
    try:
        await eventually(lambda: bridge.retained_ignored == 1, what="the retained command seen on connect")
        publisher.send({"id": "now", "op": "get"})
        await eventually(lambda: [r for r in publisher.replies() if r["id"] == "now"], what="the reply to get")
        # The broker forgets retained messages on restart: retain it again before the bridge reconnects.
        await restart_broker(broker, publisher, bridge, after_start=lambda: publisher.send(stale, retain=True))
        await eventually(lambda: bridge.connected and bridge.retained_ignored == 2, what="the replay on reconnect")
        publisher.send({"id": "again", "op": "get"})
        await eventually(lambda: [r for r in publisher.replies() if r["id"] == "again"], what="the reply after reconnect")
        assert [r["id"] for r in publisher.replies()] == ["now", "again"], "no reply to the retained command"
        assert eng.engine.num_requests_added == 0 and bridge.commands_received == 2
    finally:
        publisher.send(b"", retain=True)  # clears the retained message
        publisher.close()
        await stop_stack(eng, bridge)


# -- fuzz: random command bursts with a broker restart in the middle --------------------------

COMMANDS = st.one_of(
    st.just({"op": "get"}),
    st.builds(lambda n: {"op": "set", "params": {"max_num_seqs": n}}, st.integers(0, 9)),  # 0 is refused
    st.builds(lambda n: {"op": "set", "params": {"chunk_size": n}}, st.integers(-2, 600)),
    st.sampled_from([{"op": "pause"}, {"op": "resume"}, {"op": "abort", "request_id": "nobody"},
                     {"op": "explode"}, {"op": "set", "params": {"bogus": 1}}, {"op": "get", "extra": True},
                     {"op": "submit", "request": {"prompt": 5}},
                     {"op": "submit", "request": {"prompt_token_ids": [1], "max_tokens": 10**400}}]),
    st.builds(lambda ids, n: {"op": "submit", "request": {"prompt_token_ids": ids, "max_tokens": n, "ignore_eos": True}},
              st.lists(st.integers(0, 299), min_size=1, max_size=8), st.integers(1, 4)),
    st.sampled_from([b"not json {", b"\xff\xfe", b"[1, 2]", b"", b'{"op": "get"}']),  # no usable id: id null
)


@settings(max_examples=8, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(commands=st.lists(COMMANDS, min_size=1, max_size=24), cut=st.floats(0, 1), run_while_down=st.booleans())
def test_fuzz_every_acknowledged_command_is_answered_once_across_a_broker_restart(
        model_dirs, broker, commands, cut, run_while_down):
    """A burst of random commands (valid, refused, malformed) held up behind a busy engine; the
    broker restarts after a random part of the burst; the backlog runs while the broker is down or
    after it is back. Every command the engine acknowledged gets exactly one reply, in order."""
    asyncio.run(_fuzz_once(model_dirs, broker, commands, int(cut * len(commands)), run_while_down))


_fuzz_runs = iter(range(10**6))


async def _fuzz_once(model_dirs, broker, commands, cut, run_while_down=False):
    engine_id = f"fz{next(_fuzz_runs)}"
    payloads = [c if isinstance(c, bytes) else json.dumps({"id": f"c{i}", **c}) for i, c in enumerate(commands)]
    with_id = [f"c{i}" for i, c in enumerate(commands) if not isinstance(c, bytes)]
    eng, bridge = await start_stack(model_dirs, broker, engine_id)
    probe = ThreadProbe(broker, engine_id).connect()
    gate = EngineGate(eng)
    try:
        await gate.hold()
        for payload in payloads[:cut]:
            probe.send(payload)
        await eventually(lambda: bridge.commands_received == cut, what=f"{cut} commands acknowledged")

        async def backlog():
            if run_while_down:
                await gate.open()
                await eventually(lambda: commands_running(bridge) == 0, what="the backlog run while down")

        await restart_broker(broker, probe, bridge, backlog)
        await bridge.wait_connected(60)
        for payload in payloads[cut:]:
            probe.send(payload)
        await eventually(lambda: bridge.commands_received == len(payloads), what="every command acknowledged")
        await gate.open()
        probe.send({"id": "end", "op": "get"})  # replies go out in order: after its reply, all are in
        await eventually(lambda: any(r["id"] == "end" for r in probe.replies()), what="the last reply")
        replies = probe.replies()
        assert [r["id"] for r in replies if r["id"] is not None] == with_id + ["end"], "one reply each, in order"
        assert sum(r["id"] is None for r in replies) == len(payloads) - len(with_id)
        assert all(isinstance(r["ok"], bool) and (r["ok"] or r["error"]) for r in replies)
        for r in replies:
            if not r["ok"]:
                assert "Error:" not in r["error"] and "Traceback" not in r["error"], r
        ok_submits = sum(1 for r in replies if r["ok"] and "request_id" in r)
        assert eng.engine.num_requests_added == ok_submits
        await eventually(lambda: bridge.stats()["replies_pending"] == 0, what="the outbox empty")
        assert bridge.connects == 2 and bridge.replies_published == len(payloads) + 1
    finally:
        await gate.open()
        probe.close()
        await stop_stack(eng, bridge)
