"""`EngineProcessClient`: the console's engine in a child process, so the UI never shares its GIL.

The in-process console costs the engine's worker thread a share of the interpreter every repaint;
here the child process builds exactly what the in-process mode builds (`console.cli._inprocess`: the
LLMEngine, its AsyncEngine, the telemetry Bus, the GPU monitor and the steady workload or preset
player) and the parent keeps only the UI. They talk over one pipe (engine/service/process_link.py):

  child -> parent  ("ready", info) | ("error", ExceptionBlob) once, at start;
                   ("telemetry", [(topic, record), ...], dropped, engine_clock) every `interval_s`;
                   ("reply", call_id, CommandResult, config_snapshot) for each command.
  parent -> child  ("call", call_id, op, args): start, get, set, pause, resume, abort, submit, stop.

Records are the engine's own dataclasses, pickled. Nothing in the child waits on the pipe: the engine
thread publishes on the child's Bus into the console's bounded drop-oldest subscription; a task on the
child's loop takes what accumulated once per interval (one batch, not one message per record) and a
sender thread pickles and writes it, so a slow parent holds up neither the engine nor the loop that
delivers its outputs (past MAX_PENDING_BATCHES unsent batches, new ones are dropped and counted). The
drop count travels with each batch and shows as "records dropped", as in-process.

Lifetimes: the child is a daemon process, and it stops its engine and exits as soon as its end of
the pipe reads EOF, so it ends with the parent however the parent ends (quit, exception, SIGKILL).
It ignores SIGINT (the parent's terminal owns the keyboard). A startup failure (bad flag, model that
does not load) is re-raised in the parent as the same exception type with the same message, so the
command line reports it exactly as it does for the in-process engine.
"""
from __future__ import annotations

import asyncio
import itertools
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from batchdeck.console.client import Client, CommandResult, ConnectionState, TelemetryMessage
from batchdeck.engine.service.process_link import (ExceptionBlob, Sender, await_ready, read_to_loop, spawn_child,
                                                   stop_process)

__all__ = ["EngineProcessClient", "EngineSpec", "ExceptionBlob", "child_main"]

INTERVAL_S = 0.05  # telemetry batches per second: 20, twice the fastest repaint
START_TIMEOUT_S = 600.0  # loading a large model on a slow disk
REPLY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
MAX_PENDING_BATCHES = 100  # telemetry batches (5 s) waiting for a slow parent before new ones are dropped
OPS = ("start", "get", "set", "pause", "resume", "abort", "submit", "stop")


@dataclass
class EngineSpec:
    """What the child needs to build the console's engine (all picklable)."""

    preset: Any = None  # a Preset, a shipped preset's name or a YAML path; None: quickstart's steady load
    overrides: dict[str, Any] = field(default_factory=dict)  # EngineConfig fields and live keys
    speed: float = 1.0
    duration_scale: float = 1.0
    steady_load: bool = True
    interval_s: float = INTERVAL_S
    announce: bool = True  # print "loading <model> …" on stderr, as the in-process console does
    # instead of the console's own build: a picklable callable (a module-level function, or a
    # functools.partial of one) returning (InProcessClient, drivers, title), e.g. a benchmark's engine
    builder: Callable[[], tuple[Any, list, str | None]] | None = None


