"""`batchdeck serve --engine-in-process` when an engine step fails: the requests open then end at once
as they do with the engine in its own process (engine/service/engine_process.py): a stream with an
`engine_failed` error event and no [DONE], a non-streaming request with a 503 and the same body; new
requests and /health answer 503 naming the failure the same way."""
from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.helpers import fail_steps
from tests.http_helpers import ServerThread, wait_for

MODEL = "synthetic:tiny"
DEADLINE_S = 60.0  # a client waiting longer than this for its ending counts as hung

# What an engine process's failure gives a client (EngineProcess._fail -> serving -> errors.engine_dead):
# the child reports "<type>: <message>" of the exception its step raised.
FAILED = {"error": {"message": "the engine failed: RuntimeError: injected step failure", "type": "server_error",
                    "param": None, "code": "engine_failed"}}


@pytest.fixture
def failing_server():
    """A server whose engine's next step raises once `fail` is set (the engine then stops stepping)."""
    s = ServerThread()
    fail = threading.Event()
    fail_steps(s.llm, fail.is_set)
    s.start()
    s.fail = fail
    yield s
    s.stop()


def _data_lines(lines) -> list[str]:
    return [line[len("data: "):] for line in lines if line.startswith("data: ")]


def _assert_refused_afterwards(s: ServerThread) -> None:
    health = httpx.get(s.url + "/health", timeout=DEADLINE_S)
    assert health.status_code == 503 and health.json() == FAILED
    refused = httpx.post(s.base_url + "/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2},
                         timeout=DEADLINE_S)
    assert refused.status_code == 503 and refused.json() == FAILED


@pytest.mark.parametrize("n", [1, 2])
def test_an_open_stream_ends_with_engine_failed(failing_server, n):
    s = failing_server
    body = {"model": MODEL, "prompt": "x", "max_tokens": 400, "n": n, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", s.base_url + "/completions", json=body, timeout=DEADLINE_S) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[len("data: "):])["choices"][0]["finish_reason"] is None
        s.fail.set()
        rest = _data_lines(lines)  # ends when the server ends the stream (or times out: a hang)
    assert rest, "the stream ended without an error event"
    assert json.loads(rest[-1]) == FAILED
    assert "[DONE]" not in rest
    assert all(c["finish_reason"] is None for chunk in rest[:-1] for c in json.loads(chunk)["choices"])
    _assert_refused_afterwards(s)


def test_an_open_chat_stream_ends_with_engine_failed(failing_server):
    s = failing_server
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 400, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", s.base_url + "/chat/completions", json=body, timeout=DEADLINE_S) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        data = (line for line in lines if line.startswith("data: "))
        next(data)  # the role chunk
        next(data)  # a first token: the request is running
        s.fail.set()
        rest = _data_lines(lines)
    assert rest and json.loads(rest[-1]) == FAILED and "[DONE]" not in rest


@pytest.mark.parametrize("n", [1, 2])
def test_an_open_non_streaming_request_gets_a_503(failing_server, n):
    s = failing_server
    body = {"model": MODEL, "prompt": "x", "max_tokens": 400, "n": n, "ignore_eos": True}
    with ThreadPoolExecutor(1) as pool:
        reply = pool.submit(httpx.post, s.base_url + "/completions", json=body, timeout=DEADLINE_S)
        wait_for(lambda: any(r.num_output_tokens > 0 for r in list(s.llm.requests.values())), DEADLINE_S,
                 what="the request generating")
        s.fail.set()
        resp = reply.result(DEADLINE_S)
    assert resp.status_code == 503 and resp.json() == FAILED
    assert "retry-after" not in resp.headers
    _assert_refused_afterwards(s)
