"""A real `batchdeck serve` HTTP server on a free loopback port, run in a thread with its own loop."""
from __future__ import annotations

import asyncio
import threading
from typing import Any

from batchdeck.engine.config import EngineConfig, LiveConfig
from batchdeck.engine.llm_engine import LLMEngine
from batchdeck.engine.service.async_engine import AsyncEngine
from batchdeck.engine.service.bus import Bus
from batchdeck.engine.service.http.server import start_http_server

TINY = dict(model="synthetic:tiny", device="cpu", dtype="float32", block_size=16, num_blocks=512)


class ServerThread:
    def __init__(self, engine_kw: dict[str, Any] | None = None, live: LiveConfig | None = None, **server_kw: Any):
        self.bus = Bus()
        self.llm = LLMEngine(EngineConfig(**{**TINY, **(engine_kw or {})}), live or LiveConfig(), sink=self.bus)
        self.engine = AsyncEngine(self.llm)
        self.server_kw = server_kw
        self.records: list = []  # every RequestRecord, in finish order
        self.bus.add_listener(lambda _t, r: self.records.append(r), {"request"})
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.server: Any = None
        self._thread = threading.Thread(target=self._run, name="test-http-server", daemon=True)

    def start(self) -> "ServerThread":
        self._thread.start()
        if not self._ready.wait(60):
            raise RuntimeError("the test server did not start in 60 s")
        if self._error is not None:
            raise self._error
        return self

    def _run(self) -> None:
        async def main() -> None:
            self.loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            try:
                await self.engine.start()
                self.server = await start_http_server(self.engine, self.bus, host="127.0.0.1", port=0,
                                                      **self.server_kw)
            except BaseException as exc:  # noqa: BLE001 - reported to the test thread
                self._error = exc
                self._ready.set()
                return
            self._ready.set()
            await self._stop.wait()
            await self.server.stop()
            await self.engine.stop()

        asyncio.run(main())

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def base_url(self) -> str:
        return self.server.url + "/v1"

    def call(self, coro: Any, timeout: float = 60) -> Any:
        """Run a coroutine on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        if self.loop is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(30)


def wait_for(condition, timeout: float = 30.0, interval: float = 0.01, what: str = "condition") -> None:
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class ProcessServerThread(ServerThread):
    """The same server with its engine in a child process (EngineProcess), as `batchdeck serve` runs by
    default: `engine` is the EngineProcess, `bus` the child's telemetry published again here, `rc` the
    value run_serve_process returned once it ended."""

    def __init__(self, engine_kw: dict[str, Any] | None = None, live: LiveConfig | None = None,
                 runner_kw: dict[str, Any] | None = None, **server_kw: Any):
        from batchdeck.engine.service.engine_process import EngineProcess, ServeEngineSpec

        spec = ServeEngineSpec(EngineConfig(**{**TINY, **(engine_kw or {})}), live or LiveConfig(),
                               {"status_interval": 0, "gpu_interval": 0, **(runner_kw or {})}, log_level="warning")
        self.engine = EngineProcess(spec)
        self.bus = self.engine.bus
        self.llm = None  # the engine lives in the child: ask `engine.state()`
        self.server_kw = server_kw
        self.records: list = []
        self.bus.add_listener(lambda _t, r: self.records.append(r), {"request"})
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.server: Any = None
        self.rc: int | None = None
        self._thread = threading.Thread(target=self._run, name="test-http-server", daemon=True)

    def _run(self) -> None:
        from batchdeck.engine.service.http.server import run_serve_process

        def ready(server: Any) -> None:
            self.server = server
            self._ready.set()

        async def main() -> None:
            self.loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            try:
                self.rc = await run_serve_process(self.engine, host="127.0.0.1", port=0, on_ready=ready,
                                                  install_signals=False, stop=self._stop, **self.server_kw)
            except BaseException as exc:  # noqa: BLE001 - reported to the test thread
                self._error = exc
                self._ready.set()

        asyncio.run(main())

    def state(self) -> dict[str, int]:
        return self.call(self.engine.state())

    def stop(self) -> None:
        """As SIGINT does: drain, then end."""
        if self.loop is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(60)
