"""The console: one dashboard screen that watches and steers the engine through a `Client`.

Data flow (memray's TUI pattern): the engine thread publishes on the bus / the MQTT client's task
queues messages; this app pulls them on a timer (`refresh_hz`, at most 10 Hz), feeds the ring
buffers in `DashboardState` and repaints inside `batch_update()`. Nothing the engine does waits
for the UI; a slow UI only means coarser frames (and, past the buffers, counted drops).

Steering goes through `request_changes()` (palette, config panel, tests): validated locally against
the bounds exactly as the engine validates, then sent; the reply's applied iteration is logged and
shown. Every operator input is recorded when `--record` is on.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable, Callable, Iterable, Mapping

from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import Footer, Sparkline

from batchdeck.console import format as fmt
from batchdeck.console.client import Client, CommandResult, ConnectionState, make_burst
from batchdeck.console.commands import SettingsProvider, validate
from batchdeck.console.request_view import FilterError, RequestView, arrange, next_sort, parse_filter, SORT_KEYS
from batchdeck.engine.service.recording import RecordingWriter
from batchdeck.console.screens.config_screen import ConfigScreen
from batchdeck.console.screens.filter_screen import FilterScreen
from batchdeck.console.screens.help_screen import TABLE_KEYS, HelpScreen, command_rows, key_rows
from batchdeck.console.speculation import summary as spec_summary
from batchdeck.console.state import DashboardState, format_changes
from batchdeck.console.widgets.batch_chart import BatchChart
from batchdeck.console.widgets.event_log import EventLog
from batchdeck.console.widgets.panels import GpuPanel, KvGauge, ServicePanel, SettingsPanel, StatTile, StatusBar
from batchdeck.console.widgets.request_table import RequestTable
from batchdeck.console.widgets.throughput_plot import ThroughputPlot

Driver = Callable[[], Awaitable[Any]]
LINK_STYLE = {ConnectionState.CONNECTED: "bold green", ConnectionState.IN_PROCESS: "bold green",
              ConnectionState.RECONNECTING: "bold yellow", ConnectionState.CONNECTING: "bold yellow",
              ConnectionState.OFFLINE: "bold red", ConnectionState.FAILED: "bold reverse red",
              ConnectionState.REPLAY: "bold cyan",
              ConnectionState.STOPPED: "dim"}


class ConsoleApp(App):
    CSS_PATH = "console.tcss"
    TITLE = "batchdeck"
    # console.tcss packs the panels tighter on a small terminal (an 80x24 one shows every panel)
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (100, "-wide")]
    VERTICAL_BREAKPOINTS = [(0, "-short"), (34, "-tall")]
    COMMANDS = App.COMMANDS | {SettingsProvider}
    ENABLE_COMMAND_PALETTE = True
    # the help screen is generated from these (description: the footer's word; tooltip: the help's line)
    BINDINGS = [
        Binding("question_mark,f1", "help", "Help", tooltip="this screen: every key and palette command"),
        Binding("c", "config", "Config", tooltip="config panel: every live setting with its bounds; "
                                                 "ctrl+s applies, esc closes"),
        Binding("p", "toggle_pause", "Pause/Resume", tooltip="pause / resume the engine (arrivals are still "
                                                              "accepted and counted while paused)"),
        Binding("b", "burst", "Burst", tooltip="submit a burst of requests (tenant 'console')"),
        Binding("x", "abort_selected", "Abort req", tooltip="abort the selected request: the first x names it, "
                                                             "a second x within 5 s aborts it; esc cancels"),
        Binding("escape", "cancel_abort", "Cancel abort", show=False, tooltip="cancel a pending abort"),
        Binding("s", "sort_next", "Sort", tooltip="sort the request table by the next key: engine order, "
                                                  "state, tenant, class, TTFT, age"),
        Binding("S", "sort_reverse", "Reverse", show=False, tooltip="reverse the request table's sort"),
        Binding("slash", "filter_requests", "Filter", tooltip="filter the request table: tenant=… class=… "
                                                              "state=… id=… or any word; empty clears"),
        Binding("f", "freeze", "Freeze", tooltip="freeze the display for reading (telemetry is still collected)"),
        Binding("z", "zoom", "Zoom", tooltip="batch chart: one column per iteration, or the last 20 s averaged"),
        Binding("a", "autoscale", "Autoscale", show=False, tooltip="batch chart y axis: the token budget, or "
                                                                   "autoscaled to the tallest column shown"),
        Binding("space", "replay_toggle", "Play/Pause", tooltip="replay: play / pause"),
        Binding("plus,equals_sign", "replay_speed(1)", "Faster", tooltip="replay: faster"),
        Binding("minus", "replay_speed(-1)", "Slower", tooltip="replay: slower"),
        Binding("comma", "replay_seek(-5)", "-5s", tooltip="replay: seek back 5 s"),
        Binding("full_stop", "replay_seek(5)", "+5s", tooltip="replay: seek forward 5 s"),
        Binding("q", "quit", "Quit", tooltip="quit (stops an in-process engine)"),
    ]
    ABORT_CONFIRM_S = 5.0  # a second x within this long aborts the request the first x named

    def __init__(self, client: Client, *, recorder: RecordingWriter | None = None, drivers: Iterable[Driver] = (),
                 refresh_hz: float = 10.0, plot_hz: float = 1.0, burst_size: int = 8, burst_prompt: int = 256,
                 burst_max_tokens: int = 64, window_s: float = 10.0, max_drain: int = 50_000, chart_span_s: float = 20.0,
                 history: int = 8192, table_hz: float = 2.0,
                 title: str | None = None) -> None:
        super().__init__()
        if refresh_hz > 10.0:
            raise ValueError(f"refresh_hz must be <= 10 (the console repaints at most 10 times a second), got {refresh_hz}")
        self.client = client
        self.recorder = recorder
        self.drivers = list(drivers)
        self.refresh_hz = refresh_hz
        # plotext takes tens of ms per frame: at most plot_hz frames/s (every tick in manual mode)
        self.plot_interval = 1.0 / plot_hz if plot_hz > 0 and refresh_hz > 0 else 0.0
        self.burst_size, self.burst_prompt, self.burst_max_tokens = burst_size, burst_prompt, burst_max_tokens
        self.max_drain = max_drain
        self.state = DashboardState(window_s=window_s, history=history)
        self.state.apply_snapshot(client.config_snapshot)
        self.frozen = False
        self._failure_shown = False  # the "engine failed" notification was shown
        self._exit_shown = False  # the "engine process ended" notification was shown
        self.per_iteration = False  # batch chart: one column per iteration, or the last chart_span_s averaged
        self.autoscale = False  # batch chart: y axis to the token budget, or to the tallest column shown
        self.request_view = RequestView()  # the request table's sort and filter
        self.shown_counts = self.state.request_counts  # what the tile and the table title show (one snapshot)
        self._abort_armed: tuple[str, float] | None = None  # (request id, until) after a first x
        self.chart_span_s = chart_span_s
        self.ticks = 0
        self.paints = 0
        self.last_result: CommandResult | None = None
        self._last_plot = float("-inf")
        self._last_table = float("-inf")
        # the request table re-renders every visible row on any cell change: at most table_hz times a second
        self.table_interval = 1.0 / table_hz if table_hz > 0 and refresh_hz > 0 else 0.0
        self._requests_seq = -1
        self._started = asyncio.Event()
        self._shut_down = False
        self._driver_workers: list[Any] = []
        self._dash: Any = None  # the dashboard screen (set on mount)
        self._widgets: dict[str, Any] = {}
        if title:
            self.title = title
        self.sub_title = client.description

    # -- layout ---------------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield StatusBar(id="status")
        with Horizontal(id="tiles"):
            for tid, title, spark in (("tput", "Throughput", True), ("reqs", "Requests", True),
                                      ("step", "Step time", True), ("kv", "KV cache", True)):
                with Vertical(classes="tile", id=f"tile-{tid}") as box:
                    box.border_title = title
                    if tid == "kv":
                        yield KvGauge(id="kv-gauge")
                    else:
                        yield StatTile(id=f"{tid}-text")
                    if spark:
                        yield Sparkline([], id=f"{tid}-spark")
            yield StatTile(title="Latency  p50    p99  ↑max", id="latency", classes="tile")
        with Horizontal(id="charts"):
            with Vertical(id="batch-box", classes="box") as box:
                box.border_title = ("Tokens/iteration [#4fc36b]█[/]decode [#5b9cf5]█[/]prefill [#8a8a8a]█[/]pad"
                                    " [#f2c744]│[/]change")
                yield BatchChart(id="batch-chart")
            with Vertical(id="tput-box", classes="box") as box:
                box.border_title = "tok/s [#4fc36b]⣿[/]gen [#5b9cf5]⣿[/]prompt [#f2c744]│[/]change"
                yield ThroughputPlot(id="tput-plot")
            with Vertical(id="side"):
                yield GpuPanel(title="GPU", id="gpu", classes="box")
                yield ServicePanel(title="SLO · tenants (window)", id="service", classes="box")
        with Horizontal(id="bottom"):
            with Vertical(id="requests-box", classes="box") as box:
                box.border_title = "Requests"
                yield RequestTable(id="requests")
            with Vertical(id="right"):
                yield SettingsPanel(title="Live settings", id="settings", classes="box")
                with Vertical(id="events-box", classes="box") as box:
                    box.border_title = "Events"
                    yield EventLog(id="events")
        yield Footer()

    # -- lifecycle --------------------------------------------------------------------------------
    async def on_mount(self) -> None:
        self._dash = self.screen
        self._w("#requests").focus()
        self._start_client()
        if self.refresh_hz > 0:
            self.set_interval(1.0 / self.refresh_hz, self.tick, name="telemetry")
        self.repaint()

    @work(exclusive=False, group="client", exit_on_error=False)
    async def _start_client(self) -> None:
        try:
            await self.client.start()
        except Exception as exc:
            self.state.note("error", f"client failed to start: {type(exc).__name__}: {exc}")
            return
        finally:
            self._started.set()
        self.state.apply_snapshot(self.client.config_snapshot)
        if self.recorder is not None and self.client.config_snapshot:
            self.recorder.config(self.client.config_snapshot, self.client.now())
        for driver in self.drivers:
            self._driver_workers.append(self.run_worker(driver(), group="drivers", exit_on_error=False))

    async def shutdown(self) -> None:
        """Stop the drivers and the client, close the recording (idempotent)."""
        if self._shut_down:
            return
        self._shut_down = True
        for worker in self._driver_workers:  # let each driver unwind while the engine still runs
            worker.cancel()
        for worker in self._driver_workers:
            try:
                await asyncio.wait_for(worker.wait(), timeout=5.0)
            except Exception:  # cancelled / failed / too slow: it is going away either way
                pass
        try:
            self._record_leftovers()
            await self.client.stop()
        finally:
            if self.recorder is not None:
                self._record_leftovers()
                self.recorder.close()

    def _record_leftovers(self) -> None:
        """What is still buffered goes into the recording (the screen no longer matters)."""
        if self.recorder is not None:
            msgs = self.client.drain()
            if msgs:
                self.recorder.write_messages(msgs)

    async def action_quit(self) -> None:
        await self.shutdown()
        self.exit()

    # -- the timer ----------------------------------------------------------------------------------
    def tick(self) -> None:
        """Drain telemetry into the ring buffers; repaint unless frozen."""
        if self._dash is None or self._shut_down or not self._dash.is_attached:
            return  # not mounted yet, or closing
        self.ticks += 1
        msgs = self.client.drain(self.max_drain)
        if msgs:
            if self.recorder is not None:
                self.recorder.write_messages(msgs)
            reset = next((i for i in range(len(msgs) - 1, -1, -1) if msgs[i].topic == "reset"), None)
            if reset is not None:  # a replay seeked backwards: start the picture again
                self._reset_view()
                msgs = msgs[reset + 1:]
            self.state.ingest(msgs)
        if not self.frozen:
            self.repaint()

    def _reset_view(self) -> None:
        snap = self.client.config_snapshot
        self.state = DashboardState(window_s=self.state.window_s, history=self.state.iterations.maxlen or 8192)
        self.state.apply_snapshot(snap)
        self._w("#requests").forget_rows()
        self._abort_armed = None
        self._w("#events").clear()
        self._requests_seq = -1
        self._last_plot = float("-inf")

    def _now(self) -> float | None:
        now = self.client.now()
        return now if now is not None else self.state.last_time

    def repaint(self) -> None:
        self.paints += 1
        st = self.state
        now = self._now()
        snap = st.snapshot(now)
        latest = st.latest
        cfg = st.config or {}
        with self.batch_update():
            self._paint_status(now)
            # tiles
            self._w("#tput-text").show(
                f"gen {fmt.rate(snap['generation_throughput'])} tok/s",
                f"prompt {fmt.rate(snap['prompt_throughput'])} tok/s")
            mono = time.monotonic()
            self._paint_requests(mono, now)
            counts = self.shown_counts
            self._w("#reqs-text").show(
                f"{counts.running} run · {counts.waiting} wait",
                f"{counts.preempted} preempted · {snap['num_preemptions']}/{st.window_s:g}s")
            step = snap["step_time"]
            self._w("#step-text").show(f"p50 {fmt.ms(step['p50'])}", f"p99 {fmt.ms(step['p99'])}")
            self._set_title("#tile-step", f"Step · {snap['iterations_per_s']:.0f} it/s")
            its = list(st.iterations)[-120:]
            self._w("#step-spark").data = [r.step_time for r in its] or [0.0]
            self._w("#reqs-spark").data = [r.num_requests_waiting for r in its] or [0.0]
            times, prompt_series, gen_series = st.throughput_series(now)
            self._w("#tput-spark").data = gen_series[-60:] or [0.0]
            info = st.engine_info
            self._w("#kv-gauge").show(
                latest.kv_blocks_used if latest else None, latest.kv_blocks_total if latest else info.get("num_blocks"),
                info.get("block_size"), snap["kv_cache_usage_peak"] if latest else None, snap.get("prefix_cache"))
            self._w("#kv-spark").data = [r.kv_cache_usage for r in its] or [0.0]
            ttft, itl, e2e = snap["time_to_first_token"], snap["inter_token_latency"], snap["e2e_request_latency"]
            self._w("#latency").show(
                f"TTFT {fmt.ms(ttft['p50']):>6} {fmt.ms(ttft['p99']):>6}",
                f"ITL  {fmt.ms(itl['p50']):>6} {fmt.ms(itl['p99']):>6} ↑{fmt.ms(itl['max'])}\n"
                f"E2E  {fmt.ms(e2e['p50']):>6} {fmt.ms(e2e['p99']):>6}", style="bold")
            # charts
            marks = list(st.marks)
            chart = self._w("#batch-chart")
            chart.set_data(st.iterations, marks, cfg.get("max_batched_tokens"),
                           None if self.per_iteration else self.chart_span_s, self.autoscale)
            self._set_subtitle("#batch-box", self.chart_caption())
            self._set_subtitle("#tput-box", spec_summary(snap["speculation"], cfg.get("spec_k")))
            if mono - self._last_plot >= self.plot_interval:
                if self._w("#tput-plot").set_data(times[-120:], prompt_series[-120:],
                                                                          gen_series[-120:], marks):
                    self._last_plot = mono
            # side panels
            self._w("#gpu").show(st.gpu, info.get("kv_pool_bytes"), info.get("device"))
            self._w("#service").show(snap["slo_attainment"], snap["service_per_tenant"],
                                                          snap["goodput"])
            self._w("#settings").show(st.config, st.bounds, st.version, st.paused)
            new_lines = st.take_new_log()
            if new_lines:
                self._w("#events").append(new_lines)

    def chart_caption(self) -> str:
        """The batch chart's subtitle: what it shows now, then what `z` / `a` switch to."""
        x = "1 column/iteration" if self.per_iteration else f"last {self.chart_span_s:g} s averaged"
        y = "y auto" if self.autoscale else "y budget"
        return f"{x} · {y} · keys z a"

    def _paint_requests(self, mono: float, now: float | None, force: bool = False) -> None:
        """The request table, its title and the Requests tile's counts, all from one snapshot (at most
        `table_hz` times a second: every visible row re-renders on any cell change)."""
        st = self.state
        if not force and (st.requests_seq == self._requests_seq or mono - self._last_table < self.table_interval):
            return
        self._requests_seq = st.requests_seq
        self._last_table = mono
        self.shown_counts = counts = st.request_counts
        try:
            rows = arrange(st.requests, self.request_view)
        except FilterError:  # checked when typed; a stale one shows everything
            rows = st.requests
        table = self._w("#requests")
        table.sync(rows, now)
        shown = f" · showing {len(rows)}" if len(rows) != counts.total else ""
        title = f"Requests: {counts.running} run · {counts.waiting} wait{shown} · {fmt.count(st.finished_total)} finished"
        self._set_title("#requests-box", title)
        self._set_subtitle("#requests-box", self.requests_caption())

    def requests_caption(self) -> str:
        """The request table's subtitle: the selection (and whether it is still there), a pending abort,
        the sort and filter."""
        table = self._w("#requests")
        parts = []
        armed = self._abort_armed
        if armed is not None and time.monotonic() > armed[1]:
            self._abort_armed = armed = None
        if armed is not None:
            parts.append(f"x again: abort {armed[0]} · esc cancels")
        elif table.selection_gone:
            parts.append(f"selected {self.selection_note(table.selected_id)}")
        view = self.request_view.describe()
        if view:
            parts.append(view)
        parts.append("s sort · / filter · ? help")
        return " · ".join(parts)

    def selection_note(self, request_id: str) -> str:
        """Why a selected request is not in the table: it finished, or the filter hides it."""
        status = self.state.request_status(request_id)
        if status == "live":
            return f"{request_id} is hidden by the filter"
        if status == "gone":
            return f"{request_id} has left the table"
        return f"{request_id} has {status}"

    def _w(self, selector: str) -> Any:
        """A dashboard widget (looked up on the dashboard screen, whatever screen is on top)."""
        widget = self._widgets.get(selector)
        if widget is None:
            widget = self._widgets[selector] = self._dash.query_one(selector)
        return widget

    def _set_subtitle(self, selector: str, subtitle: str) -> None:
        widget = self._w(selector)
        if widget.border_subtitle != subtitle:
            widget.border_subtitle = subtitle

    def _set_title(self, selector: str, title: str) -> None:
        widget = self._w(selector)
        if widget.border_title != title:
            widget.border_title = title

    def _paint_status(self, now: float | None) -> None:
        st = self.state
        client = self.client
        parts: list[tuple[str, str]] = [(self.title or "batchdeck", "bold"), (client.description, "dim")]
        link = client.state
        parts.append((f"● {link}", LINK_STYLE.get(link, "bold")))
        if link == ConnectionState.FAILED and not self._failure_shown:  # once: the log keeps the error line
            self._failure_shown = True
            self.notify(getattr(client, "failure", None) or "the engine failed", title="Engine failed",
                        severity="error", timeout=30)
        exit_note = getattr(client, "exit_note", None)
        if link == ConnectionState.OFFLINE and exit_note and not self._exit_shown:  # once, when the child ended
            self._exit_shown = True
            self.notify(exit_note, title="Engine offline", severity="error", timeout=30)
        status_text = getattr(client, "status_text", None)
        if status_text is not None:
            parts.append((status_text(), "bold cyan"))
        it = st.latest.iteration if st.latest else None
        parts.append((f"iteration {fmt.count(it)}", "bold"))
        if now is not None:
            parts.append((f"t={now:.1f}s", "dim"))
        if st.version is not None:
            parts.append((f"config v{st.version}", "dim"))
        if st.paused:
            parts.append(("ENGINE PAUSED", "bold magenta"))
        if self.frozen:
            parts.append(("DISPLAY FROZEN (f)", "bold reverse yellow"))
        if client.dropped:
            parts.append((f"{client.dropped} records dropped", "yellow"))
        if self.recorder is not None:
            parts.append((f"● REC {self.recorder.path.name}", "bold red"))
        self._w("#status").show(parts)

    # -- steering -------------------------------------------------------------------------------------
    def palette_context(self) -> tuple[Mapping[str, Any] | None, Mapping[str, Any] | None]:
        return self.state.config, self.state.bounds

    def _record(self, op: str, origin: str, result: CommandResult | None, **fields: Any) -> None:
        if self.recorder is None:
            return
        extra: dict[str, Any] = {"origin": origin, **fields}
        if result is not None:
            extra["ok"] = result.ok
            if result.error:
                extra["error"] = result.error
            if result.applied_iteration is not None:
                extra["applied_iteration"] = result.applied_iteration
        self.recorder.action(op, self.client.now(), **extra)

    def refuse(self, message: str, origin: str = "palette", op: str = "set", **fields: Any) -> None:
        """An operator input refused before anything was sent: say why, apply nothing."""
        self.notify(message, title="Refused — nothing applied", severity="error", timeout=8)
        self.state.note("refused", f"refused: {message}")
        self._record(op, origin, CommandResult(False, op, error=message), **fields)
        if self.frozen:
            return
        self.repaint()

    def request_changes(self, changes: Mapping[str, Any], origin: str = "palette") -> None:
        """Validate `changes` against the live config's bounds, then send them (in a worker)."""
        changes = dict(changes)
        if self.client.read_only:
            self.refuse("this is a replay: there is no engine to steer", origin, changes=changes)
            return
        error = validate(changes, self.state.config, self.state.bounds) if self.state.config else None
        if error is not None:
            self.refuse(error, origin, changes=changes)
            return
        self._send_changes(changes, origin)

    @work(group="steer", exit_on_error=False)
    async def _send_changes(self, changes: dict[str, Any], origin: str) -> CommandResult:
        result = await self.client.set(changes)
        self.last_result = result
        self._record("set", origin, result, changes=changes)
        if result.ok:
            if result.config:
                self.state.apply_config(result.config)
            self.notify(f"{format_changes(changes)} → took effect at iteration {result.applied_iteration}",
                        title="Applied", timeout=5)
        else:
            self.notify(result.error or "refused", title="Refused by the engine — nothing applied", severity="error",
                        timeout=8)
            self.state.note("refused", f"engine refused {format_changes(changes)}: {result.error}")
        return result

    async def run_command(self, op: str, origin: str = "key", **fields: Any) -> CommandResult:
        """pause / resume / abort / submit through the client, recorded and reported."""
        client = self.client
        if op == "pause":
            result = await client.pause()
        elif op == "resume":
            result = await client.resume()
        elif op == "abort":
            result = await client.abort(fields["request_id"])
        elif op == "submit":
            result = await client.submit(fields.pop("requests"))
            fields["count"] = len(result.data or []) if result.ok else fields.get("count")
        else:
            raise ValueError(f"unknown op {op!r}")
        self.last_result = result
        self._record(op, origin, result, **fields)
        if result.ok:
            if op in ("pause", "resume"):
                self.state.paused = op == "pause"
            msg = {"pause": "engine paused", "resume": "engine resumed",
                   "abort": f"aborted {fields.get('request_id')}",
                   "submit": f"submitted {len(result.data or [])} request(s)"}[op]
            self.notify(msg, timeout=3)
            if op in ("abort", "submit"):
                self.state.note("action", f"operator: {msg}")
        else:
            self.notify(result.error or "refused", title=f"{op} refused", severity="error", timeout=8)
            self.state.note("refused", f"{op} refused: {result.error}")
        return result

    @work(group="steer", exit_on_error=False)
    async def _run_command(self, op: str, origin: str, fields: dict[str, Any]) -> CommandResult:
        return await self.run_command(op, origin, **fields)

    # -- actions (keys, palette) -----------------------------------------------------------------------
    REPLAY_ACTIONS = frozenset({"replay_toggle", "replay_speed", "replay_seek"})
    STEERING_ACTIONS = frozenset({"config", "toggle_pause", "burst", "abort_selected", "pause", "resume",
                                  "cancel_abort"})

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """Replay keys only in a replay, steering keys only with an engine behind the client."""
        if action in self.REPLAY_ACTIONS:
            return self.client.read_only
        if action in self.STEERING_ACTIONS:
            return not self.client.read_only
        return True

    def action_config(self) -> None:
        if not self.state.config:
            self.refuse("no config from the engine yet", "panel", op="config")
            return

        def done(changes: dict[str, Any] | None) -> None:
            if changes:
                self.request_changes(changes, origin="panel")

        self.push_screen(ConfigScreen(self.state.config, self.state.bounds), done)

    def action_toggle_pause(self) -> None:
        self._run_command("resume" if self.state.paused else "pause", "key", {})

    def action_pause(self) -> None:
        self._run_command("pause", "palette", {})

    def action_resume(self) -> None:
        self._run_command("resume", "palette", {})

    def action_burst(self) -> None:
        burst = make_burst(self.burst_size, self.burst_prompt, self.burst_max_tokens)
        self._run_command("submit", "key", {"requests": burst, "count": len(burst)})

    def action_abort_selected(self) -> None:
        """First x: name the selected request and wait for a second x (within ABORT_CONFIRM_S) that aborts
        exactly that request; never a different one that slid under the cursor."""
        table = self._w("#requests")
        armed, self._abort_armed = self._abort_armed, None
        if table.selection_gone:
            self.refuse(f"the selected request {self.selection_note(table.selected_id)}: nothing aborted; "
                        "select another request", "key", op="abort", request_id=table.selected_id)
            self._refresh_requests_caption()
            return
        rid = table.selected_request_id
        if rid is None:
            self.refuse("no request selected: move the cursor onto a row of the request table", "key", op="abort")
            return
        if armed is not None and armed[0] == rid and time.monotonic() <= armed[1]:
            self._refresh_requests_caption()
            self._run_command("abort", "key", {"request_id": rid})
            return
        self._abort_armed = (rid, time.monotonic() + self.ABORT_CONFIRM_S)
        self.notify(f"abort {rid}? press x again within {self.ABORT_CONFIRM_S:g} s (esc cancels)",
                    title="Confirm abort", timeout=self.ABORT_CONFIRM_S)
        self._refresh_requests_caption()

    def action_cancel_abort(self) -> None:
        if self._abort_armed is not None:
            self._abort_armed = None
            self.notify("abort cancelled", timeout=2)
            self._refresh_requests_caption()

    def _refresh_requests_caption(self) -> None:
        self._set_subtitle("#requests-box", self.requests_caption())

    # the request table's view
    def set_request_view(self, view: RequestView) -> None:
        self.request_view = view
        self._paint_requests(time.monotonic(), self._now(), force=True)

    def action_sort_next(self) -> None:
        self.set_request_view(next_sort(self.request_view))

    def action_sort_reverse(self) -> None:
        v = self.request_view
        self.set_request_view(RequestView(v.sort, not v.descending, v.filter))

    def action_sort_by(self, key: str) -> None:
        if key not in SORT_KEYS:
            self.refuse(f"unknown sort key {key!r}: one of {', '.join(SORT_KEYS)}", op="sort")
            return
        self.set_request_view(RequestView(key, key in ("ttft", "age"), self.request_view.filter))

    def action_filter_requests(self) -> None:
        def done(text: str | None) -> None:
            if text is not None:
                self.apply_filter(text)

        self.push_screen(FilterScreen(self.request_view.filter), done)

    def apply_filter(self, text: str) -> None:
        """Filter the request table by `text` (request_view's syntax); a bad filter is refused."""
        try:
            parse_filter(text)
        except FilterError as exc:
            self.refuse(str(exc), op="filter")
            return
        v = self.request_view
        self.set_request_view(RequestView(v.sort, v.descending, text.strip()))

    def action_autoscale(self) -> None:
        self.autoscale = not self.autoscale
        if not self.frozen:
            self.repaint()

    def help_sections(self) -> list[tuple[str, str, list[tuple[str, str]]]]:
        """What the help screen lists: the app's keys, the request table's, the config panel's, and the
        palette's commands (from the same lists the bindings and the palette use)."""
        keys = key_rows(self.BINDINGS, self.get_key_display)
        config_keys = key_rows(ConfigScreen.BINDINGS, self.get_key_display)
        config, bounds = self.palette_context()
        return [("Keys", "key", keys + list(TABLE_KEYS)),
                ("In the config panel", "key", config_keys),
                ("Palette commands (ctrl+p, typed as `key value`)", "command",
                 [("ctrl+p", "open the palette")] + command_rows(config, bounds))]

    def action_help(self) -> None:
        if isinstance(self.screen, HelpScreen):
            return
        self.push_screen(HelpScreen(self.help_sections()))

    def action_freeze(self) -> None:
        self.frozen = not self.frozen
        self._record("freeze" if self.frozen else "unfreeze", "key", None)
        if not self.frozen:
            self.repaint()
        else:
            self._paint_status(self._now())
        self.notify("display frozen: telemetry is still collected; f to thaw" if self.frozen else "display live",
                    timeout=3)

    def action_zoom(self) -> None:
        self.per_iteration = not self.per_iteration
        if not self.frozen:
            self.repaint()

    # replay controls (a no-op on a live engine)
    def action_replay_toggle(self) -> None:
        toggle = getattr(self.client, "toggle", None)
        if toggle is not None:
            toggle()
            self._paint_status(self._now())

    def action_replay_speed(self, step: int) -> None:
        faster = getattr(self.client, "faster", None)
        if faster is not None:
            faster(step > 0)
            self._paint_status(self._now())

    def action_replay_seek(self, seconds: float) -> None:
        seek = getattr(self.client, "seek", None)
        if seek is not None:
            seek(self.client.position + seconds)
            self.tick()
