"""`batchdeck serve` through the official openai client (sync and async) on a real loopback server."""
from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from tests.http_helpers import ServerThread, wait_for


@pytest.fixture(scope="module")
def server():
    s = ServerThread().start()
    yield s
    s.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture
def aclient(server):
    return openai.AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)


MODEL = "synthetic:tiny"


def test_models_health_version(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/version").json()["version"]


def test_completion_and_usage(client):
    r = client.completions.create(model=MODEL, prompt="hello", max_tokens=5, temperature=0)
    assert r.object == "text_completion" and r.model == MODEL and r.id.startswith("cmpl-")
    assert len(r.choices) == 1 and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == 5 and r.usage.completion_tokens == 5 and r.usage.total_tokens == 10


def test_token_id_prompts_and_lists(client):
    single = client.completions.create(model=MODEL, prompt=[104, 105], max_tokens=3, temperature=0)
    assert single.usage.prompt_tokens == 2
    # a list of token lists: one choice per prompt, in order; the same prompt greedy gives the same text
    many = client.completions.create(model=MODEL, prompt=[[104, 105], [1, 2, 3]], max_tokens=3, temperature=0)
    assert [c.index for c in many.choices] == [0, 1]
    assert many.choices[0].text == single.choices[0].text
    strings = client.completions.create(model=MODEL, prompt=["hi", "there"], max_tokens=2, temperature=0)
    assert len(strings.choices) == 2 and strings.usage.prompt_tokens == 7
    as_text = client.completions.create(model=MODEL, prompt="hi", max_tokens=3, temperature=0)
    as_ids = client.completions.create(model=MODEL, prompt=list(b"hi"), max_tokens=3, temperature=0)
    assert as_text.choices[0].text == as_ids.choices[0].text


def test_chat(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "system", "content": "be brief"},
                                                              {"role": "user", "content": "hi"}],
                                       max_completion_tokens=4, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 4
    # the plain template: the prompt is what the README documents
    expected = len("<|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\n".encode())
    assert r.usage.prompt_tokens == expected


def test_streaming_with_usage(client):
    chunks = list(client.completions.create(model=MODEL, prompt="abc", max_tokens=6, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-2].choices[0].finish_reason == "length"
    text = "".join(c.choices[0].text for c in chunks[:-1])
    whole = client.completions.create(model=MODEL, prompt="abc", max_tokens=6, temperature=0)
    assert text == whole.choices[0].text

    chat = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                               max_tokens=3, temperature=0, stream=True,
                                               stream_options={"include_usage": True}))
    assert chat[0].choices[0].delta.role == "assistant"
    assert chat[-1].usage.completion_tokens == 3 and chat[-2].choices[0].finish_reason == "length"


def test_sse_ends_with_done(server):
    with httpx.stream("POST", server.base_url + "/completions",
                      json={"prompt": "a", "max_tokens": 2, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)


def test_n_and_seeded_sampling_reproducible(client):
    kw = dict(model=MODEL, prompt="seed me", max_tokens=8, temperature=1.0, seed=1234, n=3)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert len(a.choices) == 3
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1  # the choices differ from one another
    other = client.completions.create(**{**kw, "seed": 99})
    assert [c.text for c in other.choices] != [c.text for c in a.choices]


async def test_async_client_concurrent(aclient):
    async def one(i: int) -> str:
        r = await aclient.completions.create(model=MODEL, prompt=f"req {i}", max_tokens=4, temperature=0)
        return r.choices[0].text

    async def streamed(i: int) -> str:
        stream = await aclient.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": str(i)}],
                                                       max_tokens=4, temperature=0, stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    texts = await asyncio.gather(*(one(i) for i in range(6)), *(streamed(i) for i in range(6)))
    assert len(texts) == 12
    again = await one(3)
    assert again == texts[3]


def _find_stop(client, max_tokens=24):
    """A prompt whose greedy output contains a printable substring to use as a stop string."""
    base = client.completions.create(model=MODEL, prompt="stop strings", max_tokens=max_tokens, temperature=0)
    text = base.choices[0].text
    for i in range(3, len(text) - 2):
        s = text[i:i + 2]
        if "\ufffd" not in s and text.find(s) == i:
            return text, s, i
    pytest.skip("no usable substring in the synthetic output")


def test_stop_strings_not_returned(client):
    text, stop, at = _find_stop(client)
    r = client.completions.create(model=MODEL, prompt="stop strings", max_tokens=24, temperature=0, stop=[stop])
    assert r.choices[0].text == text[:at]
    assert r.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=MODEL, prompt="stop strings", max_tokens=24, temperature=0,
                                         stop=stop, stream=True)
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == text[:at]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_stop_token_ids_and_min_tokens(server, client):
    base = client.completions.create(model=MODEL, prompt=[7, 8, 9], max_tokens=10, temperature=0)
    ids = server.llm.requests[base.id + "-0"].output_token_ids  # the engine keeps finished requests
    r = client.completions.create(model=MODEL, prompt=[7, 8, 9], max_tokens=10, temperature=0,
                                  extra_body={"stop_token_ids": [ids[2]]})
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == ids.index(ids[2]) + 1
    r = client.completions.create(model=MODEL, prompt=[7, 8, 9], max_tokens=10, temperature=0,
                                  extra_body={"stop_token_ids": [ids[0]], "min_tokens": 10})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 10


