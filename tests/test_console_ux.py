"""The operator's view must be trustworthy: live counts while paused, a selection that follows its
request (and an abort that names it), one source for the Requests tile and the table, the help
screen, sorting and filtering, and the smaller labels (pause iteration, chart caption, GPU panel)."""
from __future__ import annotations

import pytest
from textual.binding import Binding
from textual.content import Content

from batchdeck.console.app import ConsoleApp
from batchdeck.console.client import FakeClient
from batchdeck.console.commands import ACTIONS, SETTINGS, candidates
from batchdeck.console.demo import synthetic_session
from batchdeck.console.request_view import FilterError, RequestView, arrange, next_sort, parse_filter
from batchdeck.console.screens.filter_screen import FilterScreen
from batchdeck.console.screens.help_screen import HelpScreen
from batchdeck.console.state import DashboardState, format_event
from batchdeck.console.widgets.batch_chart import Column, render_chart
from batchdeck.engine.service.gpu_monitor import GpuSample
from batchdeck.engine.telemetry import Event, IterationRecord
from tests.test_console_app import SIZE, busy_process_pilot, fake_app, notes, wait_for  # noqa: F401 - a fixture


def row(rid: str, state: str, *, tenant: str = "t", cls: str = "batch", ttft: float | None = None,
        arrival: float = 0.0, out: int = 0) -> dict:
    return {"request_id": rid, "tenant": tenant, "slo_class": cls, "state": state, "prompt_tokens": 10,
            "output_tokens": out, "max_tokens": 50, "ttft": ttft, "arrival": arrival, "num_preemptions": 0}


def snapshot(rows: list[dict], t: float, **counts) -> tuple[str, dict]:
    return ("requests", {"time": t, "iteration": 200, "requests": rows, **counts})


def finished(rid: str, t: float):
    (rec,) = [r for topic, r in synthetic_session(200) if topic == "request"][:1]
    rec.request_id, rec.finish = rid, t
    return ("request", rec)


def plain(markup: str) -> str:
    return Content.from_markup(markup).plain


def tile_text(app) -> str:
    return str(app.query_one("#reqs-text").render())


# -- 1: counts stay live while the engine is paused ------------------------------------------------
@pytest.mark.usefixtures("busy_process_pilot")
async def test_request_counts_stay_live_while_the_engine_is_paused():
    """Arrivals while paused show in the Requests tile and the table at once, not on resume."""
    from tests.test_console_inprocess import quiet_app

    app, client, engine = quiet_app()
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.state.config is not None, what="config")
        await pilot.press("p")
        await wait_for(pilot, lambda: client.engine.paused and app.state.paused, what="paused")
        await pilot.press("b")
        await wait_for(pilot, lambda: engine.num_requests_added == app.burst_size, what="the burst")
        want = f"0 run · {app.burst_size} wait"
        await wait_for(pilot, lambda: want in tile_text(app), what=f"the tile to say {want!r} while paused")
        table = app.query_one("#requests")
        assert table.row_count == app.burst_size and engine.iteration == 0
        assert plain(app.query_one("#requests-box").border_title).startswith(f"Requests: {want}")
        await app.shutdown()


# -- 2: the selection follows its request; abort names it and never hits another ---------------------
async def test_abort_after_the_selected_request_finished_aborts_nothing_else():
    app, client = fake_app()
    async with app.run_test(size=SIZE) as pilot:
        app.tick()
        client.feed([snapshot([row("r1", "decode"), row("r2", "decode"), row("r3", "waiting")], 5.0)])
        app.tick()
        table = app.query_one("#requests")
        table.move_cursor(row=1)
        assert table.selected_request_id == "r2"
        # r2 finishes, r4 arrives in front: the row under the cursor is now someone else
        client.feed([finished("r2", 5.1), snapshot([row("r4", "prefill"), row("r1", "decode"), row("r3", "waiting")], 5.2)])
        app.tick()
        await pilot.pause()
        assert table.selected_id == "r2" and table.selection_gone
        assert table.has_class("-stale")  # the cursor is dimmed: the row under it is not the selection
        assert "selected r2 has finished (length)" in plain(app.query_one("#requests-box").border_subtitle)
        await pilot.press("x", "x")
        await pilot.pause()
        assert not [c for c in client.calls if c[0] == "abort"]
        assert any("r2 has finished" in n and "nothing aborted" in n for n in notes(app)), notes(app)
        # a new choice: the selection follows r3 when rows move, and x x aborts exactly r3
        table.move_cursor(row=table.get_row_index("r3"))
        client.feed([snapshot([row("r3", "prefill"), row("r4", "decode"), row("r1", "decode")], 5.3)])
        app.tick()
        await pilot.pause()
        assert table.selected_request_id == "r3" and table.cursor_row == 0 and not table.has_class("-stale")
        await pilot.press("x")
        await pilot.pause()
        assert "x again: abort r3" in plain(app.query_one("#requests-box").border_subtitle)
        await pilot.press("escape")  # cancelled: the next x asks again
        await pilot.press("x")
        await pilot.pause()
        assert not [c for c in client.calls if c[0] == "abort"]
        await pilot.press("x")
        await wait_for(pilot, lambda: ("abort", "r3") in client.calls, what="the abort of r3")
        assert [c for c in client.calls if c[0] == "abort"] == [("abort", "r3")]


