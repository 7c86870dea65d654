"""Exponential backoff with jitter, for the reconnect loops (the engine's MQTT bridge, the console's
MQTT client): `delay()` gives the next wait, doubling from `minimum` up to `maximum`; `reset()`
after a success starts again from `minimum`."""
from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    minimum: float
    maximum: float
    jitter: float = 0.2  # each wait is drawn from [1 - jitter, 1 + jitter] times the nominal one
    rng: random.Random = field(default_factory=random.Random, repr=False)
    _next: float = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 < self.minimum <= self.maximum:
            raise ValueError(f"backoff needs 0 < minimum <= maximum, got {self.minimum!r} and {self.maximum!r}")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"backoff jitter must be in [0, 1), got {self.jitter!r}")
        self._next = self.minimum

    def delay(self) -> float:
        """The next wait in seconds (then the nominal wait doubles, up to `maximum`)."""
        nominal = self._next
        self._next = min(self._next * 2, self.maximum)
        return nominal * self.rng.uniform(1 - self.jitter, 1 + self.jitter)

    def reset(self) -> None:
        self._next = self.minimum
