"""Pilot tests of the console against a deterministic fake client: every steering path, valid and
invalid, through the palette, the config panel and the keys; freeze; replay read-only.

`palette()`, `wait_for()` and `set_in_panel()` are shared with the in-process and attached tests."""
from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Callable

import pytest
from textual.command import CommandInput, CommandList, CommandPalette
from textual.content import Content
from textual.widgets import Input, Select

from batchdeck.console.app import ConsoleApp
from batchdeck.console.client import FakeClient
from batchdeck.console.demo import synthetic_session
from batchdeck.console.screens.config_screen import ConfigScreen

SIZE = (120, 40)


@pytest.fixture
def busy_process_pilot(monkeypatch):
    """Pilot waits after each key for the *process* to go idle (up to 1 s); with a real engine thread
    computing in the same process it never does. The tests wait for what they need themselves."""
    import textual.app
    import textual.pilot

    async def brief_idle(min_sleep: float = 0.0, max_sleep: float = 1.0) -> None:
        await asyncio.sleep(0.01)

    monkeypatch.setattr(textual.app, "wait_for_idle", brief_idle)
    monkeypatch.setattr(textual.pilot, "wait_for_idle", brief_idle)


async def wait_for(pilot, predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await pilot.pause(0.02)


async def palette(pilot, text: str, *, choose: bool = True) -> list[str]:
    """Open the command palette, type `text`, wait for the hits, choose the first; returns the hits."""
    app = pilot.app
    await pilot.press("ctrl+p")
    await wait_for(pilot, lambda: isinstance(app.screen, CommandPalette), what="the palette")
    app.screen.query_one(CommandInput).value = text
    commands = app.screen.query_one(CommandList)
    def answered() -> bool:  # the hits for this query (not the discovery list shown before it)
        return commands.option_count > 0 and str(commands.get_option_at_index(0).prompt).split("\n")[0] == text

    await wait_for(pilot, answered, what=f"palette hits for {text!r}")
    hits = [str(commands.get_option_at_index(i).prompt) for i in range(commands.option_count)]
    await pilot.press("enter" if choose else "escape")
    await wait_for(pilot, lambda: not isinstance(app.screen, CommandPalette), what="the palette to close")
    await pilot.pause()
    return hits


async def set_in_panel(pilot, values: dict[str, Any], *, apply: bool = True) -> ConfigScreen:
    """Open the config panel (c), set widgets, press Apply; returns the screen."""
    app = pilot.app
    await pilot.press("c")
    screen = await wait_for(pilot, lambda: isinstance(app.screen, ConfigScreen) and app.screen, what="config panel")
    for key, value in values.items():
        widget = screen.query_one(f"#cfg-{key}")
        if isinstance(widget, Select):
            widget.value = value
        else:
            assert isinstance(widget, Input)
            widget.value = str(value)
    await pilot.pause()
    if apply:
        await pilot.click("#config-apply")
        await pilot.pause()
    return screen


def spec_shown(app) -> str:
    """The speculation line under the throughput plot, as text."""
    return Content.from_markup(app.query_one("#tput-box").border_subtitle).plain


def notes(app) -> list[str]:
    return [n.message for n in app._notifications]


def log_texts(app) -> list[str]:
    return [line.text for line in app.state.log]


def fake_app(**kw) -> tuple[ConsoleApp, FakeClient]:
    client = FakeClient()
    client.feed(synthetic_session(200, change_at=None))
    return ConsoleApp(client, refresh_hz=0, **kw), client


async def test_palette_applies_a_valid_setting_and_logs_its_iteration():
    app, client = fake_app()
    async with app.run_test(size=SIZE) as pilot:
        app.tick()
        hits = await palette(pilot, "policy sjf")
        assert hits[0].startswith("policy sjf")
        await wait_for(pilot, lambda: ("set", {"policy": "sjf"}) in client.calls, what="the set call")
        app.tick()
        assert app.state.config["policy"] == "sjf"
        assert any("policy=sjf → it 200" in t for t in log_texts(app)), log_texts(app)
        assert any("took effect at iteration 200" in n for n in notes(app))
        for text, change in [("max_num_seqs 16", {"max_num_seqs": 16}), ("batching static", {"batching": "static"})]:
            await palette(pilot, text)  # the other settings parse the same way (tests/test_console_units.py)
            await wait_for(pilot, lambda: ("set", change) in client.calls, what=f"set {change}")
        app.tick()
        assert app.state.config["max_num_seqs"] == 16 and app.state.config["batching"] == "static"


async def test_palette_refuses_invalid_values_and_applies_nothing(tmp_path):
    from batchdeck.console.state import format_action
    from batchdeck.engine.service.recording import RecordingWriter

    recorder = RecordingWriter(tmp_path / "session.jsonl")
    app, client = fake_app(recorder=recorder)
    async with app.run_test(size=SIZE) as pilot:
        app.tick()
        for text, why in [("max_num_seqs 9999", "an integer in [1, 256]"), ("policy lifo", "one of fcfs, sjf"),
                          ("chunk_size 4096", "[1, 512] (the live max_batched_tokens)")]:
            hits = await palette(pilot, text)
            assert len(hits) == 1 and "refused" in hits[0]
            assert any(why in n for n in notes(app)), (text, notes(app))
        assert not [c for c in client.calls if c[0] == "set"]
        assert sum("refused:" in t for t in log_texts(app)) == 3
        assert app.state.config["max_num_seqs"] == 8
    recorder.close()
    # a replay of the recording shows what was typed beside why it was refused
    refused = [json.loads(line) for line in (tmp_path / "session.jsonl").read_text().splitlines()]
    refused = [format_action(r).text for r in refused if r["type"] == "action" and r.get("ok") is False]
    assert [t.split(" → ")[0] for t in refused] == ["operator: max_num_seqs 9999", "operator: policy lifo",
                                                      "operator: chunk_size 4096"], refused


async def test_palette_actions_pause_resume_burst_freeze():
    app, client = fake_app()
    async with app.run_test(size=SIZE) as pilot:
        app.tick()
        await palette(pilot, "pause engine")
        await wait_for(pilot, lambda: ("pause", None) in client.calls, what="pause")
        await palette(pilot, "resume engine")
        await wait_for(pilot, lambda: ("resume", None) in client.calls, what="resume")
        await palette(pilot, "submit burst")
        await wait_for(pilot, lambda: any(c[0] == "submit" for c in client.calls), what="submit")
        await palette(pilot, "freeze display")
        assert app.frozen


async def test_config_panel_shows_bounds_applies_valid_and_refuses_invalid():
    app, client = fake_app()
    async with app.run_test(size=SIZE) as pilot:
        app.tick()
        screen = await set_in_panel(pilot, {}, apply=False)
        bounds = [str(label.render()) for label in screen.query(".config-bounds")]
        assert "1..256" in bounds and "1..512" in bounds and "fcfs | sjf | slo | fair | priority | cache-aware" in bounds
        await pilot.press("escape")
        await pilot.pause()
        # invalid: chunk_size above the token budget -> refused in the panel, nothing sent
        screen = await set_in_panel(pilot, {"chunk_size": 600})
        assert isinstance(app.screen, ConfigScreen)
        assert "chunk_size=600 is not allowed" in str(screen.query_one("#config-error").render())
        screen.query_one("#cfg-max_num_seqs", Input).value = ""
        await pilot.press("ctrl+s")  # Apply's key (the button ignores a second click within 0.2 s)
        await pilot.pause()
        assert "max_num_seqs='' is not allowed: a value in 1..256" in str(screen.query_one("#config-error").render())
        assert not [c for c in client.calls if c[0] == "set"]
        await pilot.press("escape")
        await pilot.pause()
        # valid: several settings at once, one change
        await set_in_panel(pilot, {"policy": "fair", "max_num_seqs": 4, "max_batched_tokens": 1024, "chunk_size": 600})
        await wait_for(pilot, lambda: [c for c in client.calls if c[0] == "set"], what="set")
        (call,) = [c for c in client.calls if c[0] == "set"]
        assert call[1] == {"policy": "fair", "max_num_seqs": 4, "max_batched_tokens": 1024, "chunk_size": 600}
        assert not isinstance(app.screen, ConfigScreen)


async def test_keys_pause_burst_abort_freeze_zoom():
    app, client = fake_app()
    async with app.run_test(size=SIZE) as pilot:
        app.tick()
        await pilot.press("p")
        await wait_for(pilot, lambda: ("pause", None) in client.calls, what="pause")
        app.tick()
        assert app.state.paused
        await pilot.press("p")
        await wait_for(pilot, lambda: ("resume", None) in client.calls, what="resume")
        await pilot.press("b")
        await wait_for(pilot, lambda: any(c[0] == "submit" for c in client.calls), what="burst")
        (burst,) = [c[1] for c in client.calls if c[0] == "submit"]
        assert len(burst) == app.burst_size and all(r["tenant"] == "console" for r in burst)
        table = app.query_one("#requests")
        assert table.row_count > 0
        table.move_cursor(row=1)
        selected = table.selected_request_id
        await pilot.press("x")  # names the request, aborts nothing yet
        await pilot.pause()
        assert not any(c[0] == "abort" for c in client.calls)
        assert any(f"abort {selected}?" in n for n in notes(app)), notes(app)
        await pilot.press("x")
        await wait_for(pilot, lambda: ("abort", selected) in client.calls, what="abort")
        assert any(f"aborted {selected}" in t for t in log_texts(app))
        # freeze: telemetry is still taken in, the screen does not change
        await pilot.press("f")
        assert app.frozen
        painted = app.paints
        client.feed(synthetic_session(260, change_at=None)[-50:])
        app.tick()
        assert app.paints == painted and app.state.counts["iteration"] > 200
        await pilot.press("f")
        assert not app.frozen and app.paints > painted
        await pilot.press("z")
        assert app.per_iteration


async def test_abort_without_a_selection_is_refused():
    client = FakeClient()
    app = ConsoleApp(client, refresh_hz=0)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("x")
        await pilot.pause()
        assert not client.calls and any("no request selected" in n for n in notes(app))


async def test_engine_refusal_is_reported(monkeypatch):
    """A change that passes local checks but the engine refuses (e.g. a newer bound) is reported."""
    from batchdeck.console.client import CommandResult

    app, client = fake_app()

    async def refuse(changes):
        client.calls.append(("set", dict(changes)))
        return CommandResult(False, "set", error="max_num_seqs=200 is not allowed: an integer in [1, 64]")

    monkeypatch.setattr(client, "set", refuse)
    async with app.run_test(size=SIZE) as pilot:
        app.tick()
        await palette(pilot, "max_num_seqs 200")
        await wait_for(pilot, lambda: any("[1, 64]" in n for n in notes(app)), what="the refusal")
        assert any("engine refused max_num_seqs=200" in t for t in log_texts(app))
        assert app.state.config["max_num_seqs"] == 8


async def test_records_actions(tmp_path):
    from batchdeck.engine.service.recording import RecordingWriter
    import json

    path = tmp_path / "rec.jsonl"
    app, client = fake_app(recorder=RecordingWriter(path))
    async with app.run_test(size=SIZE) as pilot:
        app.tick()
        await palette(pilot, "policy slo")
        await wait_for(pilot, lambda: ("set", {"policy": "slo"}) in client.calls, what="set")
        await palette(pilot, "max_num_seqs 0")
        await pilot.press("f")
        await app.shutdown()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    actions = [line for line in lines if line["type"] == "action"]
    assert [(a["op"], a.get("ok")) for a in actions] == [("set", True), ("set", False), ("freeze", None)]
    assert actions[0]["applied_iteration"] == 200 and actions[0]["changes"] == {"policy": "slo"}
    assert "[1, 256]" in actions[1]["error"] and actions[0]["origin"] == "palette"
    assert sum(line["type"] == "iteration" for line in lines) == 200
    change = [line for line in lines if line["type"] == "event" and line["kind"] == "config_change"]
    assert change and change[0]["applied_iteration"] == 200 and change[0]["source"] == "console"


async def test_replay_plays_and_refuses_steering(tmp_path):
    from batchdeck.console.player import ReplayClient
    from batchdeck.engine.service.recording import RecordingWriter

    path = tmp_path / "rec.jsonl"
    rec = RecordingWriter(path)
    rec.write_messages(synthetic_session(300))
    rec.close()
    client = ReplayClient(path, autoplay=False)
    app = ConsoleApp(client, refresh_hz=0)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        app.tick()
        await pilot.press("full_stop")  # seek +5 s
        assert app.state.latest is not None and app.state.latest.time <= client.start_time + 5.0
        seen = app.state.latest.iteration
        await pilot.press("comma")  # back 5 s: the dashboard restarts and fast-forwards
        app.tick()
        assert app.state.latest is None or app.state.latest.iteration < seen
        await pilot.press("space")
        assert client.playing
        await pilot.press("plus")
        assert client.speed == 2.0
        await palette(pilot, "policy sjf")
        assert any("no engine to steer" in n for n in notes(app))
        await pilot.press("p")  # steering keys do nothing in a replay
        await pilot.pause()
        assert not any("pause refused" in n for n in notes(app))


async def test_request_table_updates_in_place_in_engine_order_and_keeps_the_cursor():
    from batchdeck.console.widgets.request_table import RequestTable

    def row(rid, state, out):
        return {"request_id": rid, "tenant": "t", "slo_class": "batch", "state": state, "prompt_tokens": 10,
                "output_tokens": out, "max_tokens": 50, "ttft": 0.1 if out else None}

    app, _ = fake_app()
    async with app.run_test(size=SIZE) as pilot:
        table = app.query_one("#requests", RequestTable)
        table.clear()
        table._rows.clear()
        table.sync({r["request_id"]: r for r in [row("a", "decode", 3), row("b", "waiting", 0), row("c", "waiting", 0)]})
        table.move_cursor(row=2)
        assert table.selected_request_id == "c"
        updates = []
        orig = table.update_cell
        table.update_cell = lambda *a, **k: (updates.append(a[:2]), orig(*a, **k))
        # b starts running (moves up), a advances, c stays: two rows change in place, none rebuilt
        table.sync({r["request_id"]: r for r in [row("a", "decode", 4), row("b", "prefill", 0), row("c", "waiting", 0)]})
        assert sorted(updates) == [("a", "output_tokens"), ("b", "state")]
        table.sync({r["request_id"]: r for r in [row("b", "decode", 1), row("d", "prefill", 0), row("c", "waiting", 0)]})
        await pilot.pause()
        assert [r.key.value for r in table.ordered_rows] == ["b", "d", "c"]
        assert table.selected_request_id == "c"  # the cursor followed its request


async def test_spec_k_is_steered_like_every_live_setting():
    """spec_k from the palette and the config panel, refused out of bounds with the range, shown in the
    settings panel."""
    app, client = fake_app()
    async with app.run_test(size=SIZE) as pilot:
        app.tick()
        assert "spec_k          0          0..8" in str(app.query_one("#settings").render())
        hits = await palette(pilot, "spec_k 4")
        assert hits[0].startswith("spec_k 4")
        await wait_for(pilot, lambda: ("set", {"spec_k": 4}) in client.calls, what="the set call")
        app.tick()
        assert app.state.config["spec_k"] == 4
        assert any("spec_k=4 → it 200" in t for t in log_texts(app)), log_texts(app)
        assert "spec_k          4          0..8" in str(app.query_one("#settings").render())
        hits = await palette(pilot, "spec_k 9")
        assert len(hits) == 1 and "refused" in hits[0]
        assert any("spec_k=9 is not allowed: an integer in [0, 8]" in n for n in notes(app)), notes(app)
        # the config panel: its bounds, a refusal, then a valid change
        screen = await set_in_panel(pilot, {"spec_k": 12})
        assert "0..8" in [str(label.render()) for label in screen.query(".config-bounds")]
        assert "spec_k=12 is not allowed: an integer in [0, 8]" in str(screen.query_one("#config-error").render())
        await pilot.press("escape")
        await pilot.pause()
        await set_in_panel(pilot, {"spec_k": 0})
        await wait_for(pilot, lambda: ("set", {"spec_k": 0}) in client.calls, what="the panel's change")
        assert [c[1] for c in client.calls if c[0] == "set"] == [{"spec_k": 4}, {"spec_k": 0}]
        app.tick()
        assert app.state.config["spec_k"] == 0


async def test_acceptance_and_tokens_per_iteration_are_shown_next_to_throughput():
    client = FakeClient()
    client.feed(synthetic_session(300, change_at=None, spec_k=4, spec_accept=0.7))
    app = ConsoleApp(client, refresh_hz=0)
    async with app.run_test(size=SIZE) as pilot:
        app.tick()
        await palette(pilot, "spec_k 4")
        await wait_for(pilot, lambda: ("set", {"spec_k": 4}) in client.calls, what="the set call")
        app.tick()
        spec = app.state.snapshot(client.now())["speculation"]
        assert spec["proposed"] > 0
        rate, per_it = spec["acceptance_rate"] * 100, spec["tokens_per_iteration"]
        assert spec_shown(app) == f"accepted {rate:.0f}% · {per_it:.2f} tok/it"
        screen = "\n".join("".join(seg.text for seg in strip) for strip in app.screen._compositor.render_strips())
        assert f"─ {spec_shown(app)} ─" in screen  # on screen whole, not cut short
    quiet, _ = fake_app()  # no speculation: no acceptance rate, tokens per iteration still shown
    async with quiet.run_test(size=SIZE) as pilot:
        quiet.tick()
        shown = spec_shown(quiet)
        assert shown.startswith("spec off · ") and shown.endswith(" tok/it") and "- tok/it" not in shown


DASHBOARD_PANELS = ("tiles", "batch-box", "tput-box", "gpu", "requests-box", "settings", "events-box")


@pytest.mark.parametrize("size", [(80, 24), (60, 20), (100, 30), (120, 40)])
async def test_every_panel_keeps_rows_on_screen_on_a_small_terminal(size):
    """A default 80x24 terminal (and smaller) shows every dashboard panel with at least two rows inside
    its border, above the footer; the SLO panel gives its rows up below 34 rows and returns above; the
    config panel (with its Apply and Cancel buttons) and the filter prompt fit the screen."""
    from textual.widgets import Footer

    app, _ = fake_app()
    async with app.run_test(size=size) as pilot:
        app.tick()
        await pilot.pause()
        footer_y = app.query_one(Footer).region.y
        assert footer_y == size[1] - 1
        for panel in DASHBOARD_PANELS:
            region = app.query_one(f"#{panel}").region
            assert region.height >= 4 and region.bottom <= footer_y, f"{panel} at {size}: {region}"
            assert region.right <= size[0], f"{panel} at {size}: {region}"
        service = app.query_one("#service")
        assert (service.region.height >= 4) == (size[1] >= 34), service.region
        # the config panel and the filter prompt fit the width too, their buttons included
        await pilot.press("c")
        screen = await wait_for(pilot, lambda: isinstance(app.screen, ConfigScreen) and app.screen, what="config")
        await pilot.pause()
        for part in ("#config-dialog", "#config-apply", "#config-cancel"):
            region = screen.query_one(part).region
            assert region.width > 0 and region.right <= size[0] and region.bottom <= size[1], f"{part}: {region}"
        await pilot.press("escape")
        await wait_for(pilot, lambda: not isinstance(app.screen, ConfigScreen), what="config closed")
        await pilot.press("slash")
        dialog = await wait_for(pilot, lambda: app.screen.query("#filter-dialog"), what="filter prompt")
        await pilot.pause()
        assert dialog.first().region.right <= size[0], dialog.first().region
