"""What the dashboard shows, kept apart from the widgets: ring buffers fed with telemetry messages.

`DashboardState.ingest()` is called with each batch the UI drains; it only appends to bounded
deques and updates a few fields (O(1) per record), so a burst of telemetry costs little. Whatever
is derived (window metrics, plots) is computed when the UI repaints, at most a few times a second.
Pure: no clock, no Textual; `now` comes from the caller.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from batchdeck.engine.service.gpu_monitor import GpuSample
from batchdeck.engine.service.metrics import MetricsWindow
from batchdeck.engine.telemetry import Event, IterationRecord


@dataclass(frozen=True)
class Mark:
    """Where a config change took effect (drawn on the plots)."""

    iteration: int
    time: float
    label: str


@dataclass(frozen=True)
class LogLine:
    time: float | None
    kind: str  # config_change, preemption, request_rejected, error, pause, resume, action, notice, refused
    text: str


def format_changes(changes: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in changes.items())


def format_event(event: Event) -> LogLine:
    """One log line for an engine event."""
    d = event.data
    src = f" ({d['source']})" if d.get("source") else ""
    if event.kind == "config_change":
        it = d.get("applied_iteration", event.iteration)
        ver = f" v{d['version']}" if d.get("version") is not None else ""
        text = f"config{ver} {format_changes(d.get('changes') or {})} → it {it}{src}"
    elif event.kind == "preemption":
        text = f"preempt {d.get('request_id', '?')} {d.get('tenant', '-')} ×{d.get('num_preemptions', 1)}" \
               f" it {event.iteration}"
    elif event.kind == "request_rejected":
        text = f"rejected {d.get('request_id', '?')}: {d.get('error', '')}"
    elif event.kind == "error":
        text = f"ERROR {d.get('message', '')}"
    elif event.kind == "pause":  # event.iteration is the next iteration to run; the header shows the last done
        text = (f"paused after it {event.iteration - 1:,}" if event.iteration else "paused before it 0") + src
    elif event.kind == "resume":
        text = f"resumed at it {event.iteration:,}{src}"
    else:
        extra = " ".join(f"{k}={v}" for k, v in d.items())
        text = f"{event.kind} @ it {event.iteration} {extra}".rstrip()
    return LogLine(event.time, event.kind, text)


def format_action(action: Mapping[str, Any]) -> LogLine:
    """A recorded action (shown when a recording is replayed): the operator's, or a preset's step."""
    op = action.get("op", "?")
    who = "operator" if action.get("source") in (None, "console") and action.get("origin") != "preset" else \
        str(action.get("source"))
    if op == "replay":
        return LogLine(action.get("time"), "notice", f"preset {action.get('preset', '?')} starts")
    if op == "set" and not action.get("changes") and action.get("typed"):
        what = action["typed"]  # refused before it parsed into changes: what the operator typed
    elif op == "set":
        what = f"set {format_changes(action.get('changes') or {})}"
    elif op == "abort":
        what = f"abort {action.get('request_id', '?')}"
    elif op == "submit":
        what = f"submit {action.get('count', 1)} request(s)"
    elif op == "pause" and action.get("pause") is not None:
        what = f"pause {action['pause']:g}s"
    else:
        what = str(op)
    if "ok" not in action:
        return LogLine(action.get("time"), "notice", f"{who}: {what}")
    result = "ok" if action.get("ok") else f"refused: {action.get('error', '')}"
    if action.get("ok") and action.get("applied_iteration") is not None:
        result = f"it {action['applied_iteration']}"
    return LogLine(action.get("time"), "action" if action.get("ok") else "refused", f"{who}: {what} → {result}")


RUNNING_STATES = frozenset({"prefill", "decode", "running"})


@dataclass(frozen=True)
class RequestCounts:
    """Requests in the engine right now, from one request-table snapshot (minus those finished since):
    the Requests tile and the request table's title both show these."""

    running: int = 0
    waiting: int = 0  # preempted ones included
    preempted: int = 0
    shown: int = 0  # rows in the snapshot (the engine caps them)

    @property
    def total(self) -> int:
        return self.running + self.waiting


