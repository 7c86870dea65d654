"""The engine in its own process for `batchdeck serve` (the API server / engine core split of vLLM):
the HTTP event loop and the engine's iterations no longer share one interpreter lock.

The child runs what the in-process `serve` runs: the engine, its AsyncEngine worker thread and a
`HeadlessRunner` (status lines, `--mqtt` telemetry and control, the GPU sampler, draining). The
parent keeps the HTTP server, tokenization and detokenization, and talks to the child through
`EngineProcess`, which offers what the server uses of an AsyncEngine (add_request, abort,
update_config, pause, resume, error, finished_observers, clock, served_model) plus a local `bus`
on which the child's telemetry is published again, record for record, so /metrics stays exact.

Over the pipe (engine/service/process_link.py framing):

  parent -> child  ("call", id, op, args): add, abort, set, pause, resume, state, drain.
  child -> parent  ("ready", {"served": ServedModel}) | ("error", ExceptionBlob) once, at start;
                   ("reply", id, ok, value | ExceptionBlob) per call;
                   ("out", outputs, finished, records) once per engine iteration that produced
                     outputs (and every FLUSH_INTERVAL_S for telemetry alone): every request's new
                     tokens as (request_id, new_token_ids, finished, finish_reason, logprobs),
                     each finished request's (request_id, token_times) for the inter-token
                     histogram, and the (topic, record) pairs the engine published since the last
                     message (iteration, request, event, gpu), in order and never dropped;
                   ("failed", message) when an engine step raised (the engine stops stepping);
                   ("exit", rc) last.

Outputs and telemetry of one iteration travel in one message, records first, so a client that
has its last token finds its request already counted in /metrics. Arrival times: the parent stamps
a request with time.monotonic() when its HTTP request comes in (the same clock in every process);
the child turns the stamp into engine time. Lifetimes: the child ignores SIGINT and SIGTERM (the
parent owns them and asks it to drain), and drains and exits as soon as its end of the pipe reads
EOF, so it ends with the parent however the parent ends. If the child dies, every open stream and
waiting command fails with EngineDeadError and `error` is set (the server answers 503).
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from batchdeck.engine.llm_engine import RequestOutput
from batchdeck.engine.request import RequestError, SamplingParams
from batchdeck.engine.service.async_engine import ConfigReply, RequestStream, deliver_outputs
from batchdeck.engine.service.bus import Bus
from batchdeck.engine.service.process_link import (ExceptionBlob, Sender, await_ready, read_to_loop, spawn_child,
                                                   stop_process)
from batchdeck.engine.service.protocol import METRICS_TOPICS
from batchdeck.engine.service.request_table import requests_counts
from batchdeck.engine.service.served_model import EngineDeadError, ServedModel

log = logging.getLogger(__name__)

FLUSH_INTERVAL_S = 0.05  # telemetry without outputs (idle engine, events, GPU samples) waits at most this
START_TIMEOUT_S = 900.0  # loading a large model on a slow disk
EXIT_TIMEOUT_S = 60.0


@dataclass
class ServeEngineSpec:
    """What the child needs to build the engine and its runner (all picklable)."""

    cfg: Any  # EngineConfig
    live: Any  # LiveConfig
    runner: dict[str, Any] = field(default_factory=dict)  # HeadlessRunner keywords (settings, engine_id, ...)
    log_level: str = "info"
    prog: str = "batchdeck serve"


@dataclass
class FinishedRequest:
    """What `finished_observers` get of a request finished in the child: its output token times."""

    request_id: str
    token_times: list[float]


# -- the child ------------------------------------------------------------------------------------------
def child_main(conn: Any, spec: ServeEngineSpec) -> None:
    """The child process's entry point (module-level, so the spawn context can import it)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent owns both: it asks us to drain
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    rc = 1
    try:
        rc = asyncio.run(_child(conn, spec))
    finally:
        conn.close()
    sys.exit(rc)


async def _child(conn: Any, spec: ServeEngineSpec) -> int:
    from batchdeck.engine.service.logs import configure_logging
    from batchdeck.engine.service.serve_runner import build_serve_runner

    sender = Sender(conn)
    try:
        configure_logging(spec.log_level)
        runner = build_serve_runner(spec.cfg, spec.live, spec.runner, prog=spec.prog, install_signals=False,
                                    engine_process=os.getpid())
    except BaseException as exc:  # noqa: BLE001 - every startup failure goes to the parent as is
        sender.send(("error", ExceptionBlob.of(exc)))
        return 1
    return await _ChildBridge(runner, conn, sender, spec).run()