def test_tenant_slo_class_and_user(server, client):
    r = client.completions.create(model=MODEL, prompt="t", max_tokens=2, user="alice",
                                  extra_body={"slo_class": "realtime", "priority": 3})
    wait_for(lambda: any(rec.request_id.startswith(r.id) for rec in server.records), what="the request record")
    rec = next(rec for rec in server.records if rec.request_id.startswith(r.id))
    assert (rec.tenant, rec.slo_class, rec.priority) == ("alice", "realtime", 3)
    r = client.completions.create(model=MODEL, prompt="t", max_tokens=2, user="alice", extra_body={"tenant": "acme"})
    wait_for(lambda: any(rec.request_id.startswith(r.id) for rec in server.records), what="the request record")
    assert next(rec for rec in server.records if rec.request_id.startswith(r.id)).tenant == "acme"


# -- errors ------------------------------------------------------------------------------------

def _status_error(fn):
    with pytest.raises(openai.APIStatusError) as info:
        fn()
    err = info.value
    body = err.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return err, body["error"]


@pytest.mark.parametrize("kwargs, param", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(temperature=3.0), "temperature"),
    (dict(temperature=-1), "temperature"),
    (dict(top_p=0), "top_p"),
    (dict(n=0), "n"),
    (dict(max_tokens=100000), "max_tokens"),
    (dict(extra_body={"slo_class": "gold"}), "slo_class"),
    (dict(extra_body={"min_tokens": 5}, max_tokens=2), "min_tokens"),
    (dict(echo=True), "echo"),
    (dict(logprobs=21), "logprobs"),
    (dict(logit_bias={"1": 2}), "logit_bias"),
    (dict(stream_options={"include_usage": True}), "stream_options"),  # without stream, as vLLM refuses it
    (dict(seed=2**63 - 2, n=3), "seed"),  # choice 2 would sample with seed 2**63
    (dict(extra_body={"stop_token_ids": [5, -1]}), "stop_token_ids"),
])
def test_invalid_fields_are_400_naming_the_field(client, kwargs, param):
    err, body = _status_error(lambda: client.completions.create(model=MODEL, prompt="x", **kwargs))
    assert err.status_code == 400 and isinstance(err, openai.BadRequestError)
    assert body["param"] == param and param in body["message"]
    if param == "seed":  # the message names what the client sent, and why it is out of range
        assert f"seed {2**63 - 2} with n = 3" in body["message"]


@pytest.mark.parametrize("kwargs, param", [
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]), "tools"),
    (dict(tool_choice="required"), "tool_choice"),
    (dict(response_format={"type": "json_object"}), "response_format"),
    (dict(top_logprobs=2), "top_logprobs"),  # without logprobs: true
])
def test_chat_fields_that_would_change_the_output_are_refused_not_dropped(client, kwargs, param):
    err, body = _status_error(lambda: client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2, **kwargs))
    assert err.status_code == 400 and body["param"] == param
    ok = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2,
                                        tool_choice="none", response_format={"type": "text"})
    assert ok.choices[0].finish_reason in ("length", "stop")  # served: the accepted values change nothing