# -- 3: the tile and the table agree -------------------------------------------------------------------
async def test_requests_tile_and_table_show_the_same_counts():
    app, client = fake_app()
    async with app.run_test(size=SIZE) as pilot:
        app.tick()
        rows = [row(f"r{i}", "decode") for i in range(7)] + [row("w1", "waiting"), row("w2", "preempted")]
        client.feed([snapshot(rows, 5.0, num_running=7, num_waiting=2, num_preempted=1)])
        app.tick()
        await pilot.pause()
        assert tile_text(app).startswith("7 run · 2 wait") and "1 preempted" in tile_text(app)
        assert plain(app.query_one("#requests-box").border_title).startswith("Requests: 7 run · 2 wait ·")
        assert app.query_one("#requests").row_count == 9
        # an iteration record with other counts (engine-side, a moment later) does not split them
        client.feed([("iteration", IterationRecord(201, 5.05, 0.01, 0, 0, 0.01, 0, 0, 4, 0, 4, 0, 0, 10, 1024,
                                                   0.01, 0))])
        client.feed([finished("r0", 5.1)])
        app.tick()
        await pilot.pause()
        assert tile_text(app).startswith("6 run · 2 wait")
        assert plain(app.query_one("#requests-box").border_title).startswith("Requests: 6 run · 2 wait ·")
        assert app.query_one("#requests").row_count == 8


def test_counts_come_from_the_snapshot_even_when_its_rows_are_capped():
    st = DashboardState()
    st.ingest([snapshot([row("a", "decode"), row("b", "waiting")], 1.0, num_running=150, num_waiting=300,
                        num_preempted=4)])
    c = st.request_counts
    assert (c.running, c.waiting, c.preempted, c.shown) == (150, 300, 4, 2)
    st.ingest([finished("a", 1.1)])
    assert st.request_counts.running == 149 and st.request_status("a") == "finished (length)"
    old = DashboardState()  # a recording made before the counts were sent: its rows are counted
    old.ingest([snapshot([row("a", "prefill"), row("b", "preempted"), row("c", "waiting")], 1.0)])
    assert (old.request_counts.running, old.request_counts.waiting, old.request_counts.preempted) == (1, 2, 1)


# -- 5: labels that agree ----------------------------------------------------------------------------
def test_pause_names_the_last_iteration_done_as_the_header_does():
    assert format_event(Event("pause", 1.0, 2103, {"source": "console"})).text == "paused after it 2,102 (console)"
    assert format_event(Event("resume", 2.0, 2103, {})).text == "resumed at it 2,103"
    assert format_event(Event("pause", 0.0, 0, {})).text == "paused before it 0"


async def test_chart_caption_says_what_is_shown_and_autoscale_lifts_small_batches():
    app, _ = fake_app()
    async with app.run_test(size=SIZE) as pilot:
        app.tick()
        box = app.query_one("#batch-box")
        assert plain(box.border_subtitle).startswith("last 20 s averaged · y budget")
        await pilot.press("z")
        await pilot.pause()
        assert plain(box.border_subtitle).startswith("1 column/iteration")
        chart = "\n".join(str(app.query_one("#batch-chart").render_line(y).text) for y in range(3))
        await pilot.press("a")
        await pilot.pause()
        assert app.autoscale and "y auto" in plain(box.border_subtitle)
        assert chart != "\n".join(str(app.query_one("#batch-chart").render_line(y).text) for y in range(3))
    # pure: 40 tokens on an 8,192 budget sit at the floor; autoscaled they fill the height
    cols = [Column(i, 30, 10) for i in range(20)]
    flat = render_chart(cols, [], 40, 10, budget=8192).plain.splitlines()
    auto = render_chart(cols, [], 40, 10, budget=8192, autoscale=True).plain.splitlines()
    assert flat[0].startswith(" 8192┤") and "█" not in "".join(flat[:-2])
    assert auto[0].startswith("   50┤") and "█" in "".join(auto[:3])


async def test_gpu_panel_wraps_its_reason_instead_of_cutting_it():
    client = FakeClient()
    reason = "NVML unavailable (no NVIDIA driver or GPU?): NVMLError_LibraryNotFound: NVML Shared Library Not Found"
    client.feed([("gpu", GpuSample(1.0, False, reason, 0))])
    app = ConsoleApp(client, refresh_hz=0)
    async with app.run_test(size=SIZE) as pilot:
        app.tick()
        await pilot.pause()
        panel = app.query_one("#gpu")
        shown = " ".join(line.strip() for line in str(panel.render()).splitlines())
        assert "NVML unavailable (no NVIDIA driver or GPU?)" in shown, shown
        assert panel.tooltip == reason


