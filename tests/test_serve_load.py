"""The server under load: disconnects, 500 concurrent streams with a live change, fuzzed bodies, /metrics."""
from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from tests.http_helpers import ServerThread, wait_for

MODEL = "synthetic:tiny"


def scrape(server: ServerThread) -> dict[str, dict[tuple, float]]:
    """/metrics parsed with prometheus_client's parser: sample name -> {sorted labels: value}."""
    text = httpx.get(server.url + "/metrics").text
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "model_name"))
            out.setdefault(sample.name, {})[labels] = sample.value
    return out


def total(metrics: dict, name: str) -> float:
    return sum(metrics.get(name, {}).values())


async def test_disconnect_aborts_and_frees_blocks():
    s = ServerThread().start()
    try:
        client = openai.AsyncOpenAI(base_url=s.base_url, api_key="x", max_retries=0, timeout=120)

        async def cancelled(i: int) -> int:
            stream = await client.completions.create(model=MODEL, prompt=f"cancel {i}", max_tokens=400,
                                                     stream=True, extra_body={"ignore_eos": True})
            seen = 0
            async for chunk in stream:
                seen += 1
                if seen >= 3:
                    break
            await stream.close()  # the client goes away mid-stream
            return seen

        async def complete(i: int) -> tuple[str, int, str]:
            stream = await client.completions.create(model=MODEL, prompt=f"keep {i}", max_tokens=24, stream=True,
                                                     stream_options={"include_usage": True},
                                                     extra_body={"ignore_eos": True})
            finish, usage = None, None
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].finish_reason:
                    finish = chunk.choices[0].finish_reason
                if chunk.usage:
                    usage = chunk.usage.completion_tokens
            return finish, usage

        results = await asyncio.gather(*(cancelled(i) for i in range(16)), *(complete(i) for i in range(16)))
        assert all(r == 3 for r in results[:16])
        assert all(r == ("length", 24) for r in results[16:])
        wait_for(lambda: len(s.records) == 32, what="32 request records")
        aborted = [r for r in s.records if r.finish_reason == "abort"]
        assert len(aborted) == 16 and all(r.output_tokens < 400 for r in aborted)
        wait_for(lambda: s.llm.blocks.num_used == 0, what="every KV block free")
        assert s.llm.blocks.num_free == s.llm.blocks.num_blocks
        wait_for(lambda: total(scrape(s), "batchdeck:num_requests_running") == 0, what="num_requests_running 0")
        m = scrape(s)
        assert m["batchdeck:request_success_total"][(("finished_reason", "abort"),)] == 16
        assert m["batchdeck:request_success_total"][(("finished_reason", "length"),)] == 16
    finally:
        s.stop()


async def test_500_concurrent_streams_with_a_live_change():
    """Every stream answered completely once while policy and max_num_seqs change through the console's client."""
    from batchdeck.console.inprocess_client import InProcessClient

    s = ServerThread().start()
    try:
        console = InProcessClient(s.engine, s.bus, gpu_interval_s=None, stop_engine=False)
        s.call(console.start())
        limits = httpx.Limits(max_connections=600, max_keepalive_connections=600)
        http = httpx.AsyncClient(limits=limits, timeout=300)
        client = openai.AsyncOpenAI(base_url=s.base_url, api_key="x", max_retries=0, http_client=http)
        n, max_tokens = 500, 4
        finished = 0
        changed = asyncio.Event()

        async def one(i: int) -> tuple[str, str, int, int]:
            nonlocal finished
            stream = await client.completions.create(model=MODEL, prompt=[i % 200 + 1, 7, 9], max_tokens=max_tokens,
                                                     stream=True, stream_options={"include_usage": True},
                                                     extra_body={"ignore_eos": True, "tenant": f"t{i % 4}"})
            rid, finish, usage, chunks = None, None, None, 0
            async for chunk in stream:
                rid = chunk.id
                if chunk.choices:
                    chunks += 1
                    if chunk.choices[0].finish_reason:
                        assert finish is None, "a second finishing chunk"
                        finish = chunk.choices[0].finish_reason
                if chunk.usage:
                    usage = chunk.usage.completion_tokens
            finished += 1
            return rid, finish, usage, chunks

        async def live_change() -> None:
            while finished < 100:
                await asyncio.sleep(0.01)
            r1 = s.call(console.set({"policy": "sjf"}))
            r2 = s.call(console.set({"max_num_seqs": 16}))
            assert r1.ok and r2.ok, (r1.error, r2.error)
            assert finished < n, "the change came after the run"
            changed.set()

        changer = asyncio.create_task(live_change())
        results = await asyncio.gather(*(one(i) for i in range(n)))
        await changer
        await http.aclose()
        assert changed.is_set()
        ids = [r[0] for r in results]
        assert len(set(ids)) == n, "a response id answered twice"
        assert all(r[1] == "length" and r[2] == max_tokens for r in results)
        wait_for(lambda: len(s.records) == n, what=f"{n} request records")
        engine_ids = [r.request_id for r in s.records]
        assert sorted(engine_ids) == sorted(f"{i}-0" for i in ids), "lost or duplicated requests"
        assert s.llm.live.policy == "sjf" and s.llm.live.max_num_seqs == 16
        changes = [e for e in s.call(_events(console)) if e.get("kind") == "config_change"]
        assert {c["source"] for c in changes} == {"console"}
        s.call(console.stop())
    finally:
        s.stop()


