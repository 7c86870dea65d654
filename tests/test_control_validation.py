"""Hostile values in control commands are answered with the field and what is allowed, never with
a Python exception's text: numbers beyond any range (10**400, which JSON carries exactly), lone
surrogates (which JSON can carry and no encoder accepts)."""
import json

import pytest

from batchdeck.engine.config import LIVE_KEYS
from batchdeck.engine.service.async_engine import AsyncEngine
from batchdeck.engine.service.control import ControlHandler
from batchdeck.policies import describe_policies
from tests.helpers import make_engine
from tests.mqtt_broker import one_torch_thread  # noqa: F401 - a fixture

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HUGE = "1" + "0" * 400  # 10**400 as JSON text


def _payload(cid: str, body: str) -> bytes:
    return ('{"id": "%s", %s}' % (cid, body)).encode()


def _assert_named(reply: dict, field: str, any_of: tuple[str, ...], *fragments: str) -> None:
    assert reply["ok"] is False, reply
    error = reply["error"]
    assert error.startswith(field) or f"{field}=" in error, error
    assert any(f in error for f in any_of) and all(f in error for f in fragments), error
    for python in ("Error:", "OverflowError", "UnicodeEncodeError", "Traceback", "codec"):
        assert python not in error, error
    assert len(error) < 400, f"the error echoes the whole value: {error[:120]}..."


RANGE = ("]", ">=", "<=")  # a numeric refusal states the allowed range: "[1, 2147483647]", "(0, 1]", ">= 0"
SUBMIT_CASES = [
    ('"prompt": "hi", "max_tokens": %s' % HUGE, "max_tokens", RANGE),
    ('"prompt": "hi", "top_k": %s' % HUGE, "top_k", RANGE),
    ('"prompt": "hi", "seed": %s' % HUGE, "seed", RANGE),
    ('"prompt": "hi", "priority": -%s' % HUGE, "priority", RANGE),
    ('"prompt": "hi", "arrival_time": %s' % HUGE, "arrival_time", RANGE),
    ('"prompt": "hi", "temperature": %s' % HUGE, "temperature", RANGE),
    ('"prompt": "hi", "top_p": %s' % HUGE, "top_p", RANGE),
    ('"prompt": "a\\ud800b"', "prompt", ("lone surrogate",), "character 1"),
    ('"prompt": "\\udfff"', "prompt", ("lone surrogate",)),
    ('"prompt": "hi", "tenant": "t\\ud800"', "tenant", ("lone surrogate",)),
    ('"prompt": "hi", "id": "\\ud800"', "id", ("lone surrogate",)),
]


@pytest.fixture
async def handler(model_dirs):
    eng = AsyncEngine(make_engine(model_dirs["llama"]))
    await eng.start()
    try:
        yield ControlHandler(eng)
    finally:
        await eng.stop()


async def test_submit_with_hostile_values_names_the_field_and_range(handler):
    for n, (request, field, any_of, *fragments) in enumerate(SUBMIT_CASES):
        reply = await handler.handle(_payload(f"s{n}", '"op": "submit", "request": {%s}' % request))
        assert reply["id"] == f"s{n}"
        _assert_named(reply, field, any_of, *fragments)
    assert handler.engine.engine.num_requests_added == 0


async def test_set_with_huge_numbers_names_the_key(handler):
    """Every live setting and every policy parameter, given 10**400."""
    for key in LIVE_KEYS:
        if key == "policy_params":
            continue
        reply = await handler.handle(_payload(key, '"op": "set", "params": {"%s": %s}' % (key, HUGE)))
        _assert_named(reply, key, ("is not allowed",))
    for policy, info in describe_policies().items():
        for param, spec in info["params"].items():
            value = "{\"x\": %s}" % HUGE if spec["kind"] == "dict" else HUGE
            body = '"op": "set", "params": {"policy": "%s", "policy_params": {"%s": %s}}' % (policy, param, value)
            reply = await handler.handle(_payload(f"{policy}.{param}", body))
            _assert_named(reply, f"policy_params.{param}", ("is not allowed",))
    assert handler.engine.engine.live.version == 0


async def test_a_valid_submit_still_passes(handler):
    reply = await handler.handle(json.dumps({"id": "ok", "op": "submit", "request": {
        "prompt": "héllo ✓", "max_tokens": 2147483647, "priority": -5, "seed": 2**63 - 1}}).encode())
    assert reply["ok"], reply
