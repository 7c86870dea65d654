"""`AsyncEngine`: the engine's iterations in one worker thread, driven from an asyncio loop.

Everything that touches engine state runs in the worker thread between iterations: requests,
aborts, config changes and pause/resume are queued as commands and executed at the next
boundary, so nothing is mutated mid-step. Output deltas come back to the loop once per iteration.
"""
from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Iterable, Mapping

from batchdeck.engine.llm_engine import LLMEngine, RequestOutput
from batchdeck.engine.request import FinishReason, Request, RequestError, SamplingParams
from batchdeck.engine.service import heap_freeze
from batchdeck.engine.service.request_table import requests_message
from batchdeck.engine.service.served_model import EngineDeadError, ServedModel


class RequestStream:
    """Async iterator of a request's output deltas; ends after the finishing delta, or raises the
    error handed to `_fail` (EngineDeadError: the engine can no longer serve it).

    One buffer and at most one waiting future, settled by the first delta put: no queue machinery
    on the per-token path (the loop that puts is the loop that reads)."""

    __slots__ = ("request_id", "_items", "_waiter", "finished", "token_ids", "finish_reason")

    def __init__(self, request_id: str):
        self.request_id = request_id
        self._items: deque[RequestOutput | BaseException] = deque()
        self._waiter: asyncio.Future | None = None
        self.finished = False
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None

    def _put(self, out: RequestOutput | BaseException) -> None:
        self._items.append(out)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        """End the stream with `exc` (after the deltas already put)."""
        self._put(exc)

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self

    async def __anext__(self) -> RequestOutput:
        items = self._items
        while not items:
            if self.finished:
                raise StopAsyncIteration
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                if self._waiter is waiter:
                    self._waiter = None
        out = items.popleft()
        if isinstance(out, BaseException):
            self.finished = True
            items.clear()
            raise out
        if out.new_token_ids:
            self.token_ids.extend(out.new_token_ids)
        if out.finished:
            self.finished = True
            self.finish_reason = out.finish_reason
        return out

    async def collect(self) -> list[int]:
        async for _ in self:
            pass
        return self.token_ids


@dataclass
class ConfigReply:
    config: dict[str, Any]
    applied_iteration: int


