"""The request table's columns: each request's prompt tokens served from the prefix cache (`cached`,
vLLM's num_cached_tokens) from the engine's request rows, and every column visible in a 120-column
terminal, with cells that fit their columns."""
from __future__ import annotations

from batchdeck.console.widgets.request_table import COLUMNS, RequestTable, age_text, cells, ttft_text
from batchdeck.engine.service.request_table import requests_message
from tests.helpers import greedy, make_engine
from tests.test_console_app import SIZE, fake_app, wait_for

WIDTH = {key: width for key, _, width, _ in COLUMNS}


def cell(table: RequestTable, rid: str, key: str) -> str:
    return str(table.get_cell(rid, key))


async def test_cached_column_shows_each_requests_cached_prompt_tokens_from_the_engine(model_dirs):
    engine = make_engine(model_dirs["llama"], block_size=4, num_blocks=64, max_batched_tokens=64, chunk_size=64)
    prefix = list(range(1, 21))  # five full blocks
    engine.add_request("first", prefix + [30, 31], greedy(2))
    engine.run_until_done()
    engine.add_request("second", prefix + [40, 41, 42], greedy(50))
    engine.add_request("fresh", [90 + i for i in range(9)], greedy(50))
    engine.step()
    message = requests_message(engine)
    rows = {r["request_id"]: r for r in message["requests"]}
    assert rows["second"]["num_cached_tokens"] == 20 and rows["fresh"]["num_cached_tokens"] == 0

    app, client = fake_app()
    async with app.run_test(size=SIZE) as pilot:
        app.tick()
        client.feed([("requests", {**message, "time": 5.0})])
        app.tick()
        table = app.query_one("#requests", RequestTable)
        await wait_for(pilot, lambda: table.row_count == 2, what="the two rows")
        assert cell(table, "second", "num_cached_tokens") == "20"
        assert cell(table, "fresh", "num_cached_tokens") == "0"
        # a later snapshot (the request was preempted and readmitted with more cached) updates the cell in place
        client.feed([("requests", {**message, "time": 5.5, "requests": [{**rows["second"], "num_cached_tokens": 24}]})])
        app.tick()
        await wait_for(pilot, lambda: table.row_count == 1, what="one row")
        assert cell(table, "second", "num_cached_tokens") == "24" and table.rebuilds == 0


def test_a_row_without_the_field_shows_a_dash():
    """Rows recorded before the column existed (old recordings) have no num_cached_tokens."""
    row = {"request_id": "r1", "tenant": "t", "slo_class": "batch", "state": "waiting", "prompt_tokens": 10,
           "output_tokens": 0, "max_tokens": 50, "ttft": None, "arrival": 0.0}
    keys = [key for key, *_ in COLUMNS]
    assert str(cells(row, 1.0)[keys.index("num_cached_tokens")]) == "-"
    assert str(cells({**row, "num_cached_tokens": 512}, 1.0)[keys.index("num_cached_tokens")]) == "512"


async def test_every_column_is_visible_in_a_120_column_terminal():
    app, _ = fake_app()
    async with app.run_test(size=SIZE) as pilot:
        app.tick()
        await pilot.pause()
        table = app.query_one("#requests", RequestTable)
        assert table.row_count > 0
        assert table.virtual_size.width <= table.scrollable_content_region.width, (
            f"the columns need {table.virtual_size.width} cells, the table shows {table.scrollable_content_region.width}")


def test_times_fit_their_columns_with_a_blank_before():
    values = [0.0, 0.0004, 0.00949, 0.00996, 0.0123, 0.5, 0.9994, 0.9996, 1.5, 9.994, 9.996, 12.34, 99.94, 99.96,
              240.0, 999.4, 999.6, 3599.0, 5969.0, 5971.0, 86_000.0, 400_000.0, 1e9]
    for v in values:
        assert len(ttft_text(v)) <= WIDTH["ttft"] - 1, (v, ttft_text(v))
        assert len(age_text(v)) <= WIDTH["age"] - 1, (v, age_text(v))
    assert [ttft_text(v) for v in (0.0095, 0.32, 2.424, 12.34, 240.0)] == ["9.5ms", "320ms", "2.42s", "12.3s", "240s"]
    assert [age_text(v) for v in (4.2, 99.4, 99.6, 3600.0, 7200.0, 864_000.0)] == ["4s", "99s", "2m", "60m", "2h", "10d"]
    assert ttft_text(None) == age_text(None) == "-"