class _Forward:
    """Stands in for a RequestStream in the child's AsyncEngine: its outputs go to the parent."""

    __slots__ = ("request_id", "_bridge")

    def __init__(self, request_id: str, bridge: _ChildBridge):
        self.request_id = request_id
        self._bridge = bridge

    def _put(self, out: RequestOutput) -> None:
        self._bridge.output(out)

    def _fail(self, error: BaseException) -> None:
        """Nothing to forward: the ("failed", message) the bridge sends ends every stream in the parent."""


class _ChildBridge:
    def __init__(self, runner: Any, conn: Any, sender: Sender, spec: ServeEngineSpec):
        self.runner = runner
        self.conn = conn
        self.engine = runner.engine  # the AsyncEngine
        self.llm = runner.llm
        self.sender = sender
        self.spec = spec
        self._outputs: list[tuple] = []
        self._finished: list[tuple[str, list[float]]] = []
        self._records: deque[tuple[str, Any]] = deque()  # appended by the engine thread, taken on the loop
        self._scheduled = False
        self._failed_sent = False
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- what goes to the parent ------------------------------------------------------------------
    def output(self, out: RequestOutput) -> None:
        # RequestOutput's fields in order: the parent rebuilds it with RequestOutput(*fields)
        self._outputs.append((out.request_id, out.new_token_ids, out.finished, out.finish_reason, out.logprobs,
                              out.top_logprobs))
        self._schedule()

    def _observe_finished(self, r: Any) -> None:
        self._finished.append((r.request_id, r.token_times))
        self._schedule()

    def _schedule(self) -> None:
        """One message per iteration: every output of one delivery is put before the flush runs."""
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        records, take = [], self._records.popleft
        while self._records:
            records.append(take())
        if not (records or self._outputs or self._finished):
            return
        outputs, finished = self._outputs, self._finished
        self._outputs, self._finished = [], []
        self.sender.put(("out", outputs, finished, records))

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_S)
            self.flush()
            if self.engine.error is not None and not self._failed_sent:
                self._failed_sent = True
                self.sender.put(("failed", str(EngineDeadError.of(self.engine.error))))

    # -- commands from the parent ---------------------------------------------------------------------
    def _on_message(self, msg: Any) -> None:
        if msg is None:  # the parent is gone: drain and exit
            self._stop("the server process ended")
            return
        _, cid, op, args = msg
        task = asyncio.ensure_future(self._call(cid, op, args))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _stop(self, why: str) -> None:
        if self.runner.stop_event is not None and not self.runner.stop_event.is_set():
            self.runner.request_stop(why)

    async def _call(self, cid: int, op: str, args: tuple) -> None:
        try:
            value, ok = await self._do(op, args), True
        except Exception as exc:  # noqa: BLE001 - the parent re-raises it
            value, ok = ExceptionBlob.of(exc), False
        self.flush()  # outputs the command produced (an abort's) go first
        self.sender.put(("reply", cid, ok, value))

    async def _do(self, op: str, args: tuple) -> Any:
        engine = self.engine
        if op == "add":
            request_id, prompt_ids, sampling, kwargs, stamp = args
            if stamp is not None:  # the parent's time.monotonic() at arrival, as engine time
                kwargs["arrival_time"] = self.llm.clock() - max(0.0, time.monotonic() - stamp)
            await engine.add_request(request_id, prompt_ids, sampling, stream=_Forward(request_id, self), **kwargs)
            return None
        if op == "abort":
            return await engine.abort(*args)
        if op == "set":
            return await engine.update_config(*args)
        if op == "pause":
            return await engine.pause(*args)
        if op == "resume":
            return await engine.resume(*args)
        if op == "state":
            return await engine.call(_engine_state)
        if op == "drain":
            self._stop(*args)
            return None
        raise ValueError(f"unknown engine process command {op!r}")

    async def run(self) -> int:
        self._loop = asyncio.get_running_loop()
        self._tasks: set[asyncio.Task] = set()
        self._listener = self.runner.bus.add_listener(
            lambda t, r: self._records.append((t, requests_counts(r) if t == "requests" else r)), METRICS_TOPICS,
            name="engine-process")
        self.engine.finished_observers.append(self._observe_finished)
        run = asyncio.create_task(self.runner.run())
        monitor = None
        try:
            started = asyncio.ensure_future(self.runner.wait_started())
            await asyncio.wait([run, started], return_when=asyncio.FIRST_COMPLETED)
            if not started.done():  # the runner ended before its engine ran (an MQTT setting, say)
                started.cancel()
                exc = run.exception() or RuntimeError(f"the engine runner exited with status {run.result()}")
                self.sender.send(("error", ExceptionBlob.of(exc)))
                return 1
            from batchdeck.engine.service.serve_runner import start_metrics_gpu_monitor

            monitor = start_metrics_gpu_monitor(self.runner)
            self.sender.send(("ready", {"served": self.engine.served_model(), "pid": os.getpid()}))  # first
            self.sender.start()
            read_to_loop(self.conn, self._loop, self._on_message, "engine-process-control")
            flusher = asyncio.create_task(self._flush_loop())
            rc = 1
            try:
                rc = await run
            finally:
                flusher.cancel()
                await asyncio.gather(flusher, return_exceptions=True)
        finally:
            if monitor is not None:
                monitor.cancel()
            if not run.done():
                self._stop("error")
                await asyncio.gather(run, return_exceptions=True)
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.flush()
        if self.engine.error is not None and not self._failed_sent:
            self.sender.put(("failed", str(EngineDeadError.of(self.engine.error))))
        self.sender.put(("exit", rc))
        await self.sender.close(EXIT_TIMEOUT_S)
        return rc


