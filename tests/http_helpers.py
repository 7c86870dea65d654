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
