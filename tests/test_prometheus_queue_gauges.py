"""/metrics' running, waiting and KV-usage gauges follow the queue between iterations too: an abort while
the engine is idle leaves no iteration record, so the request-table snapshot (`requests`) updates them."""
from __future__ import annotations

import pytest

from batchdeck.engine.service.protocol import METRICS_TOPICS
from batchdeck.engine.service.request_table import requests_counts, requests_message
from tests.helpers import greedy, make_engine


def _gauge(metrics, name: str) -> float:
    text = metrics.render().decode()
    return next(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith(f"batchdeck:{name}{{"))


def test_an_abort_without_an_iteration_reaches_the_gauges(model_dirs):
    pytest.importorskip("prometheus_client")
    from batchdeck.engine.service.http.prometheus import ServerMetrics

    assert "requests" in METRICS_TOPICS  # what the collector subscribes to, and serve's engine process forwards
    metrics = ServerMetrics("tiny")
    engine = make_engine(model_dirs["llama"], block_size=4, num_blocks=64, max_num_seqs=1, sink=metrics.observe)
    engine.add_request("a", list(range(20)), greedy(50))
    engine.add_request("b", list(range(20)), greedy(50))
    engine.step()
    engine.step()
    assert (_gauge(metrics, "num_requests_running"), _gauge(metrics, "num_requests_waiting")) == (1.0, 1.0)
    assert _gauge(metrics, "kv_cache_usage_perc") > 0
    engine.abort("a")
    engine.abort("b")  # no iteration follows: the last iteration record still says 1 and 1
    metrics.observe("requests", requests_counts(requests_message(engine)))  # what the serving loop publishes
    assert (_gauge(metrics, "num_requests_running"), _gauge(metrics, "num_requests_waiting")) == (0.0, 0.0)
    assert _gauge(metrics, "kv_cache_usage_perc") == 0.0  # the aborted requests' blocks went back


def test_the_counts_form_keeps_the_counts_without_the_table(model_dirs):
    engine = make_engine(model_dirs["llama"], block_size=4, num_blocks=64)
    engine.add_request("a", list(range(20)), greedy(5))
    message = requests_message(engine)
    assert message["requests"] and "policy" in message
    slim = requests_counts(message)
    assert "requests" not in slim and "policy" not in slim
    kept = ("num_running", "num_waiting", "num_preempted", "kv_cache_usage")
    assert {k: slim[k] for k in kept} == {k: message[k] for k in kept}


async def test_the_serving_loop_publishes_an_idle_abort_to_the_gauges(model_dirs):
    """End to end through AsyncEngine: two requests run one at a time, the engine is paused (no more
    iterations), both are aborted; the loop's own `requests` snapshot takes the gauges to 0."""
    import asyncio
    import time

    pytest.importorskip("prometheus_client")
    from batchdeck.engine.service.async_engine import AsyncEngine
    from batchdeck.engine.service.http.prometheus import ServerMetrics

    metrics = ServerMetrics("tiny")
    engine = AsyncEngine(make_engine(model_dirs["llama"], block_size=4, num_blocks=256, max_num_seqs=1,
                                     sink=metrics.observe))

    async def until(values: tuple[float, float]) -> None:
        deadline = time.monotonic() + 60
        while (_gauge(metrics, "num_requests_running"), _gauge(metrics, "num_requests_waiting")) != values:
            assert time.monotonic() < deadline, f"the gauges never reached {values}"
            await asyncio.sleep(0.01)

    await engine.start()
    try:
        for rid in ("a", "b"):
            await engine.add_request(rid, list(range(20)), greedy(200))
        await until((1.0, 1.0))  # from the iteration records
        await engine.pause()
        await engine.abort("a")
        await engine.abort("b")
        await until((0.0, 0.0))  # no iteration ran since: only the snapshot can say so
    finally:
        await engine.stop()
