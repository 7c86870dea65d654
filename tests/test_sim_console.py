"""The console on the simulator (in-process, paced clock): it says it is simulated, and every steering
path (pause/resume, burst, abort, palette, config panel, refusals) works as on the real engine."""
from __future__ import annotations

import pytest

from batchdeck.console.cli import build_app
from tests.test_console_app import busy_process_pilot  # noqa: F401 - a fixture
from tests.test_console_app import SIZE, log_texts, notes, palette, set_in_panel, wait_for
from tests.test_console_inprocess import pause_burst_resume
from tests.test_sim import profile_path  # noqa: F401 - a fixture

pytestmark = pytest.mark.usefixtures("busy_process_pilot")


async def test_every_steering_path_on_the_simulator(profile_path):  # noqa: F811
    app = build_app(None, overrides={"sim": str(profile_path), "max_num_seqs": 4}, speed=1.0,
                    log=lambda line: None)
    app.drivers = []
    client, engine = app.client, app.client.engine.engine
    assert engine.simulation["profile"] == "test-tiny"
    assert "SIMULATED" in client.description and "SIMULATED" in app.title
    async with app.run_test(size=SIZE) as pilot:
        await pause_burst_resume(pilot, app, client, engine)
        long = await client.submit({"id": "long-1", "prompt_token_ids": [5] * 16, "max_tokens": 6000,
                                    "ignore_eos": True})
        assert long.ok
        table = app.query_one("#requests")
        await wait_for(pilot, lambda: "long-1" in table.rows, what="the long request in the table")
        table.focus()
        table.move_cursor(row=table.get_row_index("long-1"))
        await pilot.press("x", "x")  # the first names it, the second aborts it
        await wait_for(pilot, lambda: engine.requests["long-1"].is_finished, what="the abort")
        assert engine.requests["long-1"].finish_reason.value == "abort"
        await palette(pilot, "policy sjf")
        await wait_for(pilot, lambda: engine.live.policy == "sjf", what="the engine on sjf")
        await wait_for(pilot, lambda: any("policy=sjf → it" in t for t in log_texts(app)), what="the logged change")
        await palette(pilot, "max_num_seqs 1000")
        assert any("an integer in [1, 256]" in n for n in notes(app))
        await set_in_panel(pilot, {"max_num_seqs": 2, "chunk_size": 128})
        await wait_for(pilot, lambda: engine.live.max_num_seqs == 2 and engine.live.chunk_size == 128,
                       what="the panel's change")
        result = await client.set({"max_num_seqs": 0})
        assert not result.ok and "an integer in [1, 256]" in result.error
        await wait_for(pilot, lambda: app.state.finished_total >= app.burst_size, what="the burst served")
        await app.shutdown()