class DashboardState:
    def __init__(self, window_s: float = 10.0, history: int = 600, bin_s: float = 0.5, bins: int = 240,
                 max_log: int = 2000, max_marks: int = 64) -> None:
        self.window_s = window_s
        self.metrics = MetricsWindow(window_s)
        self.iterations: deque[IterationRecord] = deque(maxlen=history)
        self.latest: IterationRecord | None = None
        self.bin_s = bin_s
        self.bins: deque[list[float]] = deque(maxlen=bins)  # [bin index, prompt tokens, generated tokens]
        self.marks: deque[Mark] = deque(maxlen=max_marks)
        self.log: deque[LogLine] = deque(maxlen=max_log)
        self._new_log: list[LogLine] = []
        self.config: dict[str, Any] | None = None
        self.bounds: dict[str, Any] | None = None
        self.engine_info: dict[str, Any] = {}
        self.version: int | None = None
        self.requests: dict[str, dict[str, Any]] = {}
        self.requests_seq = 0  # bumps with every request-table snapshot
        self.request_counts = RequestCounts()
        self.finished_ids: dict[str, str] = {}  # recently finished request id -> finish reason (bounded)
        self.max_finished_ids = 4096
        self.gpu: GpuSample | None = None
        self.paused = False
        self.last_time: float | None = None  # the newest engine time seen in any record
        self.counts: dict[str, int] = {}
        self.preemptions_total = 0
        self.finished_total = 0
        self.seq = 0  # bumps with every ingested batch that changed something

    # -- input ----------------------------------------------------------------------------------
    def apply_snapshot(self, snapshot: Mapping[str, Any] | None) -> None:
        """A config snapshot ({"config", "bounds", "version", "engine"}) from the client."""
        if not snapshot:
            return
        if snapshot.get("config") is not None:
            self.config = dict(snapshot["config"])
            self.version = snapshot.get("version", self.config.get("version"))
        if snapshot.get("bounds") is not None:
            self.bounds = dict(snapshot["bounds"])
        if snapshot.get("engine") is not None:
            self.engine_info = dict(snapshot["engine"])
        if isinstance(snapshot.get("paused"), bool):
            self.paused = snapshot["paused"]
        self.seq += 1

    def apply_config(self, config: Mapping[str, Any]) -> None:
        """The whole live config after a change (a `set` reply)."""
        self.config = dict(config)
        self.version = self.config.get("version", self.version)
        self.seq += 1

    def ingest(self, messages: Iterable[tuple[str, Any]]) -> int:
        n = 0
        for topic, record in messages:
            self.ingest_one(topic, record)
            n += 1
        if n:
            self.seq += 1
        return n

    def _saw_time(self, t: Any) -> None:
        if isinstance(t, (int, float)) and (self.last_time is None or t > self.last_time):
            self.last_time = float(t)

    def ingest_one(self, topic: str, record: Any) -> None:
        self.counts[topic] = self.counts.get(topic, 0) + 1
        if topic == "iteration":
            self._iteration(record)
        elif topic == "request":
            self.metrics.add_request(record)
            self.finished_total += 1
            finished = self.finished_ids
            finished[record.request_id] = str(record.finish_reason)
            if len(finished) > self.max_finished_ids:
                del finished[next(iter(finished))]
            row = self.requests.pop(record.request_id, None)
            if row is not None:  # gone from the table now, not at the next snapshot (none comes when idle)
                self.requests_seq += 1
                self._count_departure(row)
            self._saw_time(record.finish or record.arrival + record.e2e_latency)
        elif topic == "event":
            self._event(record)
        elif topic == "requests":
            rows = record.get("requests") or []
            self.requests = {str(r.get("request_id")): r for r in rows if isinstance(r, Mapping)}
            self.request_counts = counts_of(record, self.requests)
            self.requests_seq += 1
            self._saw_time(record.get("time"))
        elif topic == "gpu":
            self.gpu = record
        elif topic == "action":
            self._add_log(format_action(record))
        elif topic == "config":  # a retained config snapshot (attach mode)
            self.apply_snapshot(record)

    def _count_departure(self, row: Mapping[str, Any]) -> None:
        c = self.request_counts
        if row.get("state") in RUNNING_STATES:
            self.request_counts = RequestCounts(max(0, c.running - 1), c.waiting, c.preempted, max(0, c.shown - 1))
        else:  # aborted while waiting
            pre = 1 if row.get("state") == "preempted" else 0
            self.request_counts = RequestCounts(c.running, max(0, c.waiting - 1), max(0, c.preempted - pre),
                                                max(0, c.shown - 1))

    def _iteration(self, rec: IterationRecord) -> None:
        self.iterations.append(rec)
        self.metrics.add_iteration(rec)
        if self.latest is None or rec.iteration >= self.latest.iteration:
            self.latest = rec
        self.preemptions_total += rec.num_preemptions
        self._saw_time(rec.time)
        idx = int(rec.time // self.bin_s)
        bins = self.bins
        if bins and bins[-1][0] == idx:
            b = bins[-1]
        elif not bins or idx > bins[-1][0]:
            if bins:  # keep idle stretches visible as zeros (a bounded gap)
                for gap in range(int(bins[-1][0]) + 1, min(idx, int(bins[-1][0]) + 1 + (bins.maxlen or 0))):
                    bins.append([gap, 0.0, 0.0])
            b = [idx, 0.0, 0.0]
            bins.append(b)
        else:
            return  # out of order and older than the newest bin: the window metrics have it
        b[1] += rec.num_prefill_tokens
        b[2] += rec.num_generated_tokens

    def _event(self, event: Event) -> None:
        self._saw_time(event.time)
        if event.kind == "config_change":
            d = event.data
            it = int(d.get("applied_iteration", event.iteration))
            self.marks.append(Mark(it, event.time, format_changes(d.get("changes") or {})))
            if self.config is not None and isinstance(d.get("config"), Mapping):
                self.config.update(d["config"])  # what the engine runs with (a new policy's default params...)
            elif self.config is not None and isinstance(d.get("changes"), Mapping):
                self.config.update(d["changes"])  # recordings made before events carried the config
            if d.get("version") is not None:
                self.version = d["version"]
                if self.config is not None:
                    self.config["version"] = d["version"]
        elif event.kind == "pause":
            self.paused = True
        elif event.kind == "resume":
            self.paused = False
        self._add_log(format_event(event))

    def note(self, kind: str, text: str, time: float | None = None) -> None:
        """A console-side line in the event log (a refusal, an operator action)."""
        self._add_log(LogLine(self.last_time if time is None else time, kind, text))
        self.seq += 1

    def _add_log(self, line: LogLine) -> None:
        self.log.append(line)
        self._new_log.append(line)
        if len(self._new_log) > (self.log.maxlen or 2000):
            del self._new_log[: len(self._new_log) - (self.log.maxlen or 2000)]

    def take_new_log(self) -> list[LogLine]:
        out, self._new_log = self._new_log, []
        return out

    # -- derived ----------------------------------------------------------------------------------
    def snapshot(self, now: float | None) -> dict[str, Any]:
        """Window metrics at `now` (engine time; default: the newest record's time)."""
        if now is None:
            now = self.last_time or 0.0
        return self.metrics.snapshot(now)

    def throughput_series(self, now: float | None = None) -> tuple[list[float], list[float], list[float]]:
        """(times, prompt tok/s, generation tok/s) per completed bin, oldest first."""
        bins = list(self.bins)
        if bins and now is not None and (bins[-1][0] + 1) * self.bin_s > now:
            bins = bins[:-1]  # the newest bin is still filling
        times = [(b[0] + 1) * self.bin_s for b in bins]
        return times, [b[1] / self.bin_s for b in bins], [b[2] / self.bin_s for b in bins]

    def request_status(self, request_id: str) -> str:
        """'live', 'finished (<reason>)' or 'unknown' (left the table without a record seen)."""
        if request_id in self.requests:
            return "live"
        reason = self.finished_ids.get(request_id)
        return f"finished ({reason})" if reason is not None else "gone"


def counts_of(record: Mapping[str, Any], rows: Mapping[str, Mapping[str, Any]]) -> RequestCounts:
    """The counts a request-table snapshot states (an older recording without them: its rows counted)."""
    running = sum(1 for r in rows.values() if r.get("state") in RUNNING_STATES)
    preempted = sum(1 for r in rows.values() if r.get("state") == "preempted")
    waiting = len(rows) - running

    def given(key: str, fallback: int) -> int:
        value = record.get(key)
        return value if isinstance(value, int) and value >= 0 else fallback

    return RequestCounts(given("num_running", running), given("num_waiting", waiting),
                         given("num_preempted", preempted), len(rows))
