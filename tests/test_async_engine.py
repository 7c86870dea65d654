import asyncio

import pytest

from batchdeck.engine.service.async_engine import AsyncEngine
from batchdeck.engine.config import ConfigError
from batchdeck.engine.request import RequestError
from batchdeck.engine.telemetry import ListSink
from tests.helpers import greedy, make_engine, reference_tokens


async def test_streams_deltas_and_matches_reference(model_dirs):
    path = model_dirs["llama"]
    eng = AsyncEngine(make_engine(path, max_num_seqs=4, chunk_size=8))
    await eng.start()
    try:
        streams = [await eng.add_request(str(i), [i + 1] * (i + 2), greedy(6)) for i in range(5)]
        results = await asyncio.gather(*(s.collect() for s in streams))
        for i, toks in enumerate(results):
            assert tuple(toks) == reference_tokens(path, tuple([i + 1] * (i + 2)), 6)
        assert all(s.finish_reason == "length" for s in streams)
    finally:
        await eng.stop()


async def test_live_config_applied_between_iterations_and_bad_input_refused(model_dirs):
    sink = ListSink()
    eng = AsyncEngine(make_engine(model_dirs["qwen3"], sink=sink, max_num_seqs=2))
    await eng.start()
    try:
        stream = await eng.add_request("a", [1, 2, 3], greedy(40))
        reply = await eng.update_config({"max_num_seqs": 3, "chunk_size": 32}, source="test")
        assert reply.config["max_num_seqs"] == 3 and reply.config["version"] == 1
        with pytest.raises(ConfigError, match="max_num_seqs"):
            await eng.update_config({"max_num_seqs": 0})
        with pytest.raises(ConfigError, match="bogus"):
            await eng.update_config({"bogus": 1})
        with pytest.raises(RequestError, match="already in use"):
            await eng.add_request("a", [1], greedy(1))
        await stream.collect()
        assert eng.engine.live.max_num_seqs == 3 and eng.engine.live.version == 1
        changes = [e for e in sink.events if e.kind == "config_change"]
        assert len(changes) == 1 and changes[0].data["applied_iteration"] == reply.applied_iteration
        later = [r for r in sink.iterations if r.iteration >= reply.applied_iteration]
        assert later and all(r.config_version == 1 for r in later)
    finally:
        await eng.stop()


async def test_abort_pause_resume(model_dirs):
    sink = ListSink()
    eng = AsyncEngine(make_engine(model_dirs["qwen3"], sink=sink))
    await eng.start()
    try:
        await eng.pause()
        stream = await eng.add_request("a", [1, 2, 3], greedy(500))
        await asyncio.sleep(0.05)
        assert eng.engine.iteration == 0  # paused: nothing ran
        await eng.resume()
        async for out in stream:
            if len(stream.token_ids) >= 3:
                break
        assert await eng.abort("a")
        await stream.collect()
        assert stream.finish_reason == "abort"
        assert eng.engine.blocks.num_free == eng.engine.blocks.num_blocks
        kinds = [e.kind for e in sink.events]
        assert kinds.index("pause") < kinds.index("resume")
        assert sink.requests[-1].finish_reason == "abort"
    finally:
        await eng.stop()


def test_finished_requests_are_forgotten_beyond_the_retention(model_dirs):
    from tests.helpers import make_engine as make

    engine = make(model_dirs["qwen3"], max_num_seqs=4)
    engine.retain_finished = 3
    for i in range(6):
        engine.add_request(str(i), [1, 2, i + 3], greedy(2))
    engine.run_until_done()
    assert sorted(engine.requests) == ["3", "4", "5"]
    engine.add_request("0", [4, 5], greedy(1))  # a forgotten id may be used again
    engine.run_until_done()
    assert engine.requests["0"].is_finished


