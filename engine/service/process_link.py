"""A child process and the pipe to it: what the console's engine process (console/engine_process.py)
and the server's (engine/service/engine_process.py) share.

- `spawn_child(target, *args)`: a daemon child (spawn context) running `target(conn, *args)`; the
  parent keeps the only parent end of one duplex `multiprocessing.Pipe`, so the child reads EOF as
  soon as the parent is gone, however it ends (quit, exception, SIGKILL).
- Framing: every message is a tuple whose first item names its kind. At start the child sends
  ("ready", info) or ("error", ExceptionBlob) exactly once (`await_ready` waits for it); afterwards
  the parent's commands are ("call", call_id, op, args) and the child's answers ("reply", call_id, ...).
- `Sender`: the child's writes leave through one thread, so nothing that produces messages (the
  engine's outputs, the telemetry) waits on a parent that reads slowly.
- `read_to_loop`: a thread that hands every message read to an asyncio loop (None at EOF).
- `ExceptionBlob`: an exception crossing the pipe, rebuilt as the same type with the same message.
- `stop_process`: join, then terminate, then kill.
"""
from __future__ import annotations

import asyncio
import multiprocessing
import pickle
import queue
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable


@dataclass
class ExceptionBlob:
    """An exception from the child, rebuilt in the parent as the same type with the same message even
    when its class cannot be unpickled (a custom `__init__`, as ConfigError has)."""

    module: str
    name: str
    message: str
    attrs: dict[str, Any]
    pickled: bytes | None

    @classmethod
    def of(cls, exc: BaseException) -> ExceptionBlob:
        try:
            pickled = pickle.dumps(exc)
        except Exception:
            pickled = None
        attrs = {}
        for k, v in vars(exc).items():
            try:
                pickle.dumps(v)
            except Exception:
                continue
            attrs[k] = v
        return cls(type(exc).__module__, type(exc).__qualname__, str(exc), attrs, pickled)

    def rebuild(self) -> BaseException:
        if self.pickled is not None:
            try:
                exc = pickle.loads(self.pickled)
                if str(exc) == self.message:
                    return exc
            except Exception:
                pass
        cls = getattr(sys.modules.get(self.module), self.name, None)
        if isinstance(cls, type) and issubclass(cls, Exception):
            exc = cls.__new__(cls)
            Exception.__init__(exc, self.message)
            exc.__dict__.update(self.attrs)
            return exc
        return RuntimeError(f"{self.name}: {self.message}")


def spawn_child(target: Callable[..., None], *args: Any, name: str = "batchdeck-engine"
                ) -> tuple[multiprocessing.process.BaseProcess, Any]:
    """Start `target(conn, *args)` in a daemon child (spawn: nothing of this process's threads or
    CUDA state is inherited; the child gets this process's environment, PYTHONPATH included).
    Returns (process, the parent's end of the pipe)."""
    ctx = multiprocessing.get_context("spawn")
    conn, child_conn = ctx.Pipe(duplex=True)
    process = ctx.Process(target=target, args=(child_conn, *args), name=name, daemon=True)
    process.start()
    child_conn.close()  # ours is the only parent end: the child sees EOF when we go
    return process, conn


def await_ready(process: Any, conn: Any, timeout: float) -> Any:
    """The child's ("ready", info) `info`; its startup error re-raised here; RuntimeError if it exits
    or stays silent past `timeout` (then it is killed)."""
    deadline = time.monotonic() + timeout
    while not conn.poll(0.05):
        if not process.is_alive() and not conn.poll(0):
            raise RuntimeError(f"the engine process exited (code {process.exitcode}) before its engine was ready")
        if time.monotonic() > deadline:
            stop_process(process, 0)
            raise RuntimeError(f"the engine process was not ready within {timeout:g}s")
    try:
        msg = conn.recv()
    except EOFError:
        process.join(5)
        raise RuntimeError(f"the engine process exited (code {process.exitcode}) before its engine was ready") from None
    if msg[0] == "error":
        process.join(10)
        stop_process(process, 0)
        raise msg[1].rebuild()
    return msg[1]


def stop_process(process: Any, timeout: float) -> None:
    """Wait up to `timeout` s for the child to exit, then terminate it, then kill it."""
    process.join(timeout)
    if process.is_alive():
        process.terminate()
        process.join(5)
    if process.is_alive():
        process.kill()
        process.join(5)


class Sender:
    """The child's writes to the pipe. `send` writes now (under a lock: before the thread runs, or from
    any thread); `put` queues for the sender thread, so the caller never waits on the parent."""

    def __init__(self, conn: Any, name: str = "engine-process-sender"):
        self._conn = conn
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def send(self, msg: tuple) -> bool:
        """False once the parent is gone."""
        try:
            with self._lock:
                self._conn.send(msg)
            return True
        except (OSError, EOFError, BrokenPipeError, ValueError):
            return False

    def start(self) -> None:
        self._thread.start()

    def put(self, msg: tuple) -> None:
        self._queue.put(msg)

    def pending(self) -> int:
        """Messages queued and not yet written."""
        return self._queue.qsize()

    def _run(self) -> None:
        while (msg := self._queue.get()) is not None:
            self.send(msg)

    async def close(self, timeout: float) -> None:
        """Write what is queued, then stop the thread."""
        self._queue.put(None)
        if self._thread.is_alive():
            await asyncio.to_thread(self._thread.join, timeout)


def read_to_loop(conn: Any, loop: asyncio.AbstractEventLoop, handle: Callable[[Any], None],
                 name: str = "engine-process-reader") -> threading.Thread:
    """A started daemon thread calling `handle(msg)` on `loop` for every message read, then
    `handle(None)` at EOF (the other end is gone)."""
    def read() -> None:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                msg = None
            try:
                loop.call_soon_threadsafe(handle, msg)
            except RuntimeError:  # the loop is closed: nobody listens any more
                return
            if msg is None:
                return

    thread = threading.Thread(target=read, name=name, daemon=True)
    thread.start()
    return thread
