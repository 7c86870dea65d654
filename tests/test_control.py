"""The control-command handler: envelope parsing (pure), ops against a real AsyncEngine, and fuzzing."""
import asyncio
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchdeck.engine.service.async_engine import AsyncEngine
from batchdeck.engine.config import LIVE_KEYS
from batchdeck.engine.service.control import ControlHandler
from batchdeck.engine.service.protocol import OPS, Command, Invalid, parse_control, reply_json
from batchdeck.engine.request_spec import KNOWN_KEYS
from batchdeck.engine.telemetry import ListSink
from tests.helpers import make_engine
from tests.mqtt_broker import one_torch_thread  # noqa: F401 - a fixture

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_parse_valid_commands():
    assert parse_control(b'{"id": "1", "op": "get"}') == Command("1", "get")
    assert parse_control('{"id": 7, "op": "set", "params": {"max_num_seqs": 3}}') == \
        Command(7, "set", params={"max_num_seqs": 3})
    assert parse_control(b'{"id": "a", "op": "abort", "request_id": "r1"}').request_id == "r1"
    assert parse_control(b'{"id": "a", "op": "submit", "request": {"prompt": "x"}}').request == {"prompt": "x"}


@pytest.mark.parametrize("payload, want_id, fragment", [
    (b"{", None, "not JSON"),
    (b"\x80", None, "not UTF-8"),
    (None, None, "empty"),
    (b"  ", None, "empty"),
    (b"42", None, "JSON object"),
    (b'"get"', None, "JSON object"),
    (b'{"op": "get"}', None, 'missing "id"'),
    (b'{"id": true, "op": "get"}', None, '"id" must be a string'),
    (b'{"id": "", "op": "get"}', None, '"id" must be a string of 1'),
    (b'{"id": "x"}', "x", 'missing "op"'),
    (b'{"id": "x", "op": 3}', "x", "unknown op 3"),
    (b'{"id": "x", "op": "reboot"}', "x", 'unknown op "reboot": one of set, get, pause, resume, abort, submit'),
    (b'{"id": "x", "op": "get", "params": {}}', "x", 'unknown key "params" for op \'get\''),
    (b'{"id": "x", "op": "set", "params": []}', "x", '"params" must be a non-empty object'),
    (b'{"id": "x", "op": "set", "params": {}}', "x", "an empty object"),
    (b'{"id": "x", "op": "set", "params": {"max_seqs": 3}}', "x", 'unknown key "max_seqs" in params'),
    (b'{"id": "x", "op": "abort"}', "x", "needs 'request_id'"),
    (b'{"id": "x", "op": "abort", "request_id": ""}', "x", "non-empty string"),
    (b'{"id": "x", "op": "abort", "request_id": "%s"}' % (b"r" * 100_000), "x",
     '"request_id" has 100000 characters; request ids have at most 256'),
    (b'{"id": "x", "op": "submit", "request": "hello"}', "x", '"request" must be an object'),
    (b'{"id": "x", "op": "set", "params": {"chunk_size": NaN}}', None, "not valid JSON"),
    (b'{"id": "x", "op": "set", "params": {"chunk_size": 1e999}}', "x", "finite"),
    (b"[" * 100_000, None, "JSON"),
    (b"x" * 300_000, None, "at most"),
])
def test_parse_refusals_say_what_is_wrong(payload, want_id, fragment):
    result = parse_control(payload)
    assert isinstance(result, Invalid)
    reply = result.reply()
    assert reply == {"id": want_id, "ok": False, "error": reply["error"]}
    assert fragment in reply["error"]
    json.loads(reply_json(reply))


def test_read_only_refuses_every_changing_op():
    for op, extra in (("set", ', "params": {"max_num_seqs": 2}'), ("pause", ""), ("resume", ""),
                      ("abort", ', "request_id": "r"'), ("submit", ', "request": {"prompt": "x"}')):
        result = parse_control(f'{{"id": "q", "op": "{op}"{extra}}}'.encode(), read_only=True)
        assert isinstance(result, Invalid) and result.id == "q" and "read-only" in result.error
    assert parse_control(b'{"id": "q", "op": "get"}', read_only=True) == Command("q", "get")


# -- payload strategies ---------------------------------------------------------------------------
json_leaf = (st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70)
             | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