async def _events(console) -> list[dict]:
    return [m.record.to_dict() for m in console.drain() if m.topic == "event"]


# -- fuzz --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_server():
    s = ServerThread(engine_kw={"max_model_len": 48}).start()
    yield s
    s.stop()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)
FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed",
          "stop", "n", "stream", "stream_options", "logprobs", "echo", "top_k", "min_tokens", "ignore_eos",
          "stop_token_ids", "priority", "tenant", "slo_class", "user", "best_of"]
good_values = {
    "prompt": st.one_of(st.text(max_size=10), st.lists(st.integers(0, 600), max_size=6)),
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "bot"]),
                                                "content": st.text(max_size=8)}), max_size=3),
    "max_tokens": st.integers(-2, 60), "n": st.integers(-1, 4), "temperature": st.floats(-1, 3),
    "stream": st.booleans(), "slo_class": st.sampled_from(["realtime", "batch", "gold"]),
    "model": st.sampled_from([MODEL, "other"]),
}
bodies = st.dictionaries(
    st.sampled_from(FIELDS) | st.text(max_size=6),
    json_values, max_size=8,
).flatmap(lambda d: st.fixed_dictionaries({k: good_values.get(k, st.just(v)) for k, v in d.items()}))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(body=bodies | json_values, chat=st.booleans())
def test_fuzzed_bodies_get_200_or_an_openai_4xx(small_server, body, chat):
    url = small_server.base_url + ("/chat/completions" if chat else "/completions")
    with httpx.stream("POST", url, content=json.dumps(body), timeout=60) as r:
        raw = r.read()
    assert r.status_code == 200 or 400 <= r.status_code < 500, (r.status_code, raw[:300])
    if r.status_code != 200:
        err = json.loads(raw)["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]


def test_server_keeps_serving_after_fuzz(small_server):
    assert httpx.get(small_server.url + "/health").status_code == 200
    r = httpx.post(small_server.base_url + "/completions", json={"prompt": "ok", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


# -- /metrics ----------------------------------------------------------------------------------

VLLM_NAMES = ["num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prompt_tokens_total",
              "generation_tokens_total", "num_preemptions_total", "request_success_total",
              "time_to_first_token_seconds_bucket", "inter_token_latency_seconds_bucket",
              "e2e_request_latency_seconds_bucket", "request_queue_time_seconds_bucket",
              "request_prompt_tokens_bucket", "request_generation_tokens_bucket",
              "request_inference_time_seconds_bucket", "request_prefill_time_seconds_bucket",
              "request_decode_time_seconds_bucket", "request_params_max_tokens_bucket"]
OWN_NAMES = ["iteration_tokens_by_kind_bucket", "policy_info", "config_version", "slo_requests_total",
             "slo_met_total", "slo_attainment_ratio", "tenant_service_tokens_total", "prefix_cache_queries_total",
             "prefix_cache_hits_total"]


def test_metrics_parse_and_counters_match_requests_served():
    s = ServerThread().start()
    try:
        client = openai.OpenAI(base_url=s.base_url, api_key="x", max_retries=0)
        served = [client.completions.create(model=MODEL, prompt=[1] * (3 + i), max_tokens=2 + i,
                                            user=f"user{i % 2}", extra_body={"ignore_eos": True,
                                                                              "slo_class": "batch"})
                  for i in range(6)]
        wait_for(lambda: len(s.records) == 6, what="6 records")
        m = scrape(s)
        for name in VLLM_NAMES + OWN_NAMES:
            assert f"batchdeck:{name}" in m, name
        prompt = sum(r.usage.prompt_tokens for r in served)
        output = sum(r.usage.completion_tokens for r in served)
        assert total(m, "batchdeck:request_success_total") == 6
        assert m["batchdeck:request_success_total"][(("finished_reason", "length"),)] == 6
        assert total(m, "batchdeck:prompt_tokens_total") == prompt
        assert total(m, "batchdeck:generation_tokens_total") == output
        assert total(m, "batchdeck:time_to_first_token_seconds_count") == 6
        assert total(m, "batchdeck:e2e_request_latency_seconds_count") == 6
        assert total(m, "batchdeck:request_prompt_tokens_sum") == prompt
        assert total(m, "batchdeck:request_generation_tokens_sum") == output
        assert total(m, "batchdeck:inter_token_latency_seconds_count") == output - 6
        assert total(m, "batchdeck:request_params_max_tokens_sum") == sum(2 + i for i in range(6))
        records = s.records
        for phase, part in (("prefill", lambda r: r.ttft - r.queue_time), ("decode", lambda r: r.e2e_latency - r.ttft),
                            ("inference", lambda r: r.e2e_latency - r.queue_time)):
            assert total(m, f"batchdeck:request_{phase}_time_seconds_count") == 6
            assert total(m, f"batchdeck:request_{phase}_time_seconds_sum") == pytest.approx(
                sum(part(r) for r in records), abs=1e-9)
        assert m["batchdeck:slo_requests_total"][(("slo_class", "batch"),)] == 6
        assert set(k[0][1] for k in m["batchdeck:tenant_service_tokens_total"]) == {"user0", "user1"}
        assert total(m, "batchdeck:tenant_service_tokens_total") == prompt + output - 6  # the last token is not computed
        assert m["batchdeck:policy_info"][(("policy", "fcfs"),)] == 1
        s.call(s.engine.update_config({"policy": "sjf"}))
        m = scrape(s)
        assert m["batchdeck:policy_info"][(("policy", "sjf"),)] == 1
        assert m["batchdeck:policy_info"][(("policy", "fcfs"),)] == 0
        assert total(m, "batchdeck:config_version") == 1
    finally:
        s.stop()


def test_metrics_prefix_vllm():
    s = ServerThread(metrics_prefix="vllm").start()
    try:
        httpx.post(s.base_url + "/completions", json={"prompt": "x", "max_tokens": 2})
        wait_for(lambda: len(s.records) == 1, what="1 record")
        m = scrape(s)
        assert "vllm:request_success_total" in m and "vllm:time_to_first_token_seconds_bucket" in m
        assert not any(name.startswith("batchdeck:") for name in m)
    finally:
        s.stop()


def test_grafana_dashboard_uses_exposed_names():
    import re
    from pathlib import Path

    dashboard = json.loads((Path(__file__).parent.parent / "docs" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {name for e in exprs for name in re.findall(r"\$\{prefix\}:([a-z0-9_]+)", e)}
    s = ServerThread().start()
    try:
        httpx.post(s.base_url + "/completions", json={"prompt": "x", "max_tokens": 2, "user": "u"})
        wait_for(lambda: len(s.records) == 1, what="1 record")
        exposed = set(scrape(s))
    finally:
        s.stop()
    missing = {n for n in used if f"batchdeck:{n}" not in exposed}
    # GPU gauges appear with the first NVML sample (none without a GPU)
    assert missing <= {"gpu_memory_used_bytes", "gpu_memory_total_bytes", "gpu_kv_pool_bytes"}, missing
    assert len(used) >= 20
