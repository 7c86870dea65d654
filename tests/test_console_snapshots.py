"""Snapshot tests of the main screens (pytest-textual-snapshot) from a deterministic fake telemetry
source: fixed records, the engine clock taken from them, no timers (the test drains once), and keys
under a flood of records.

Update the snapshots after an intended change of the layout with
`pytest tests/test_console_snapshots.py --snapshot-update` and look at the SVGs."""
from __future__ import annotations

from batchdeck.console.app import ConsoleApp
from benchmarks import console_key_latency
from batchdeck.console.client import FakeClient
from batchdeck.console.demo import synthetic_session
from batchdeck.console.screens.config_screen import ConfigScreen


def dashboard(gpu: bool = False, spec_k: int = 0) -> ConsoleApp:
    client = FakeClient()
    client.config_snapshot["config"]["spec_k"] = spec_k
    client.feed(synthetic_session(600, change_at=350, gpu=gpu, spec_k=spec_k))
    return ConsoleApp(client, refresh_hz=0)  # no timer: `tick()` below is the only drain


async def drain(pilot) -> None:
    pilot.app.tick()
    await pilot.pause()


def test_dashboard_120x40(snap_compare):
    assert snap_compare(dashboard(), terminal_size=(120, 40), run_before=drain)


def test_dashboard_180x50_with_gpu(snap_compare):
    assert snap_compare(dashboard(gpu=True), terminal_size=(180, 50), run_before=drain)


def test_dashboard_speculating_120x40(snap_compare):
    """spec_k=4: the acceptance rate and tokens per iteration under the throughput plot."""
    assert snap_compare(dashboard(spec_k=4), terminal_size=(120, 40), run_before=drain)


def test_config_panel_refusing_a_value(snap_compare):
    async def open_panel(pilot) -> None:
        await drain(pilot)
        await pilot.press("c")
        screen = pilot.app.screen
        assert isinstance(screen, ConfigScreen)
        for inp in screen.query("Input"):
            inp.cursor_blink = False
        screen.query_one("#cfg-chunk_size").value = "600"
        screen.action_apply()
        await pilot.pause()

    assert snap_compare(dashboard(), terminal_size=(120, 40), run_before=open_panel)


async def test_keys_are_handled_and_nothing_is_lost_under_a_flood_of_records():
    """~1,000 iteration records/s (plus finished requests) while keys are sent the way the terminal
    driver sends them: every key is handled and every record reaches the dashboard's buffers. How fast
    a key is handled is a speed target: benchmarks/console_key_latency.py measures it."""
    result = await console_key_latency.run(keys=4)
    assert len(result.latencies_s) == 4
    assert result.seen >= result.fed - 10 and result.dropped == 0


def test_help_screen(snap_compare):
    """`?`: every key and palette command, generated from the bindings and the palette's list."""
    async def open_help(pilot) -> None:
        await drain(pilot)
        await pilot.press("question_mark")
        await pilot.pause()

    assert snap_compare(dashboard(), terminal_size=(120, 50), run_before=open_help)