class AsyncEngine:
    def __init__(self, engine: LLMEngine, snapshot_interval: float = 0.25):
        self.engine = engine
        self.snapshot_interval = snapshot_interval  # how often a `requests` table snapshot is emitted
        self._last_snapshot = float("-inf")
        self._queue_changed = False  # commands ran since the last request-table snapshot
        self.paused = False
        self._commands: queue.SimpleQueue[tuple[Callable[[], Any], asyncio.Future | None]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._frozen = False  # this engine holds the collector's freeze (engine/service/heap_freeze.py) until stop()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._streams: dict[str, RequestStream] = {}
        self.error: BaseException | None = None
        self.failed = asyncio.Event()  # set on the loop once a step raised (`error` says what)
        # Called on the loop with each request that finished in an iteration (no longer mutated by the
        # engine): what the telemetry records summarize, e.g. every inter-token gap for /metrics.
        self.finished_observers: list[Callable[[Request], None]] = []

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start stepping the engine; the collector's freeze is held from here until `stop()` ends."""
        if self.running:
            raise RuntimeError("AsyncEngine.start: the engine is already running (stop it first)")
        self._loop = asyncio.get_running_loop()
        if not self._frozen:
            heap_freeze.hold()
            self._frozen = True
        self._launch()

    async def stop(self) -> None:
        self._stop.set()
        try:
            await self._join()
        finally:  # a cancelled stop still gives the hold back
            if self._frozen:
                self._frozen = False
                heap_freeze.release()

    def _launch(self) -> None:
        """Start the stepping (here: the worker thread)."""
        self._thread = threading.Thread(target=self._worker, name="batchdeck-engine", daemon=True)
        self._thread.start()

    async def _join(self) -> None:
        """Wake the stepping (`_stop` is set) and wait for it to end."""
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- commands (run in the worker thread between iterations) --------------------------------
    async def call(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """Run `fn(engine)` in the worker thread at the next iteration boundary and return its result."""
        fut = asyncio.get_running_loop().create_future()
        self._commands.put((lambda: fn(self.engine), fut))
        self._wake.set()
        return await fut

    def clock(self) -> float:
        """Now on the engine clock (what `add_request(arrival_time=...)` takes)."""
        return self.engine.clock()

    def served_model(self) -> ServedModel:
        return ServedModel.of(self.engine)

    async def add_request(self, request_id: str, prompt_token_ids: list[int],
                          sampling: SamplingParams | None = None, *, stream: Any = None,
                          **kwargs: Any) -> RequestStream:
        """Queue a request; raises RequestError for bad input, EngineDeadError once the engine has
        failed. Returns its output stream (`stream`: instead of a new RequestStream, any object with
        `_put(RequestOutput)` and `_fail(EngineDeadError)`, which then receives the request's outputs
        on the loop, e.g. to forward them to another process)."""
        if self.error is not None:
            raise EngineDeadError.of(self.error)
        if request_id in self._streams:
            raise RequestError(f"request id {request_id!r} is already in use")
        stream = RequestStream(request_id) if stream is None else stream
        self._streams[request_id] = stream
        try:
            await self.call(lambda e: e.add_request(request_id, prompt_token_ids, sampling, **kwargs))
        except Exception:
            if self._streams.get(request_id) is stream:
                del self._streams[request_id]
            raise
        return stream

    async def abort(self, request_id: str, reason: str = "abort") -> bool:
        """Finish a request at the next iteration boundary (its KV blocks return to the pool);
        False if it was unknown or already done. `reason`: see LLMEngine.abort."""
        aborted = await self.call(lambda e: e.abort(request_id, FinishReason(reason)) is not None)
        if aborted:
            self.deliver_abort(request_id, reason)
        return aborted

    async def update_config(self, changes: Mapping[str, Any], source: str = "api") -> ConfigReply:
        """Validate and apply at the next boundary; raises ConfigError and changes nothing if invalid."""
        def apply(e: LLMEngine) -> ConfigReply:
            new = e.update_config(changes, source)
            e.apply_pending_config()
            return ConfigReply(new.to_dict(), e.iteration)

        return await self.call(apply)

    async def pause(self, source: str = "api") -> int:
        def do(e: LLMEngine) -> int:
            if not self.paused:
                self.paused = True
                e.emit_event("pause", source=source)
            return e.iteration

        return await self.call(do)

    async def resume(self, source: str = "api") -> int:
        """Step again after a pause; refused (EngineDeadError) once a step failed."""
        def do(e: LLMEngine) -> int:
            if self.error is not None:
                raise EngineDeadError.of(self.error)
            if self.paused:
                self.paused = False
                e.emit_event("resume", source=source)
            return e.iteration

        return await self.call(do)

    # -- the worker -----------------------------------------------------------------------------
    def _run_commands(self) -> None:
        while True:
            try:
                fn, fut = self._commands.get_nowait()
            except queue.Empty:
                return
            self._queue_changed = True  # an arrival, abort or pause: the request table may differ
            try:
                result, error = fn(), None
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                result, error = None, exc
            if fut is not None:
                self._loop.call_soon_threadsafe(_settle, fut, result, error)

    def _report_failure(self, exc: BaseException) -> None:
        """A step raised: keep the error, report it as an event, stop stepping (paused), and end every
        open request's stream, after the outputs already delivered, with an EngineDeadError naming it
        (what an engine process's failure gives its streams: the server sends `engine_failed`)."""
        self.error = exc
        self.engine.emit_event("error", message=str(EngineDeadError.of(exc)))
        self.paused = True
        if self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._fail_streams)
            except RuntimeError:
                pass  # loop closed under us: nobody is listening any more

    def _fail_streams(self) -> None:
        """(On the loop) the engine failed: every open stream ends with an EngineDeadError. A request
        added later is refused (add_request), so none is left waiting."""
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream._fail(EngineDeadError.of(self.error))
        self.failed.set()

    def _idle_wait_s(self) -> float:
        """How long to wait when nothing could be scheduled: until a static batch is due, at most 50 ms."""
        wait = self.engine.scheduler.pending_static_wait(self.engine.clock())
        return min(wait if wait is not None else 0.01, 0.05) + 1e-4

    def _worker(self) -> None:
        engine = self.engine
        while not self._stop.is_set():
            self._run_commands()
            if self.paused or not engine.has_unfinished:
                if self._queue_changed:  # arrivals while paused stay visible (no iteration reports them)
                    self._publish_requests(time.monotonic(), force=not engine.has_unfinished)
                self._wake.wait(0.1)
                self._wake.clear()
                continue
            try:
                result = engine.step()
            except BaseException as exc:  # noqa: BLE001 - reported, engine stops stepping
                self._report_failure(exc)
                continue
            if result is None:
                self._wake.wait(self._idle_wait_s())
                self._wake.clear()
                continue
            self._publish_requests(time.monotonic())
            if result.outputs and self._loop is not None and not self._loop.is_closed():
                try:
                    self._loop.call_soon_threadsafe(self._deliver, result.outputs, result.finished)
                except RuntimeError:
                    pass  # loop closed under us: nobody is listening any more
        self._run_commands()

    def _publish_requests(self, now: float, force: bool = False) -> None:
        """The request-table snapshot, at most every `snapshot_interval` (`force`: now, e.g. the queue
        just emptied). `num_running` / `num_waiting` / `num_preempted` count every request, the rows
        are capped (engine/service/request_table.py)."""
        if not force and now - self._last_snapshot < self.snapshot_interval:
            return
        self._last_snapshot = now
        self._queue_changed = False
        self.engine.sink("requests", requests_message(self.engine))

    def _deliver(self, outputs: list[RequestOutput], finished: list[Request] = ()) -> None:
        for observe in self.finished_observers:
            for r in finished:
                observe(r)
        deliver_outputs(self._streams, outputs)

    def deliver_abort(self, request_id: str, reason: str = "abort") -> None:
        """Close a request's stream after an abort (called on the loop)."""
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream._put(RequestOutput(request_id, [], True, reason))


def deliver_outputs(streams: dict[str, Any], outputs: Iterable[RequestOutput]) -> None:
    """One iteration's outputs into each open request's stream; a finished request's stream is
    forgotten. (An AsyncEngine's streams, and the server's streams of an engine process: EngineProcess.)"""
    for out in outputs:
        stream = streams.get(out.request_id)
        if stream is not None:
            stream._put(out)
            if out.finished:
                del streams[out.request_id]


def _settle(fut: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)