# -- 6: help, sort, filter ---------------------------------------------------------------------------
async def test_help_screen_lists_every_key_and_palette_command():
    app, _ = fake_app()
    async with app.run_test(size=SIZE) as pilot:
        app.tick()
        for key in ("question_mark", "f1"):
            await pilot.press(key)
            await wait_for(pilot, lambda: isinstance(app.screen, HelpScreen), what=f"help on {key}")
            text = HelpScreen.plain(app.screen.sections)
            await pilot.press("escape")
            await wait_for(pilot, lambda: not isinstance(app.screen, HelpScreen), what="help closed")
        for binding in Binding.make_bindings(ConsoleApp.BINDINGS):
            assert binding.tooltip and binding.tooltip in text, binding
            assert f"  {app.get_key_display(binding)} " in text or f" {app.get_key_display(binding)}  " in text
        for name, _, _ in ACTIONS:
            assert name in text
        for key in SETTINGS:
            assert f"\n  {key} " in text, key
        assert "ctrl+s" in text and "esc" in text  # the config panel's keys
        for c in candidates("", app.state.config, app.state.bounds):  # every palette command, choices merged
            head = c.text.split(" <")[0]
            assert head.split()[0] in text


def test_sort_and_filter_are_pure_and_stable():
    rows = {r["request_id"]: r for r in [
        row("a", "decode", tenant="x", cls="batch", ttft=0.5, arrival=3.0),
        row("b", "waiting", tenant="y", cls="interactive", arrival=1.0),
        row("c", "prefill", tenant="x", cls="realtime", ttft=0.1, arrival=2.0),
        row("d", "preempted", tenant="z", cls="batch", ttft=0.9, arrival=0.5)]}
    assert list(arrange(rows, RequestView())) == ["a", "b", "c", "d"]
    assert list(arrange(rows, RequestView("state"))) == ["c", "a", "b", "d"]
    assert list(arrange(rows, RequestView("ttft", True))) == ["d", "a", "c", "b"]  # no TTFT yet: last
    assert list(arrange(rows, RequestView("ttft"))) == ["c", "a", "d", "b"]
    assert list(arrange(rows, RequestView("age", True))) == ["d", "b", "c", "a"]  # oldest first
    assert list(arrange(rows, RequestView("tenant"))) == ["a", "c", "b", "d"]
    assert list(arrange(rows, RequestView("class"))) == ["a", "d", "b", "c"]
    assert list(arrange(rows, RequestView(filter="tenant=x"))) == ["a", "c"]
    assert list(arrange(rows, RequestView(filter="state=run"))) == ["a", "c"]
    assert list(arrange(rows, RequestView(filter="state=waiting"))) == ["b", "d"]
    assert list(arrange(rows, RequestView(filter="batch tenant=z"))) == ["d"]
    assert next_sort(RequestView()).sort == "state" and next_sort(RequestView("class")) == RequestView("ttft", True)
    with pytest.raises(FilterError, match="unknown filter field 'color'"):
        parse_filter("color=red")


async def test_sort_and_filter_the_request_table_from_keys():
    app, client = fake_app()
    async with app.run_test(size=SIZE) as pilot:
        app.tick()
        client.feed([snapshot([row("a", "decode", tenant="x", ttft=0.2, arrival=3.0),
                               row("b", "waiting", tenant="y", arrival=1.0),
                               row("c", "decode", tenant="x", ttft=0.9, arrival=2.0)], 5.0)])
        app.tick()
        await pilot.pause()
        table = app.query_one("#requests")
        order = lambda: [r.key.value for r in table.ordered_rows]  # noqa: E731
        assert order() == ["a", "b", "c"]
        await pilot.press("s", "s", "s", "s")  # state, tenant, class, TTFT (the greatest first)
        await pilot.pause()
        assert app.request_view == RequestView("ttft", True) and order() == ["c", "a", "b"]
        assert "sort TTFT ↓" in plain(app.query_one("#requests-box").border_subtitle)
        await pilot.press("S")
        await pilot.pause()
        assert order() == ["a", "c", "b"]
        await pilot.press("slash")
        await wait_for(pilot, lambda: isinstance(app.screen, FilterScreen), what="the filter prompt")
        await pilot.press(*"colour=x", "enter")
        await pilot.pause()
        assert isinstance(app.screen, FilterScreen)  # refused in place, nothing applied
        app.screen.query_one("#filter-input").value = "tenant=x"
        await pilot.press("enter")
        await wait_for(pilot, lambda: not isinstance(app.screen, FilterScreen), what="the prompt to close")
        assert order() == ["a", "c"] and "filter tenant=x" in plain(app.query_one("#requests-box").border_subtitle)
        assert plain(app.query_one("#requests-box").border_title).startswith("Requests: 2 run · 1 wait · showing 2")
        # the palette has them too
        await app.run_action("sort_by('age')")
        await pilot.pause()
        assert app.request_view.sort == "age" and order() == ["c", "a"]
        app.apply_filter("")
        await pilot.pause()
        assert order() == ["b", "c", "a"]
