"""Soak: requests submitted over MQTT into a small KV pool (preemptions), a random live change every
50 iterations, and a broker restart in the middle. Nothing lost, nothing duplicated, token counts
exact, KV blocks conserved at every iteration. Bounded: a few hundred requests, about 15-20 s on an idle
2-core machine; the deadline is generous (a loaded CI machine can be several times slower) and a timeout
says which stage it reached and which replies are missing."""
import asyncio
import gc
import random

import pytest

from batchdeck.engine.service.async_engine import AsyncEngine
from batchdeck.engine.service.bus import Bus
from batchdeck.engine.service.mqtt_bridge import MqttBridge, MqttSettings
from batchdeck.engine.service.protocol import CONTROL_REPLY, TELEMETRY_TOPICS
from batchdeck.engine.telemetry import ListSink
from tests.helpers import make_engine
from tests.mqtt_broker import ThreadProbe, broker, eventually, one_torch_thread, restart_broker  # noqa: F401

pytestmark = [pytest.mark.mqtt, pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

REQUESTS = 240
CHANGE_EVERY = 50
NUM_BLOCKS = 16  # 256 tokens for up to 8 requests of up to 80 each: preemptions
DEADLINE_S = 240.0  # for the whole run: only a broken (or starved) run comes near it
LIVE_CHANGES = [
    lambda r: {"max_num_seqs": r.randint(1, 8)},
    lambda r: {"chunk_size": r.choice([8, 16, 32, 64, 128])},
    lambda r: {"policy": r.choice(["fcfs", "sjf", "priority", "fair", "slo"])},
    lambda r: {"preemption": r.choice(["recompute", "drain"])},
    lambda r: {"mixing": r.choice(["stall-free", "prefill-first", "selective"])},
    lambda r: {"max_num_seqs": r.randint(2, 8), "chunk_size": r.choice([16, 64]), "policy": "fcfs"},
]


async def test_soak_over_mqtt_with_live_changes_and_a_broker_restart(model_dirs, broker):
    rng = random.Random(15)
    bus = Bus()
    sink = ListSink()
    bus.add_listener(sink)  # in the engine thread: every iteration's record, none dropped
    llm = make_engine(model_dirs["llama"], sink=bus, num_blocks=NUM_BLOCKS, max_num_seqs=6, max_batched_tokens=128,
                      chunk_size=32)
    assert llm.check_invariants  # BlockManager.check() after every step: no block lost or held twice
    eng = AsyncEngine(llm, snapshot_interval=0.1)
    await eng.start()
    bridge = MqttBridge(eng, bus, "soak", MqttSettings(broker.host, broker.port), log=None,
                        reconnect_min=0.05, reconnect_max=0.3, record_buffer=REQUESTS * 8)
    await bridge.start()
    await bridge.wait_connected(60)
    probe = ThreadProbe(broker, "soak", topics=(CONTROL_REPLY, TELEMETRY_TOPICS["result"], TELEMETRY_TOPICS["event"])).connect()
    probe_up = True
    specs = {f"q{i}": ([rng.randrange(256) for _ in range(rng.randint(1, 60))], rng.randint(1, 20))
             for i in range(REQUESTS)}
    sets_over_mqtt: list[str] = []
    changes_in_process = 0
    done = asyncio.Event()

    async def live_changes():
        nonlocal changes_in_process
        next_at = CHANGE_EVERY
        while not done.is_set():
            await eventually(lambda: done.is_set() or llm.iteration >= next_at, what=f"iteration {next_at}")
            if done.is_set():
                return
            change = rng.choice(LIVE_CHANGES)(rng)
            if probe_up:
                sets_over_mqtt.append(f"set-{next_at}")
                probe.send({"id": sets_over_mqtt[-1], "op": "set", "params": change})
            else:
                await eng.update_config(change, source="soak")
                changes_in_process += 1
            next_at += CHANGE_EVERY

    async def submit(ids):
        for n, rid in enumerate(ids):
            prompt, max_tokens = specs[rid]
            probe.send({"id": f"submit-{rid}", "op": "submit", "request": {
                "id": rid, "prompt_token_ids": prompt, "max_tokens": max_tokens, "ignore_eos": True,
                "priority": rng.randint(0, 3), "tenant": rng.choice("abc")}})
            if n % 20 == 19:  # paced: keep a queue without flooding it
                await eventually(lambda: llm.num_requests_added >= bridge.commands_received - 20, what="intake")

    changer = asyncio.create_task(live_changes())
    stage = "start"

    def progress() -> str:
        expected = {f"submit-{rid}" for rid in specs} | set(sets_over_mqtt)
        missing = sorted(expected - {r["id"] for r in probe.replies()})
        return (f"stage {stage!r}: iteration {llm.iteration}, {llm.num_requests_added} requests added, "
                f"{len(probe.replies())} replies, missing {len(missing)}: {missing[:10]}")

    try:
        async with asyncio.timeout(DEADLINE_S):
            ids = list(specs)
            stage = "first half submitted"
            await submit(ids[: REQUESTS // 2])
            await eventually(lambda: llm.num_requests_added == REQUESTS // 2 and llm.iteration > CHANGE_EVERY,
                             what="the first half running")
            probe_up = False  # no reply in flight across the restart: each is answered exactly once
            await eventually(lambda: len(probe.replies()) == REQUESTS // 2 + len(sets_over_mqtt),
                             what="the first half's replies")
            iterations_before = llm.iteration
            stage = "broker restart"
            await restart_broker(broker, probe, bridge, while_down=lambda: eventually(
                lambda: llm.iteration > iterations_before + CHANGE_EVERY or not llm.has_unfinished,
                what="serving while the broker is away"))
            probe_up = True
            await bridge.wait_connected(60)
            stage = "second half submitted"
            await submit(ids[REQUESTS // 2:])
            await eventually(lambda: not llm.has_unfinished and llm.num_requests_added == REQUESTS,
                             what="every request finished")
            await eventually(lambda: {r["id"] for r in probe.json_on("results")} >= set(specs),
                             what="every result over MQTT")
            stage = "waiting for the last replies"
            await eventually(lambda: len(probe.replies()) == REQUESTS + len(sets_over_mqtt), what="every reply")
    except TimeoutError:
        raise AssertionError(f"soak did not finish within {DEADLINE_S} s; {progress()}") from None
    finally:
        done.set()
        await asyncio.gather(changer, return_exceptions=True)
        probe.close()
        await bridge.close()
        await eng.stop()
        gc.collect()  # finalizers of this test's clients run now, not inside a later import's compile

    assert eng.error is None, f"the engine failed (an invariant check?): {eng.error!r}"
    # Every command answered exactly once; every request finished exactly once, with exact counts.
    reply_ids = [r["id"] for r in probe.replies()]
    assert sorted(reply_ids) == sorted([f"submit-{rid}" for rid in specs] + sets_over_mqtt)
    assert all(r["ok"] for r in probe.replies()), [r for r in probe.replies() if not r["ok"]][:3]
    # Results (QoS 1) survive the restart: one taken from the bus but unpublished goes out after it.
    # Across a broker crash QoS 1 is at-least-once, so a repeat would be an identical copy.
    results = probe.json_on("results")
    assert {r["id"] for r in results} == set(specs), "a result for every request"
    by_id = {}
    for r in results:
        assert by_id.setdefault(r["id"], r) == r, f"two different results for {r['id']}"
    for r in by_id.values():
        prompt, max_tokens = specs[r["id"]]
        assert r["prompt_token_ids"] == prompt and len(r["output_token_ids"]) == max_tokens, r["id"]
    records = sink.requests
    assert sorted(r.request_id for r in records) == sorted(specs), "each RequestRecord exactly once"
    for rec in records:
        assert (rec.prompt_tokens, rec.output_tokens, rec.finish_reason) == (len(specs[rec.request_id][0]),
                                                                             specs[rec.request_id][1], "length")
    # KV: at every iteration within the pool; all blocks back at the end.
    iterations = [it.iteration for it in sink.iterations]
    assert iterations == list(range(iterations[0], iterations[0] + len(iterations))), "no iteration record lost"
    assert all(0 <= it.kv_blocks_used <= it.kv_blocks_total == NUM_BLOCKS for it in sink.iterations)
    assert llm.blocks.num_free == NUM_BLOCKS and not llm.blocks.tables
    changes = [e for e in sink.events if e.kind == "config_change"]
    assert len(changes) == len(sets_over_mqtt) + changes_in_process >= len(iterations) // CHANGE_EVERY - 2
    assert changes_in_process >= 1 and bridge.connects == 2
    assert any(e.kind == "preemption" for e in sink.events), "the pool is small enough to preempt"
    print(f"soak: {REQUESTS} requests, {len(iterations)} iterations, {len(changes)} live changes "
          f"({changes_in_process} while the broker was away), "
          f"{sum(e.kind == 'preemption' for e in sink.events)} preemptions, "
          f"{len(results) - len(by_id)} repeated result(s)")