def test_prompt_errors(client):
    err, body = _status_error(lambda: client.completions.create(model=MODEL, prompt="x" * 5000, max_tokens=1))
    assert err.status_code == 400 and body["code"] == "context_length_exceeded" and "4096" in body["message"]
    err, body = _status_error(lambda: client.completions.create(model=MODEL, prompt=[1, 99999], max_tokens=1))
    assert err.status_code == 400 and body["param"] == "prompt" and "vocabulary" in body["message"]
    err, body = _status_error(lambda: client.completions.create(model=MODEL, prompt=[], max_tokens=1))
    assert err.status_code == 400 and body["param"] == "prompt"
    err, body = _status_error(lambda: client.completions.create(model=MODEL, prompt="", max_tokens=1))
    assert err.status_code == 400 and body["param"] == "prompt" and "empty" in body["message"]
    err, body = _status_error(lambda: client.chat.completions.create(
        model=MODEL, messages=[{"role": "wizard", "content": "x"}]))
    assert err.status_code == 400 and "role" in body["message"]
    err, body = _status_error(lambda: client.chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": "be brief"}, {"role": "user"}], max_tokens=1))
    assert err.status_code == 400 and body["param"] == "messages[1].content" and "'user'" in body["message"]
    ok = client.chat.completions.create(model=MODEL, max_tokens=1, messages=[
        {"role": "user", "content": "x"}, {"role": "assistant", "content": None}, {"role": "user", "content": "y"}])
    assert ok.choices[0].finish_reason == "length"  # an assistant turn may leave its content out


def test_unknown_model_is_404(client):
    err, body = _status_error(lambda: client.completions.create(model="gpt-5", prompt="x", max_tokens=1))
    assert err.status_code == 404 and isinstance(err, openai.NotFoundError) and body["code"] == "model_not_found"


def test_bad_json_and_wrong_types(server):
    deep = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"  # past the JSON parser's recursion limit
    for raw in (b"{", b"[1, 2]", b'"text"', b'{"prompt": "x", "max_tokens": NaN}', b'{"prompt": "x", "n": "many"}',
                deep):
        r = httpx.post(server.base_url + "/completions", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400, raw
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(server.base_url + "/nowhere", json={})
    assert r.status_code == 404 and "error" in r.json()


def test_unknown_policy_class_is_400(client):
    err, body = _status_error(lambda: client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], extra_body={"slo_class": "platinum"}))
    assert err.status_code == 400 and body["param"] == "slo_class"


def test_api_key():
    s = ServerThread(api_key="sekret").start()
    try:
        bad = openai.OpenAI(base_url=s.base_url, api_key="wrong", max_retries=0)
        err, body = _status_error(lambda: bad.completions.create(model=MODEL, prompt="x", max_tokens=1))
        assert err.status_code == 401 and isinstance(err, openai.AuthenticationError)
        assert httpx.post(s.base_url + "/completions", json={"prompt": "x"}).status_code == 401
        good = openai.OpenAI(base_url=s.base_url, api_key="sekret", max_retries=0)
        assert good.completions.create(model=MODEL, prompt="x", max_tokens=1).choices
        assert httpx.get(s.url + "/health").status_code == 200  # open, as in vLLM
        assert httpx.get(s.url + "/metrics").status_code == 200
    finally:
        s.stop()