json_value = st.recursive(json_leaf, lambda kids: st.lists(kids, max_size=4)
                          | st.dictionaries(st.text(max_size=8), kids, max_size=4), max_leaves=12)
live_params = st.dictionaries(st.sampled_from(LIVE_KEYS + ("bogus", "version")), json_value, max_size=3)
request_obj = st.dictionaries(st.sampled_from(sorted(KNOWN_KEYS) + ["stream"]), json_value, max_size=5)
command = st.fixed_dictionaries(
    {"op": st.sampled_from(OPS + ("", "SET", "shutdown")) | json_value},
    optional={"id": st.text(max_size=8) | json_value, "params": live_params | json_value,
              "request_id": st.text(max_size=6) | json_value, "request": request_obj | json_value,
              "extra": json_value},
)

# Near-valid commands, so that the fuzz also reaches the engine: accepted sets, submits, aborts.
ids = st.text(min_size=1, max_size=8)
plausible = (st.integers(-2, 600) | st.floats(-1.0, 700.0) | json_leaf
             | st.sampled_from(["fcfs", "sjf", "continuous", "static", "stall-free", "selective", "recompute", "x"]))
near_request = st.fixed_dictionaries(
    {},
    optional={"id": ids, "prompt": st.text(max_size=12), "prompt_token_ids": st.lists(st.integers(-1, 600), max_size=8),
              "max_tokens": st.integers(-1, 12), "ignore_eos": st.booleans(),
              "temperature": st.floats(0.0, 2.0) | json_leaf,
              "top_p": st.floats(0.0, 1.0) | json_leaf, "top_k": st.integers(-1, 50) | json_leaf,
              "seed": st.integers(-1, 2**65),
              "tenant": st.text(max_size=4), "priority": st.integers(-3, 3) | json_leaf,
              "slo_class": st.sampled_from(["interactive", "batch", "realtime", "gold"]),
              "arrival_time": st.floats(-1.0, 4000.0), "stop_token_ids": st.lists(st.integers(0, 600), max_size=2)},
)
near_valid = st.one_of(
    st.fixed_dictionaries({"id": ids, "op": st.just("set"),
                           "params": st.dictionaries(st.sampled_from(LIVE_KEYS + ("bogus",)), plausible,
                                                     min_size=1, max_size=3)}),
    st.fixed_dictionaries({"id": ids, "op": st.just("submit"), "request": near_request}),
    st.fixed_dictionaries({"id": ids, "op": st.sampled_from(["get", "pause", "resume"])}),
    st.fixed_dictionaries({"id": ids, "op": st.just("abort"), "request_id": ids}),
)


def _dump(obj):
    return json.dumps(obj).encode()  # NaN/Infinity come out as bare words: refused as not JSON


payloads = st.one_of(
    st.binary(max_size=64),
    st.text(max_size=64).map(str.encode),
    json_value.map(_dump),
    command.map(_dump),
    command.map(_dump),
    near_valid.map(_dump),
    near_valid.map(_dump),
)


@settings(max_examples=400, deadline=None, database=None)
@given(payloads)
def test_parse_is_total(payload):
    for read_only in (False, True):
        result = parse_control(payload, read_only=read_only)
        assert isinstance(result, (Command, Invalid))
        if isinstance(result, Invalid):
            assert result.error and isinstance(result.error, str)
            json.loads(reply_json(result.reply()))
        else:
            assert result.op in OPS and not (read_only and result.op != "get")


def _check_reply(reply, payload):
    assert isinstance(reply, dict) and isinstance(reply.get("ok"), bool), (payload, reply)
    assert "id" in reply
    if not reply["ok"]:
        assert isinstance(reply.get("error"), str) and reply["error"], (payload, reply)
    else:
        assert isinstance(reply.get("config"), dict)
    json.loads(reply_json(reply))


