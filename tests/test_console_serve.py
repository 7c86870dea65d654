"""`batchdeck console --port`: the OpenAI server beside the console's in-process engine."""
from __future__ import annotations

import json

import httpx
import pytest

from batchdeck.console.cli import build_app
from batchdeck.engine.service.http.server import start_http_server
from tests.test_console_app import busy_process_pilot  # noqa: F401 - a fixture
from tests.test_console_app import SIZE, wait_for

pytestmark = pytest.mark.usefixtures("busy_process_pilot")


async def test_http_requests_show_in_the_request_table_with_tenant_and_class():
    app = build_app(None, overrides={"num_blocks": 512, "model": "synthetic:tiny"}, log=lambda line: None,
                    steady_load=False)
    assert app.drivers == []  # --port without --preset: HTTP traffic only
    async with app.run_test(size=SIZE) as pilot:
        server = await start_http_server(app.client.engine, app.client.bus, port=0)
        try:
            async with httpx.AsyncClient(timeout=60) as http:
                body = {"prompt": "console", "max_tokens": 2000, "ignore_eos": True, "stream": True,
                        "user": "alice", "slo_class": "realtime"}
                async with http.stream("POST", server.url + "/v1/completions", json=body) as resp:
                    lines = resp.aiter_lines()
                    first = await anext(line async for line in lines if line.startswith("data: "))
                    rid = json.loads(first[6:])["id"] + "-0"
                    row = await wait_for(pilot, lambda: app.state.requests.get(rid), timeout=30,
                                         what="the HTTP request in the request table")
                    assert row["tenant"] == "alice" and row["slo_class"] == "realtime"
                # the stream is closed: the request is aborted and leaves the table
                await wait_for(pilot, lambda: rid not in app.state.requests and app.state.finished_total >= 1,
                               timeout=30, what="the aborted request gone")
            assert app.client.engine.engine.blocks.num_used == 0
        finally:
            await server.stop()
        await app.shutdown()


def test_port_needs_the_in_process_engine(capsys):
    from batchdeck.cli import main

    assert main(["console", "--port", "0", "--attach", "mqtt://127.0.0.1:1883/x"]) == 2
    assert "--port" in capsys.readouterr().err
    assert main(["console", "--port", "70000"]) == 2