def test_max_waiting_refuses_with_the_bound_and_keeps_what_was_accepted(model_dirs):
    from batchdeck.engine.config import EngineConfig, LiveConfig
    from batchdeck.engine.llm_engine import LLMEngine
    from batchdeck.engine.request import QueueFullError
    from tests.helpers import loaded

    path = model_dirs["llama"]
    engine = LLMEngine(EngineConfig(model=path, num_blocks=64, max_waiting=3), LiveConfig(),
                       loaded=loaded(path), check_invariants=True)
    for i in range(3):
        engine.add_request(f"r{i}", [1, 2, 3], greedy(2))
    with pytest.raises(QueueFullError, match="max_waiting is 3"):
        engine.add_request("r3", [1, 2, 3], greedy(2))
    assert sorted(engine.requests) == ["r0", "r1", "r2"]
    while engine.has_unfinished:
        engine.step()
    engine.add_request("r3", [1, 2, 3], greedy(2))  # room again once the queue drained


def test_max_waiting_must_be_positive():
    from batchdeck.engine.config import EngineConfig

    with pytest.raises(ConfigError, match="max_waiting"):
        EngineConfig(max_waiting=0).validate()


async def test_serving_keeps_the_start_up_heap_out_of_the_collector_until_the_last_engine_stops(model_dirs):
    import gc

    from batchdeck.engine.service import heap_freeze

    llm = make_engine(model_dirs["llama"], max_num_seqs=2)
    assert not heap_freeze.holders(), f"{heap_freeze.holders()} engine(s) an earlier test left running"
    assert gc.get_freeze_count() == 0
    first = AsyncEngine(llm)
    second = AsyncEngine(make_engine(model_dirs["llama"], max_num_seqs=2))  # its own engine: one worker each
    await first.start()
    with pytest.raises(RuntimeError, match="already running"):
        await first.start()  # refused: the freeze stays counted once for this engine
    try:
        frozen = gc.get_freeze_count()
        assert frozen > 1000  # the model's modules and tensors, the engine, the imported modules
        assert not any(o is llm for o in gc.get_objects())  # frozen objects are not tracked by collections
        await second.start()
        assert gc.get_freeze_count() <= frozen  # one freeze for the process, not one per engine
        stream = await second.add_request("a", [1, 2, 3], greedy(3))
        assert len(await stream.collect()) == 3
    finally:
        await first.stop()
    assert gc.get_freeze_count() > frozen // 2  # the second engine still serves (frozen objects may be freed)
    await second.stop()
    assert gc.get_freeze_count() == 0
    assert any(o is llm for o in gc.get_objects())


async def test_a_failed_step_ends_every_open_stream_naming_the_failure():
    from batchdeck.engine.config import EngineConfig, LiveConfig
    from batchdeck.engine.llm_engine import LLMEngine
    from batchdeck.engine.service.served_model import EngineDeadError

    from tests.helpers import fail_steps

    llm = LLMEngine(EngineConfig(model="synthetic:tiny", device="cpu", dtype="float32", block_size=16,
                                 num_blocks=256), LiveConfig())
    # fails once all three requests have a token (each add waits for the engine thread: not a fixed iteration)
    fail_steps(llm, lambda: len(llm.requests) == 3 and all(r.num_output_tokens for r in llm.requests.values()))
    eng = AsyncEngine(llm)
    await eng.start()
    try:
        streams = [await eng.add_request(f"r{i}", [1, 2, 3 + i], greedy(400)) for i in range(3)]
        for stream in streams:
            with pytest.raises(EngineDeadError, match=r"^RuntimeError: injected step failure$") as err:
                await asyncio.wait_for(stream.collect(), 60)
            assert err.value.__cause__ is eng.error and stream.finished
            assert 0 < len(stream.token_ids) < 400  # the tokens delivered before the failure came first
        with pytest.raises(EngineDeadError, match="injected step failure"):  # never queued into a dead engine
            await eng.add_request("late", [1, 2], greedy(4))
        assert "late" not in llm.requests
        steps = llm.iteration
        with pytest.raises(EngineDeadError, match="^RuntimeError: injected step failure$") as err:
            await eng.resume()  # a failed engine is not stepped again
        assert err.value.describe() == "the engine failed: RuntimeError: injected step failure"
        await eng.call(lambda e: None)  # a worker turn later: still not stepping
        assert llm.iteration == steps and eng.paused
    finally:
        await eng.stop()