def test_fuzz_handler_against_a_real_engine(model_dirs):
    """1,000 arbitrary payloads at the handler on a live engine, then 200 more in read-only mode:
    every one answered, the engine never fails, and the config changes only with an accepted `set`."""
    loop = asyncio.new_event_loop()
    sink = ListSink()
    engine = AsyncEngine(make_engine(model_dirs["llama"], sink=sink, num_blocks=64, max_num_seqs=4))
    engine.engine.check_invariants = False  # speed: this test is about the handler, not block accounting
    loop.run_until_complete(engine.start())
    handler = ControlHandler(engine)
    ro_handler = ControlHandler(engine, read_only=True)
    seen = {"answered": 0, "ok": 0, "sets": 0}

    def state():
        llm = engine.engine
        return llm.config_snapshot()["config"], engine.paused, llm.num_requests_added

    @settings(max_examples=1000, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    @given(payloads)
    def fuzz(payload):
        before_cfg, before_paused, _ = state()
        reply = loop.run_until_complete(asyncio.wait_for(handler.handle(payload), 30))
        _check_reply(reply, payload)
        seen["answered"] += 1
        after_cfg, after_paused, _ = state()
        op = json.loads(payload).get("op") if reply["ok"] else None
        seen["ok"] += reply["ok"]
        if op == "set":
            seen["sets"] += 1
            assert after_cfg["version"] == before_cfg["version"] + 1
        else:
            assert after_cfg == before_cfg, (payload, reply)
        if op not in ("pause", "resume"):
            assert after_paused == before_paused
        assert engine.error is None and engine.running

    @settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(payloads)
    def fuzz_read_only(payload):
        before = state()
        reply = loop.run_until_complete(asyncio.wait_for(ro_handler.handle(payload), 30))
        _check_reply(reply, payload)
        seen["answered"] += 1
        assert state() == before, (payload, reply)

    try:
        fuzz()
        fuzz_read_only()
        # The engine still serves after all that. The fuzzed submits may have queued long requests behind
        # a small max_num_seqs: abort them, so the last request's wait measures serving, not that backlog.
        loop.run_until_complete(engine.resume())
        for rid in [rid for rid, r in list(engine.engine.requests.items()) if not r.is_finished]:
            loop.run_until_complete(engine.abort(rid))
        reply = loop.run_until_complete(handler.handle(json.dumps(
            {"id": "last", "op": "submit", "request": {"id": "last", "prompt_token_ids": [1, 2], "max_tokens": 3,
                                                        "ignore_eos": True}}).encode()))
        assert reply["ok"], reply
        loop.run_until_complete(asyncio.wait_for(_until_finished(engine, "last"), 120))
    finally:
        loop.run_until_complete(handler.close())
        loop.run_until_complete(engine.stop())
        loop.close()
    assert seen["answered"] >= 1200 and seen["ok"] > 0  # some commands were valid and ran
    assert engine.error is None
    assert not [e for e in sink.events if e.kind == "error"]


async def _until_finished(engine, rid):
    while True:
        req = engine.engine.requests.get(rid)
        if req is not None and req.is_finished:
            return
        await asyncio.sleep(0.01)


async def test_handler_ops_against_a_real_engine(model_dirs):
    sink = ListSink()
    engine = AsyncEngine(make_engine(model_dirs["llama"], sink=sink, max_num_seqs=4))
    await engine.start()
    results = []
    republished = []

    async def on_config():
        republished.append(engine.engine.target_config.version)

    handler = ControlHandler(engine, on_result=results.append, on_config=on_config)
    try:
        r = await handler.handle(b'{"id": "1", "op": "pause"}')
        assert r["ok"] and r["paused"] and engine.paused
        r = await handler.handle(b'{"id": "2", "op": "submit", "request": {"id": "a", "prompt": "hello", '
                                 b'"max_tokens": 200, "ignore_eos": true, "tenant": "t1"}}')
        assert r == {"id": "2", "ok": True, "request_id": "a", "config": r["config"]}
        r = await handler.handle(b'{"id": "3", "op": "submit", "request": {"id": "a", "prompt": "again"}}')
        assert not r["ok"] and "already in use" in r["error"]
        r = await handler.handle(b'{"id": "4", "op": "set", "params": {"policy": "fcfs", "max_num_seqs": 2}}')
        assert r["ok"] and r["config"]["version"] == 1 and r["applied_iteration"] == engine.engine.iteration
        r = await handler.handle(b'{"id": "5", "op": "resume"}')
        assert r["ok"] and not engine.paused
        r = await handler.handle(b'{"id": "6", "op": "abort", "request_id": "a"}')
        assert r["ok"] and r["request_id"] == "a"
        r = await handler.handle(b'{"id": "7", "op": "abort", "request_id": "a"}')
        assert not r["ok"] and "not in flight" in r["error"]
        due = engine.clock() + 0.3  # ahead of the clock however long the steps above took on a loaded machine
        r = await handler.handle(b'{"id": "8", "op": "submit", "request": {"id": "b", "prompt_token_ids": [1, 2], '
                                 b'"max_tokens": 4, "ignore_eos": true, "arrival_time": %.6f}}' % due)
        assert r["ok"] and r.get("scheduled") is True
        r = await handler.handle(b'{"id": "9", "op": "submit", "request": {"prompt": "x", "arrival_time": 99999}}')
        assert not r["ok"] and "ahead" in r["error"]
        r = await handler.handle(b'{"id": "10", "op": "submit", "request": {"prompt": "x", "seed": 1e30, '
                                 b'"temperature": 1.0}}')
        assert not r["ok"] and "seed" in r["error"]
        await asyncio.wait_for(_until_finished(engine, "b"), 120)
        for _ in range(12000):
            if len(results) == 2:
                break
            await asyncio.sleep(0.01)
        assert [x["id"] for x in results] == ["a", "b"]
        assert results[0]["finish_reason"] == "abort" and len(results[1]["output_token_ids"]) == 4
        assert republished == [0, 1, 1, 1]  # after pause, set, resume, abort
        handler.stop_admitting()
        r = await handler.handle(b'{"id": "11", "op": "submit", "request": {"prompt": "x"}}')
        assert not r["ok"] and "shutting down" in r["error"]
        kinds = [e.kind for e in sink.events]
        assert "config_change" in kinds and kinds.count("pause") == 1 and kinds.count("resume") == 1
        assert engine.error is None
    finally:
        await handler.close()
        await engine.stop()


async def test_a_scheduled_submit_can_be_aborted_keeps_its_id_and_is_listed_until_due(model_dirs):
    """Accepted with a future arrival_time: its id is taken (a second submit is refused, not silently
    dropped at arrival), an abort before it is due cancels it, and shutdown can list what never ran."""
    engine = AsyncEngine(make_engine(model_dirs["llama"], max_num_seqs=4))
    await engine.start()
    handler = ControlHandler(engine)
    try:
        later = engine.clock() + 30
        for rid in ("s1", "s2"):
            r = await handler.handle(json.dumps({"id": rid, "op": "submit", "request": {
                "id": rid, "prompt_token_ids": [1, 2], "max_tokens": 2, "arrival_time": later}}).encode())
            assert r["ok"] and r["scheduled"], r
        r = await handler.handle(json.dumps({"id": "dup", "op": "submit", "request": {
            "id": "s1", "prompt_token_ids": [3], "max_tokens": 2, "arrival_time": later}}).encode())
        assert not r["ok"] and "'s1' is already in use (scheduled, not yet due)" in r["error"], r
        assert sorted(handler.scheduled_ids()) == ["s1", "s2"]
        vocab = engine.engine.loaded.config.vocab_size
        r = await handler.handle(json.dumps({"id": "bad", "op": "submit", "request": {
            "id": "s3", "prompt_token_ids": [1, vocab], "max_tokens": 2, "arrival_time": later}}).encode())
        assert not r["ok"] and f"prompt_token_ids[1] = {vocab} is outside" in r["error"], r  # refused now, as
        assert "s3" not in handler.scheduled_ids()  # an immediate submit is, not when it falls due
        r = await handler.handle(json.dumps({"id": "t", "op": "submit", "request": {
            "id": "s4", "prompt_token_ids": [1] * engine.engine.max_model_len, "max_tokens": 2,
            "arrival_time": later}}).encode())
        assert not r["ok"] and "the model's context is" in r["error"] and "s4" not in handler.scheduled_ids(), r
        r = await handler.handle(json.dumps({"id": "now", "op": "submit", "request": {
            "id": "live", "prompt_token_ids": [1], "max_tokens": 2000}}).encode())
        assert r["ok"] and not r.get("scheduled"), r
        r = await handler.handle(json.dumps({"id": "dup2", "op": "submit", "request": {
            "id": "live", "prompt_token_ids": [1], "max_tokens": 2, "arrival_time": later}}).encode())
        assert not r["ok"] and "'live' is" in r["error"] and "live" not in handler.scheduled_ids(), r
        r = await handler.handle(b'{"id": "x", "op": "abort", "request_id": "s1"}')
        assert r["ok"] and r["aborted"] and r["scheduled"], r
        assert handler.scheduled_ids() == ["s2"] and "s1" not in engine.engine.requests
    finally:
        await handler.close()
        await engine.stop()