def _engine_state(e: Any) -> dict[str, int]:
    """What tests and tools ask of the child's engine: its requests and KV blocks right now."""
    return {"num_running": len(e.scheduler.running), "num_waiting": len(e.scheduler.waiting),
            "num_blocks": e.blocks.num_blocks, "num_used_blocks": e.blocks.num_used,
            "num_free_blocks": e.blocks.num_free, "iteration": e.iteration}


# -- the parent -----------------------------------------------------------------------------------------
class EngineProcess:
    """The server's handle on an engine in a child process. Construction starts the child and returns
    once its model is loaded (or raises the child's startup error, as the in-process engine would);
    `start()` on the serving loop begins reading its messages."""

    def __init__(self, spec: ServeEngineSpec, *, start_timeout: float = START_TIMEOUT_S):
        self.spec = spec
        self.process, self._conn = spawn_child(child_main, spec)
        info = await_ready(self.process, self._conn, start_timeout)
        self._served: ServedModel = info["served"]
        self.pid: int = info["pid"]
        self.bus = Bus()  # the child's telemetry, published again here
        self.finished_observers: list[Callable[[Any], None]] = []
        self.error: BaseException | None = None
        self.exit_code: int | None = None
        self.died = False  # it ended without saying so (killed, crashed)
        self._streams: dict[str, RequestStream] = {}
        self._waiters: dict[int, asyncio.Future] = {}
        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ended: asyncio.Event | None = None

    # -- lifecycle ------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._ended = asyncio.Event()
        read_to_loop(self._conn, self._loop, self._on_message, "engine-process-reader")

    @property
    def running(self) -> bool:
        return self._ended is not None and not self._ended.is_set()

    async def drain(self, why: str = "stop") -> None:
        """Ask the child to stop as `batchdeck engine` stops on a signal: stop admitting, give in-flight
        requests the runner's drain timeout, abort the rest, exit."""
        if self.running:
            try:
                await self._call("drain", why)
            except EngineDeadError:
                pass

    async def wait(self) -> int:
        """Until the child has ended; its exit status (1 if it died without saying)."""
        assert self._ended is not None, "start() first"
        await self._ended.wait()
        if self.exit_code is None:
            await asyncio.to_thread(self.process.join, EXIT_TIMEOUT_S)  # it died (killed by a signal: a negative exitcode): a failure
            code = self.process.exitcode
            self.exit_code = code if code is not None and code > 0 else 1
        return self.exit_code

    async def stop(self) -> int:
        """Drain the child, wait for it (killing it if it hangs) and return its exit status."""
        await self.drain("stop")
        if self._ended is not None:
            try:
                await asyncio.wait_for(self._ended.wait(), EXIT_TIMEOUT_S)
            except asyncio.TimeoutError:
                pass
        await asyncio.to_thread(stop_process, self.process, EXIT_TIMEOUT_S)
        self._conn.close()
        return self.exit_code if self.exit_code is not None else 1

    # -- what the server uses -------------------------------------------------------------------------
    def clock(self) -> float:
        """time.monotonic(): arrival stamps the child turns into engine time."""
        return time.monotonic()

    def served_model(self) -> ServedModel:
        return self._served

    async def add_request(self, request_id: str, prompt_token_ids: list[int],
                          sampling: SamplingParams | None = None, **kwargs: Any) -> RequestStream:
        """As AsyncEngine.add_request; `arrival_time` is on this handle's clock."""
        if request_id in self._streams:
            raise RequestError(f"request id {request_id!r} is already in use")
        if self.error is not None:
            raise EngineDeadError.of(self.error)
        stamp = kwargs.pop("arrival_time", None)
        stream = RequestStream(request_id)
        self._streams[request_id] = stream
        try:
            await self._call("add", request_id, list(prompt_token_ids), sampling, kwargs, stamp)
        except BaseException:
            if self._streams.get(request_id) is stream:
                del self._streams[request_id]
            raise
        return stream

    async def abort(self, request_id: str, reason: str = "abort") -> bool:
        """Finish a request at the child's next iteration boundary (its KV blocks return to the pool)."""
        if not self.running:
            return False
        try:
            return await self._call("abort", request_id, reason)
        except EngineDeadError:
            return False

    async def update_config(self, changes: Mapping[str, Any], source: str = "api") -> ConfigReply:
        return await self._call("set", dict(changes), source)

    async def pause(self, source: str = "api") -> int:
        return await self._call("pause", source)

    async def resume(self, source: str = "api") -> int:
        return await self._call("resume", source)

    async def state(self) -> dict[str, int]:
        """The child engine's running / waiting requests and KV blocks now."""
        return await self._call("state")

    # -- the pipe ---------------------------------------------------------------------------------------
    async def _call(self, op: str, *args: Any) -> Any:
        if not self.running:
            raise EngineDeadError(str(self.error or "the engine process has ended"))
        cid = next(self._ids)
        fut = self._loop.create_future()
        self._waiters[cid] = fut
        try:
            self._conn.send(("call", cid, op, args))
        except (OSError, EOFError, ValueError) as exc:
            self._waiters.pop(cid, None)
            raise EngineDeadError(f"the engine process is gone: {type(exc).__name__}: {exc}") from None
        return await fut

    def _on_message(self, msg: Any) -> None:
        if msg is None:
            self._gone()
            return
        kind = msg[0]
        if kind == "out":
            self._deliver(msg[1], msg[2], msg[3])
        elif kind == "reply":
            _, cid, ok, value = msg
            fut = self._waiters.pop(cid, None)
            if fut is not None and not fut.done():
                if ok:
                    fut.set_result(value)
                else:
                    fut.set_exception(value.rebuild())
        elif kind == "failed":
            self._fail(EngineDeadError(msg[1]))
        elif kind == "exit":  # its last word: it is done (its interpreter may take a moment to go)
            self.exit_code = msg[1]
            self._gone()

    def _deliver(self, outputs: list[tuple], finished: list[tuple[str, list[float]]],
                 records: list[tuple[str, Any]]) -> None:
        publish = self.bus.publish
        for topic, record in records:
            publish(topic, record)
        if finished:
            for observe in self.finished_observers:
                for request_id, times in finished:
                    observe(FinishedRequest(request_id, times))
        deliver_outputs(self._streams, itertools.starmap(RequestOutput, outputs))

    def _fail(self, error: EngineDeadError, quiet: bool = False) -> None:
        """The engine can serve no more: every open stream and waiting command gets `error`."""
        if self.error is None:
            self.error = error
            if not quiet:
                log.error(error.describe())
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream._fail(self.error)

    def _gone(self) -> None:
        if self._ended.is_set():  # EOF after ("exit", rc)
            return
        if self.exit_code is None:  # no ("exit", rc): it died
            self.died = True
            self.process.join(1)
            self._fail(EngineDeadError(f"the engine process (pid {self.pid}) exited unexpectedly "
                                       f"(exit code {self.process.exitcode})"))
        else:
            self._fail(EngineDeadError("the engine process has stopped"), quiet=True)
        waiters, self._waiters = self._waiters, {}
        for fut in waiters.values():
            if not fut.done():
                fut.set_exception(EngineDeadError.of(self.error))
        self._ended.set()