async def test_queue_full_is_503_with_retry_after():
    s = ServerThread(engine_kw={"max_waiting": 2}).start()
    try:
        s.call(s.engine.pause())
        client = openai.AsyncOpenAI(base_url=s.base_url, api_key="x", max_retries=0)
        waiting = [asyncio.create_task(client.completions.create(model=MODEL, prompt="w", max_tokens=2))
                   for _ in range(2)]
        deadline = asyncio.get_running_loop().time() + 30
        while len(s.llm.scheduler.waiting) < 2:
            assert asyncio.get_running_loop().time() < deadline, "requests never queued"
            await asyncio.sleep(0.01)
        with pytest.raises(openai.APIStatusError) as info:
            await client.completions.create(model=MODEL, prompt="w", max_tokens=2)
        assert info.value.status_code == 503
        assert info.value.response.headers["retry-after"] == "1"
        assert "max_waiting" in info.value.response.json()["error"]["message"]
        # more choices than the queue can ever hold: a 400 (retrying cannot help), not a 503
        with pytest.raises(openai.BadRequestError) as info:
            await client.completions.create(model=MODEL, prompt="w", max_tokens=2, n=3)
        body = info.value.response.json()["error"]
        assert body["param"] == "n" and "needs 3 places" in body["message"] and "max_waiting is 2" in body["message"]
        s.call(s.engine.resume())
        done = await asyncio.gather(*waiting)
        assert all(r.choices[0].finish_reason == "length" for r in done)
    finally:
        s.stop()


def test_draining_health_is_503():
    flag = {"draining": False}
    s = ServerThread(is_draining=lambda: flag["draining"]).start()
    try:
        assert httpx.get(s.url + "/health").status_code == 200
        flag["draining"] = True
        assert httpx.get(s.url + "/health").status_code == 503
        r = httpx.post(s.base_url + "/completions", json={"prompt": "x", "max_tokens": 1})
        assert r.status_code == 503 and "retry-after" in r.headers
    finally:
        s.stop()


def test_non_streaming_disconnect_aborts(server):
    """A non-streaming client that gives up: its request is aborted, not left to run to max_tokens."""
    before = len(server.records)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.base_url + "/completions", json={"prompt": "slow", "max_tokens": 3000,
                                                           "ignore_eos": True}, timeout=0.5)
    wait_for(lambda: len(server.records) > before and server.records[-1].finish_reason == "abort",
             what="the abort record")
    assert server.records[-1].output_tokens < 3000
    wait_for(lambda: server.llm.blocks.num_used == 0, what="free KV blocks")
    assert json.dumps(server.records[-1].to_dict())


def test_logprobs_of_the_sampled_tokens(client):
    import math

    r = client.completions.create(model=MODEL, prompt="lp", max_tokens=5, temperature=0, logprobs=1)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 5 and lp.text_offset[0] == 0
    # greedy picks the most likely token, so its probability is at least 1 / vocabulary
    assert all(-math.log(512) <= v <= 0 for v in lp.token_logprobs)
    stream = client.completions.create(model=MODEL, prompt="lp", max_tokens=5, temperature=0, logprobs=1,
                                       stream=True)
    streamed = [v for c in stream for v in (c.choices[0].logprobs.token_logprobs if c.choices[0].logprobs else [])]
    assert streamed == pytest.approx(lp.token_logprobs, abs=1e-5)
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=3,
                                          temperature=0, logprobs=True)
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(c.logprob <= 0 for c in content)
    plain = client.completions.create(model=MODEL, prompt="lp", max_tokens=5, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].text == r.choices[0].text


def test_top_logprobs_are_the_most_likely_tokens_with_the_sampled_one(client):
    r = client.completions.create(model=MODEL, prompt="lp", max_tokens=5, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.top_logprobs) == 5
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert 3 <= len(top) <= 4 and top[token] == pytest.approx(value, abs=1e-6)
        assert max(top.values()) == pytest.approx(value, abs=1e-6)  # greedy: the sampled token is the likeliest
    zero = client.completions.create(model=MODEL, prompt="lp", max_tokens=5, temperature=0, logprobs=0)
    assert [list(t) for t in zero.choices[0].logprobs.top_logprobs] == [[t] for t in lp.tokens]  # the sampled one
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=3,
                                          temperature=0, logprobs=True, top_logprobs=2)
    for c in chat.choices[0].logprobs.content:
        assert len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob
        assert c.top_logprobs[0].token == c.token and c.top_logprobs[0].logprob == pytest.approx(c.logprob, abs=1e-6)
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=3,
                                            temperature=0, logprobs=True, top_logprobs=2, stream=True)
    streamed = [[t.token for t in c.top_logprobs] for k in stream if k.choices and k.choices[0].logprobs
                for c in k.choices[0].logprobs.content]
    assert streamed == [[t.token for t in c.top_logprobs] for c in chat.choices[0].logprobs.content]
