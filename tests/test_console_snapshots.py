"""Snapshot tests of the main screens (pytest-textual-snapshot) from a deterministic fake telemetry
source: fixed records, the engine clock taken from them, no timers (the test drains once), and a
stress test of input latency under >= 500 iteration records/s.

Update the snapshots after an intended change of the layout with
`pytest tests/test_console_snapshots.py --snapshot-update` and look at the SVGs."""
from __future__ import annotations

import asyncio
import time

from textual import events

from batchdeck.console.app import ConsoleApp
from batchdeck.console.client import FakeClient
from batchdeck.console.demo import synthetic_session
from batchdeck.console.screens.config_screen import ConfigScreen
from batchdeck.engine.telemetry import IterationRecord, RequestRecord


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


async def test_keys_stay_responsive_under_500_iterations_per_second():
    """A benchmark-style check: the feeder pushes ~1,000 iteration records/s (plus finished requests)
    while keys are sent the way the terminal driver sends them; each must be handled in < 200 ms."""
    client = FakeClient()
    app = ConsoleApp(client, refresh_hz=10)
    fed = 0
    stop = False

    async def feeder() -> None:
        nonlocal fed
        t0 = time.perf_counter()
        while not stop:
            now = time.perf_counter() - t0
            due = int(now * 1000)  # 1,000 iterations per second of wall time
            batch = []
            while fed < due:
                batch.append(("iteration", IterationRecord(
                    fed, fed / 1000, 0.001, 0, 0, 0.0008, 0, 128 if fed % 10 == 0 else 0, 32, 1, 32, 5, 0,
                    300 + fed % 100, 1024, (300 + fed % 100) / 1024, 0, num_generated_tokens=32)))
                if fed % 20 == 0:
                    batch.append(("request", RequestRecord(f"r{fed}", "t", "interactive", 0, 100, 50, fed / 1000 - 1,
                                                           0.01, 0.1, 0.02, 0.02, 0.05, 0.06, 1.0, "length", 0, True,
                                                           None, None, fed / 1000)))
                fed += 1
            client.feed(batch)
            await asyncio.sleep(0.005)

    latencies = []
    async with app.run_test(size=(120, 40)) as pilot:
        task = asyncio.create_task(feeder())
        await asyncio.sleep(0.5)
        start_fed, t_start = fed, time.perf_counter()
        for _ in range(6):
            frozen = app.frozen
            t0 = time.perf_counter()
            app._driver.send_message(events.Key("f", "f"))
            while app.frozen == frozen:
                await asyncio.sleep(0.002)
                assert time.perf_counter() - t0 < 2.0, "the key was not handled within 2 s"
            latencies.append(time.perf_counter() - t0)
            await asyncio.sleep(0.4)
        rate = (fed - start_fed) / (time.perf_counter() - t_start)
        stop = True
        await task
        app.tick()
        seen = app.state.counts.get("iteration", 0)
    assert rate >= 500, f"the feeder only managed {rate:.0f} iterations/s"
    assert seen >= fed - 10 and client.dropped == 0  # everything fed reached the dashboard's buffers
    assert max(latencies) < 0.2, f"key latencies {[round(x * 1000) for x in latencies]} ms"


def test_help_screen(snap_compare):
    """`?`: every key and palette command, generated from the bindings and the palette's list."""
    async def open_help(pilot) -> None:
        await drain(pilot)
        await pilot.press("question_mark")
        await pilot.pause()

    assert snap_compare(dashboard(), terminal_size=(120, 50), run_before=open_help)
