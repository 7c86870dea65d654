"""Simulated time. The engine reads it through its one `clock` (and `perf`, for step timings).

`VirtualClock`: seconds that move only when the simulated executor finishes an iteration (by its
modelled duration) or an idle wait jumps ahead, so a headless run goes as fast as the CPU allows and
is deterministic (run it under `engine.service.virtual_loop`, whose event loop reads this clock).
`PacedClock`: simulated time flows with wall time times `speed`; an iteration lasts its modelled
duration (the executor sleeps the rest), for the console and the MQTT engine. When the CPU cannot keep
up, the simulation falls behind and `behind_s` says by how much.
"""
from __future__ import annotations

import time


class VirtualClock:
    rate = 1.0  # wall-clock pacing does not apply: the event loop reads this clock too

    def __init__(self, start: float = 0.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def restart(self) -> None:
        self.now = 0.0

    def wait_until(self, t: float) -> None:
        if t > self.now:
            self.now = t

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            self.now += seconds


class PacedClock:
    def __init__(self, speed: float = 1.0):
        if not speed > 0:
            raise ValueError(f"simulation speed must be > 0, got {speed!r}")
        self.rate = float(speed)
        self._t0 = time.monotonic()
        self.behind_s = 0.0  # total simulated seconds iterations overran their modelled duration

    def __call__(self) -> float:
        return (time.monotonic() - self._t0) * self.rate

    def restart(self) -> None:
        self._t0 = time.monotonic()

    def wait_until(self, t: float) -> None:
        late = self() - t
        if late > 0:
            self.behind_s += late
        else:
            time.sleep(-late / self.rate)

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds / self.rate)
