"""`batchdeck serve` with its engine in a child process (engine/service/engine_process.py): the engine
runs in another PID, streams and /metrics cross the pipe exactly, a disconnect frees KV blocks in the
child, a live change reaches it, a child that dies gives clients a clear error and /health 503, and
shutdown leaves no child behind."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest

from tests.http_helpers import ProcessServerThread, wait_for
from tests.test_serve_load import scrape, total

MODEL = "synthetic:tiny"
SLOW = 120.0  # a child process imports torch and builds its engine first


@pytest.fixture(scope="module")
def server():
    s = ProcessServerThread().start()
    yield s
    s.stop()


def test_the_engine_runs_in_another_process(server):
    assert server.engine.pid != os.getpid() and server.engine.process.is_alive()
    client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
    out = client.completions.create(model=MODEL, prompt="hello", max_tokens=6, extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 6 and out.choices[0].finish_reason == "length"
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=5, stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    assert chunks[-1].usage.completion_tokens == 5
    seeded = [client.completions.create(model=MODEL, prompt="seed", max_tokens=8, temperature=1.0, seed=7).choices[0].text
              for _ in range(2)]
    assert seeded[0] == seeded[1]
    lp = client.completions.create(model=MODEL, prompt="lp", max_tokens=3, temperature=0, logprobs=2).choices[0].logprobs
    assert len(lp.top_logprobs) == 3 and all(t in top and len(top) >= 2 for t, top in zip(lp.tokens, lp.top_logprobs))


def test_bad_input_and_live_changes_cross_the_pipe(server):
    client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as err:  # refused by the engine in the child: still a 400
        client.completions.create(model=MODEL, prompt="x", max_tokens=4, extra_body={"slo_class": "nope"})
    assert "slo_class" in str(err.value)
    reply = server.call(server.engine.update_config({"policy": "sjf", "max_num_seqs": 16}, "test"))
    assert reply.config["policy"] == "sjf"
    wait_for(lambda: scrape(server)["batchdeck:policy_info"].get((("policy", "sjf"),)) == 1, what="the new policy")
    server.call(server.engine.update_config({"policy": "fcfs"}, "test"))


def test_metrics_count_exactly_the_requests_served(server):
    client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
    before = scrape(server)
    n0 = len(server.records)
    served = [client.completions.create(model=MODEL, prompt=[1] * (3 + i), max_tokens=2 + i,
                                        extra_body={"ignore_eos": True}) for i in range(5)]
    wait_for(lambda: len(server.records) == n0 + 5, what="5 more records")
    m = scrape(server)

    def grew(name: str) -> float:
        return total(m, name) - total(before, name)

    output = sum(r.usage.completion_tokens for r in served)
    assert grew("batchdeck:request_success_total") == 5
    assert grew("batchdeck:generation_tokens_total") == output
    assert grew("batchdeck:prompt_tokens_total") == sum(r.usage.prompt_tokens for r in served)
    assert grew("batchdeck:inter_token_latency_seconds_count") == output - 5


async def test_disconnect_frees_kv_blocks_in_the_child(server):
    client = openai.AsyncOpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=120)
    aborted_before = sum(r.finish_reason == "abort" for r in server.records)  # the module's server served others

    async def cancelled(i: int) -> None:
        stream = await client.completions.create(model=MODEL, prompt=f"cancel {i}", max_tokens=400, stream=True,
                                                 extra_body={"ignore_eos": True})
        seen = 0
        async for _ in stream:
            seen += 1
            if seen >= 3:
                break
        await stream.close()

    async def complete(i: int) -> str | None:
        stream = await client.completions.create(model=MODEL, prompt=f"keep {i}", max_tokens=16, stream=True,
                                                 extra_body={"ignore_eos": True})
        finish = None
        async for chunk in stream:
            finish = chunk.choices[0].finish_reason or finish
        return finish

    results = await asyncio.gather(*(cancelled(i) for i in range(8)), *(complete(i) for i in range(8)))
    assert results[8:] == ["length"] * 8
    await asyncio.to_thread(wait_for, lambda: server.state()["num_used_blocks"] == 0, 30.0, 0.05,
                            "every KV block free in the child")
    state = server.state()
    assert state["num_running"] == 0 and state["num_waiting"] == 0
    assert state["num_free_blocks"] == state["num_blocks"]
    await asyncio.to_thread(wait_for, lambda: sum(r.finish_reason == "abort" for r in server.records)
                            - aborted_before >= 8, 30.0, 0.05, "a record of each of the 8 disconnected requests")
    assert sum(r.finish_reason == "abort" for r in server.records) - aborted_before >= 8


def test_a_dead_engine_process_gives_clear_errors_and_health_503(monkeypatch):
    from batchdeck.engine.service.http import server as server_module

    monkeypatch.setattr(server_module, "DEAD_ENGINE_GRACE_S", 30.0)
    s = ProcessServerThread().start()
    try:
        assert httpx.get(s.url + "/health").status_code == 200
        body = {"model": MODEL, "prompt": "x", "max_tokens": 500, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", s.base_url + "/completions", json=body, timeout=60) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            os.kill(s.engine.pid, signal.SIGKILL)
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest and '"engine_failed"' in rest[-1] and "exited unexpectedly" in rest[-1]
        health = httpx.get(s.url + "/health")
        assert health.status_code == 503 and "engine" in health.json()["error"]["message"]
        refused = httpx.post(s.base_url + "/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_failed"
    finally:
        s.stop()  # ends the grace period
    assert s.rc == 1 and not s.engine.process.is_alive()


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_serve_command_runs_the_engine_in_a_child_and_leaves_none_behind(tmp_path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "batchdeck.cli", "serve", MODEL, "--device", "cpu",
                             "--num-blocks", "256", "--port", str(port), "--status-interval", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def up() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return proc.poll() is not None

        wait_for(up, SLOW, 0.2, "the server's /health")
        assert proc.poll() is None
        engines = [p for p in _children(proc.pid) if "spawn_main" in open(f"/proc/{p}/cmdline").read()]
        assert len(engines) == 1 and engines[0] != proc.pid
        out = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                         json={"model": MODEL, "prompt": "hi", "max_tokens": 4, "ignore_eos": True}).json()
        assert out["usage"]["completion_tokens"] == 4
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
        deadline = time.monotonic() + 10
        while _alive(engines[0]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(engines[0]), "the engine process outlived the server"
        assert f"engine process {engines[0]}" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