# -- the child --------------------------------------------------------------------------------------
def child_main(conn: Any, spec: EngineSpec) -> None:
    """The child process's entry point (module-level, so the spawn context can import it)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        asyncio.run(_serve(conn, spec))
    finally:
        conn.close()


async def _serve(conn: Any, spec: EngineSpec) -> None:
    from batchdeck.console.cli import _inprocess

    # Once the engine runs, messages leave through a sender thread, so a parent that reads slowly (or
    # not at all) never holds up this loop, which delivers the engine's outputs and runs the drivers.
    sender = Sender(conn)
    send, outbox = sender.send, sender
    lost = 0  # telemetry records dropped here because the parent fell MAX_PENDING_BATCHES behind

    def say(line: str) -> None:
        if spec.announce:
            print(line, file=sys.stderr, flush=True)

    try:
        if spec.builder is not None:
            client, drivers, title = spec.builder()
        else:
            client, drivers, title = _inprocess(spec.preset, None, spec.overrides, spec.speed, spec.duration_scale,
                                                None, say, spec.steady_load)
    except BaseException as exc:  # noqa: BLE001 - every startup failure goes to the parent as is
        send(("error", ExceptionBlob.of(exc)))
        return
    send(("ready", {"snapshot": client.config_snapshot, "description": client.description, "title": title,
                    "drivers": len(drivers)}))
    # from now on the parent's UI owns the terminal: what would be printed goes to it as ("output", text)
    sys.stdout = sys.stderr = _Forwarded(outbox.put)

    inbox: asyncio.Queue = asyncio.Queue()
    read_to_loop(conn, asyncio.get_running_loop(), inbox.put_nowait, "engine-process-control")
    tasks: list[asyncio.Task] = []
    forwarder: asyncio.Task | None = None

    def flush() -> None:
        nonlocal lost
        msgs = client.drain()
        if not msgs:
            return
        if outbox.pending() >= MAX_PENDING_BATCHES:
            lost += len(msgs)
            return
        outbox.put(("telemetry", [(m.topic, m.record) for m in msgs], client.dropped + lost, client.now()))

    async def forward() -> None:
        while True:
            await asyncio.sleep(spec.interval_s)
            flush()

    async def call(cid: int, op: str, args: tuple) -> None:
        nonlocal forwarder
        try:
            if op == "start":
                await client.start()
                tasks.extend(asyncio.create_task(driver(), name=f"driver-{i}") for i, driver in enumerate(drivers))
                forwarder = asyncio.create_task(forward(), name="telemetry-forwarder")
                result = CommandResult(True, "start")
            else:
                result = await getattr(client, {"get": "get_config"}.get(op, op))(*args)
        except Exception as exc:  # a bug, not an operator mistake: still an answer, never a hang
            result = CommandResult(False, op, error=f"{type(exc).__name__}: {exc}")
        outbox.put(("reply", cid, result, client.config_snapshot))

    sender.start()
    pending: set[asyncio.Task] = set()
    stop_id = None
    try:
        while True:
            msg = await inbox.get()
            if msg is None:
                break
            _, cid, op, args = msg
            if op == "stop":
                stop_id = cid
                break
            task = asyncio.create_task(call(cid, op, args))
            pending.add(task)
            task.add_done_callback(pending.discard)
    finally:
        for task in tasks:  # the drivers unwind while the engine still runs
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if forwarder is not None:
            forwarder.cancel()
            await asyncio.gather(forwarder, return_exceptions=True)
        await asyncio.gather(*pending, return_exceptions=True)
        await client.stop()
        flush()  # the last records, before the reply that says the engine has stopped
        if stop_id is not None:
            outbox.put(("reply", stop_id, CommandResult(True, "stop"), client.config_snapshot))
        await sender.close(STOP_TIMEOUT_S)


class _Forwarded:
    """The child's stdout/stderr once the UI runs: text travels to the parent, which prints it after
    the console closes (`console.cli.run_console`; in-process, the UI's print capture swallows it)."""

    def __init__(self, send: Callable[[tuple], Any]) -> None:
        self._send = send

    def write(self, text: str) -> int:
        if text:
            self._send(("output", text))
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


# -- the parent ---------------------------------------------------------------------------------------
class EngineProcessClient(Client):
    """The console's client for an engine in a child process; the same steering and telemetry as
    `InProcessClient`. Construction starts the child and returns once its engine is built (the model
    loaded), or raises the child's startup error."""

    kind = "engine-process"

    def __init__(self, spec: EngineSpec, *, start_timeout: float = START_TIMEOUT_S,
                 reply_timeout: float = REPLY_TIMEOUT_S, maxsize: int = 20000) -> None:
        super().__init__(maxsize)
        self.spec = spec
        self.reply_timeout = reply_timeout
        self.state = ConnectionState.CONNECTING
        self.process, self._conn = spawn_child(child_main, spec)
        self._send_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._local_dropped = 0
        self._remote_dropped = 0
        self._clock: float | None = None
        self._clock_seen = 0.0
        self.exit_note: str | None = None
        self._started = False  # telemetry is held back until start() returns, as in-process
        self.output: deque[str] = deque(maxlen=2000)  # what the child printed while the UI ran
        info = self._await_ready(start_timeout)
        self.config_snapshot = info["snapshot"]
        self.description = info["description"].replace("in-process", "engine process")
        self.title = info["title"]
        self.state = ConnectionState.CONNECTED
        self._reader = threading.Thread(target=self._read, name="engine-process-reader", daemon=True)
        self._reader.start()

    def _await_ready(self, timeout: float) -> dict[str, Any]:
        return await_ready(self.process, self._conn, timeout)

    def _kill(self) -> None:
        stop_process(self.process, 0)

    # -- the reader thread ------------------------------------------------------------------------
    def _read(self) -> None:
        inbox = self._inbox
        while True:
            try:
                msg = self._conn.recv()
            except (EOFError, OSError):
                break
            kind = msg[0]
            if kind == "telemetry":
                _, batch, dropped, clock = msg
                overflow = len(inbox) + len(batch) - inbox.maxlen
                if overflow > 0:
                    self._local_dropped += min(overflow, len(batch) + len(inbox))
                inbox.extend(TelemetryMessage(t, r) for t, r in batch)
                self.received += len(batch)
                self._remote_dropped = dropped
                self.dropped = self._local_dropped + self._remote_dropped
                if clock is not None:
                    self._clock, self._clock_seen = clock, time.monotonic()
            elif kind == "output":
                self.output.append(msg[1])
            elif kind == "reply":
                _, cid, result, snapshot = msg
                waiter = self._pending.pop(cid, None)
                if waiter is not None:
                    loop, fut = waiter
                    loop.call_soon_threadsafe(_resolve, fut, (result, snapshot))
        if self.state != ConnectionState.STOPPED:
            self.process.join(1)
            self.exit_note = exit_note(self.process.exitcode)
            self.state = ConnectionState.OFFLINE
        self._fail_pending(self.exit_note or "the engine process has stopped")

    def _fail_pending(self, why: str) -> None:
        for cid in list(self._pending):
            waiter = self._pending.pop(cid, None)
            if waiter is not None:
                loop, fut = waiter
                try:
                    loop.call_soon_threadsafe(_resolve, fut, (CommandResult(False, "?", error=why), None))
                except RuntimeError:  # that loop is closed: nobody waits any more
                    pass

    def now(self) -> float | None:
        if self._clock is None:
            return None
        if self.state == ConnectionState.CONNECTED:
            return self._clock + min(time.monotonic() - self._clock_seen, 2.0)
        return self._clock

    # -- commands -----------------------------------------------------------------------------------
    async def _call(self, op: str, *args: Any, timeout: float | None = None) -> CommandResult:
        if self.state != ConnectionState.CONNECTED:
            return CommandResult(False, op, error=self.exit_note or f"the engine process is {self.state}")
        cid = next(self._ids)
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._pending[cid] = (loop, fut)
        try:
            with self._send_lock:
                self._conn.send(("call", cid, op, args))
            result, snapshot = await asyncio.wait_for(fut, timeout=timeout or self.reply_timeout)
        except asyncio.TimeoutError:
            return CommandResult(False, op, error=f"no reply from the engine process within {timeout or self.reply_timeout:g}s")
        except (OSError, EOFError) as exc:
            return CommandResult(False, op, error=f"the engine process is gone: {type(exc).__name__}: {exc}")
        finally:
            self._pending.pop(cid, None)
        if snapshot is not None:
            self.config_snapshot = snapshot
        result.op = op
        return result

    async def start(self) -> None:
        result = await self._call("start", timeout=START_TIMEOUT_S)
        if not result.ok:
            raise RuntimeError(result.error)
        self._started = True

    def drain(self, max_items: int | None = None) -> list[TelemetryMessage]:
        return super().drain(max_items) if self._started or self.state == ConnectionState.STOPPED else []

    async def stop(self) -> None:
        if self.state == ConnectionState.CONNECTED:
            await self._call("stop", timeout=STOP_TIMEOUT_S)
        self.state = ConnectionState.STOPPED
        await asyncio.to_thread(self._join)

    def _join(self) -> None:
        self.process.join(STOP_TIMEOUT_S)  # it exits once stopped; our reader then reads EOF
        self._kill()
        self._reader.join(5)
        self._conn.close()

    async def get_config(self) -> CommandResult:
        result = await self._call("get")
        if result.ok:
            result.config = self.config_snapshot
        return result

    async def set(self, changes: Mapping[str, Any]) -> CommandResult:
        return await self._call("set", dict(changes))

    async def pause(self) -> CommandResult:
        return await self._call("pause")

    async def resume(self) -> CommandResult:
        return await self._call("resume")

    async def abort(self, request_id: str) -> CommandResult:
        return await self._call("abort", str(request_id))

    async def submit(self, requests: Mapping[str, Any] | Iterable[Mapping[str, Any]]) -> CommandResult:
        items = [dict(requests)] if isinstance(requests, Mapping) else [dict(r) for r in requests]
        return await self._call("submit", items)


def exit_note(exitcode: int | None) -> str:
    """What the operator is told when the engine process ends on its own (a negative exit code is the
    signal that ended it, as multiprocessing reports it)."""
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"the engine process was killed by {name}"
    if exitcode is None:
        return "the engine process closed its pipe and is still running"
    return f"the engine process ended (exit code {exitcode})"


def _resolve(fut: asyncio.Future, value: Any) -> None:
    if not fut.done():
        fut.set_result(value)
