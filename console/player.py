"""`--replay FILE`: a recording (engine/service/recording.py: the console's `--record`, or
`batchdeck replay --record`) played back with no engine, as a read-only `Client`: play, pause, speed, seek.

Playback follows the records' engine time: a record is released once the play position reaches its
time (records without one go with the record before them). Seeking back restarts the dashboard
(a `("reset", None)` message) and fast-forwards to the target.
"""
from __future__ import annotations

import asyncio
import bisect
from pathlib import Path
from typing import Any, Iterable, Mapping

from batchdeck.console.client import Client, CommandResult, ConnectionState
from batchdeck.engine.service.recording import read_recording

SPEEDS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)


class ReplayClient(Client):
    kind = "replay"
    read_only = True

    def __init__(self, path: str | Path, *, speed: float = 1.0, autoplay: bool = True, tick_s: float = 0.05) -> None:
        super().__init__(maxsize=1_000_000)
        self.path = Path(path)
        self.times, self.messages, snapshot = read_recording(self.path)
        self.config_snapshot = snapshot
        self.state = ConnectionState.REPLAY
        self.description = f"replay of {self.path.name}"
        sim = ((snapshot or {}).get("engine") or {}).get("simulation")
        if sim:  # a recording of a simulated engine says so
            self.description += f" · SIMULATED {sim.get('device_name')} (profile {sim.get('profile')})"
        self.start_time = self.times[0] if self.times else 0.0
        self.end_time = self.times[-1] if self.times else 0.0
        self.position = self.start_time
        self.speed = speed
        self.playing = autoplay
        self.tick_s = tick_s
        self._next = 0  # index of the next message to release
        self._task: asyncio.Task | None = None
        self._last: float | None = None

    # -- playback -------------------------------------------------------------------------------
    @property
    def finished(self) -> bool:
        return self._next >= len(self.messages)

    def _release_until(self, t: float) -> None:
        end = bisect.bisect_right(self.times, t, lo=self._next)
        for i in range(self._next, end):
            self._push(*self.messages[i])
        self._next = end

    def advance(self, dt: float) -> None:
        """Move the play position by `dt` seconds of wall time (times `speed`) and release records."""
        if not self.playing:
            return
        self.position = min(self.end_time, self.position + dt * self.speed)
        self._release_until(self.position)
        if self.finished:
            self.playing = False

    def seek(self, t: float) -> None:
        t = min(max(t, self.start_time), self.end_time)
        if t < self.position or self._next == 0:
            self._inbox.clear()
            self._push("reset", None)
            self._next = 0
        self.position = t
        self._release_until(t)

    def toggle(self) -> bool:
        if self.finished and not self.playing:
            self.seek(self.start_time)
        self.playing = not self.playing
        return self.playing

    def set_speed(self, speed: float) -> None:
        if not speed > 0:
            raise ValueError(f"speed must be > 0, got {speed!r}")
        self.speed = speed

    def faster(self, up: bool = True) -> float:
        i = min(range(len(SPEEDS)), key=lambda k: abs(SPEEDS[k] - self.speed))
        self.speed = SPEEDS[min(len(SPEEDS) - 1, i + 1) if up else max(0, i - 1)]
        return self.speed

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        last = loop.time()
        while True:
            await asyncio.sleep(self.tick_s)
            now = loop.time()
            self.advance(now - last)
            last = now

    async def start(self) -> None:
        self._release_until(self.position)
        if self._task is None:
            self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def now(self) -> float | None:
        return self.position

    def status_text(self) -> str:
        state = "▶" if self.playing else ("■ end" if self.finished else "❚❚")
        return f"{state} {self.position - self.start_time:6.1f}/{self.end_time - self.start_time:.1f}s ×{self.speed:g}"

    # -- steering: none -----------------------------------------------------------------------------
    def _refuse(self, op: str) -> CommandResult:
        return CommandResult(False, op, error="this is a replay: there is no engine to steer")

    async def get_config(self) -> CommandResult:
        return CommandResult(True, "get", config=self.config_snapshot)

    async def set(self, changes: Mapping[str, Any]) -> CommandResult:
        return self._refuse("set")

    async def pause(self) -> CommandResult:
        return self._refuse("pause")

    async def resume(self) -> CommandResult:
        return self._refuse("resume")

    async def abort(self, request_id: str) -> CommandResult:
        return self._refuse("abort")

    async def submit(self, requests: Mapping[str, Any] | Iterable[Mapping[str, Any]]) -> CommandResult:
        return self._refuse("submit")
