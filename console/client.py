"""The one steering/telemetry interface the console talks to, whatever sits behind it.

`Client` has three implementations: `InProcessClient` (an `AsyncEngine` in this process, telemetry
from the in-process bus), `MqttClient` (a headless engine over MQTT, issue #4's topic contract) and
`ReplayClient` (a recording played back, read-only). A fourth, `FakeClient`, feeds fixed records
for tests. The UI never asks which one it has.

Steering calls return a `CommandResult` (never raise for an operator mistake): `ok`, an `error` that
says what was wrong and what is allowed, `applied_iteration` for `set`, and the `config` after it.

Telemetry arrives as `TelemetryMessage(topic, record)` that the UI pulls with `drain()` on its own
timer (the producer never waits for the UI). Records are the engine's own types whatever the
transport: `IterationRecord` ("iteration"), `RequestRecord` ("request"), `Event` ("event"),
`GpuSample` ("gpu"), and a plain dict for "requests" (the request-table snapshot) and "action"
(an operator input, replayed from a recording). Their JSON form (MQTT payloads, recordings) is the
wire protocol's `encode` / `decode` (engine/service/protocol.py).
"""
from __future__ import annotations

import dataclasses
import random
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, NamedTuple

from batchdeck.engine.telemetry import Event

TOPICS = ("iteration", "request", "event", "gpu", "requests")


class ConnectionState:
    """What `Client.state` reports (shown in the console's status bar)."""

    IN_PROCESS = "in-process"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    OFFLINE = "engine offline"
    FAILED = "engine failed"  # an in-process engine's step raised: it no longer iterates
    REPLAY = "replay"
    STOPPED = "stopped"


class TelemetryMessage(NamedTuple):
    topic: str
    record: Any


@dataclass
class CommandResult:
    """The answer to one steering command."""

    ok: bool
    op: str
    error: str | None = None
    applied_iteration: int | None = None
    config: dict[str, Any] | None = None  # the live config after a `set` (or the snapshot for `get`)
    data: Any = None  # op-specific: accepted request ids for `submit`, the iteration for pause/resume

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


# -- bursts ---------------------------------------------------------------------------------------
def make_burst(count: int, prompt_tokens: int = 256, max_tokens: int = 64, *, tenant: str = "console",
               slo_class: str = "interactive", prefix: str = "burst", seed: int | None = None) -> list[dict[str, Any]]:
    """`count` request objects (the `batchdeck generate` input-line form) with random byte prompts."""
    rng = random.Random(seed)
    tag = f"{rng.randrange(16 ** 4):04x}"
    return [
        {"id": f"{prefix}-{tag}-{i}", "prompt_token_ids": [rng.randrange(256) for _ in range(prompt_tokens)],
         "max_tokens": max_tokens, "ignore_eos": True, "tenant": tenant, "slo_class": slo_class}
        for i in range(count)
    ]


# -- the interface ----------------------------------------------------------------------------------
class Client(ABC):
    """Steering + telemetry. Subclasses fill `_inbox` (a bounded deque) from their transport."""

    kind: str = "client"
    read_only: bool = False  # a replay cannot steer anything

    def __init__(self, maxsize: int = 20000) -> None:
        self._inbox: deque[TelemetryMessage] = deque(maxlen=maxsize)
        self.dropped = 0  # telemetry lost before the UI read it (a full inbox, or the bus's own counter)
        self.received = 0
        self.state = ConnectionState.CONNECTING
        self.config_snapshot: dict[str, Any] | None = None  # {"config", "bounds", "version", "engine"}
        self.description = ""  # shown in the header: what is behind this client

    # lifecycle
    async def start(self) -> None:
        """Connect / subscribe. Returns once telemetry can flow (MQTT: once a first attempt is made)."""

    async def stop(self) -> None:
        """Disconnect; stops anything this client started."""

    # telemetry
    def _push(self, topic: str, record: Any) -> None:
        if len(self._inbox) == self._inbox.maxlen:
            self.dropped += 1
        self._inbox.append(TelemetryMessage(topic, record))
        self.received += 1

    def drain(self, max_items: int | None = None) -> list[TelemetryMessage]:
        """Everything received since the last call (up to `max_items`), oldest first; never waits."""
        inbox = self._inbox
        n = len(inbox) if max_items is None else min(max_items, len(inbox))
        return [inbox.popleft() for _ in range(n)]

    def now(self) -> float | None:
        """The engine's clock (seconds since engine start) as best known, or None."""
        return None

    # steering
    @abstractmethod
    async def get_config(self) -> CommandResult: ...

    @abstractmethod
    async def set(self, changes: Mapping[str, Any]) -> CommandResult: ...

    @abstractmethod
    async def pause(self) -> CommandResult: ...

    @abstractmethod
    async def resume(self) -> CommandResult: ...

    @abstractmethod
    async def abort(self, request_id: str) -> CommandResult: ...

    @abstractmethod
    async def submit(self, requests: Mapping[str, Any] | Iterable[Mapping[str, Any]]) -> CommandResult: ...


def as_request_list(requests: Mapping[str, Any] | Iterable[Mapping[str, Any]]) -> list[Any]:
    return [requests] if isinstance(requests, Mapping) else list(requests)


def merge_submit_results(results: list[CommandResult]) -> CommandResult:
    """One result for a burst: ok if every request was accepted; errors listed otherwise."""
    accepted = [r.data for r in results if r.ok]
    errors = [r.error for r in results if not r.ok and r.error]
    if not errors:
        return CommandResult(True, "submit", data=accepted)
    head = errors[0] if len(errors) == 1 else f"{len(errors)} of {len(results)} refused; first: {errors[0]}"
    return CommandResult(False, "submit", error=head, data=accepted)


class FakeClient(Client):
    """A deterministic telemetry source for tests and screenshots: `feed()` queues records, steering
    is validated like the engine does (against the snapshot's bounds) and answered at once."""

    kind = "fake"

    def __init__(self, snapshot: dict[str, Any] | None = None, *, state: str = ConnectionState.CONNECTED,
                 description: str = "fake telemetry") -> None:
        super().__init__()
        self.state = state
        self.config_snapshot = snapshot or default_snapshot()
        self.description = description
        self.clock = 0.0
        self.iteration = 0
        self.calls: list[tuple[str, Any]] = []

    def feed(self, messages: Iterable[tuple[str, Any]]) -> None:
        for topic, record in messages:
            self._push(topic, record)
            t = getattr(record, "time", None)
            if isinstance(t, (int, float)):
                self.clock = max(self.clock, float(t))
            if topic == "iteration":
                self.iteration = record.iteration + 1

    def now(self) -> float | None:
        return self.clock

    async def get_config(self) -> CommandResult:
        self.calls.append(("get", None))
        return CommandResult(True, "get", config=self.config_snapshot)

    async def set(self, changes: Mapping[str, Any]) -> CommandResult:
        from batchdeck.engine.config import ConfigError, LiveConfig, validate_changes

        self.calls.append(("set", dict(changes)))
        snap = self.config_snapshot
        current = LiveConfig(**snap["config"])
        try:
            new = validate_changes(current, changes, bounds_from_dict(snap["bounds"]))
        except (ConfigError, ValueError) as exc:
            return CommandResult(False, "set", error=str(exc))
        snap["config"] = new.to_dict()
        snap["version"] = new.version
        event = Event("config_change", self.clock, self.iteration,
                      {"changes": dict(changes), "applied_iteration": self.iteration, "source": "console",
                       "version": new.version})
        self._push("event", event)
        return CommandResult(True, "set", applied_iteration=self.iteration, config=new.to_dict())

    async def pause(self) -> CommandResult:
        self.calls.append(("pause", None))
        self._push("event", Event("pause", self.clock, self.iteration, {"source": "console"}))
        return CommandResult(True, "pause", data=self.iteration)

    async def resume(self) -> CommandResult:
        self.calls.append(("resume", None))
        self._push("event", Event("resume", self.clock, self.iteration, {"source": "console"}))
        return CommandResult(True, "resume", data=self.iteration)

    async def abort(self, request_id: str) -> CommandResult:
        self.calls.append(("abort", request_id))
        return CommandResult(True, "abort", data=request_id)

    async def submit(self, requests: Mapping[str, Any] | Iterable[Mapping[str, Any]]) -> CommandResult:
        items = as_request_list(requests)
        self.calls.append(("submit", items))
        return CommandResult(True, "submit", data=[str(r.get("id")) for r in items])


def default_snapshot() -> dict[str, Any]:
    """A config snapshot shaped like `LLMEngine.config_snapshot()` with the engine's defaults (cpu)."""
    from batchdeck.engine.config import ConfigBounds, LiveConfig
    from batchdeck.engine.settings import BY_NAME

    bounds = ConfigBounds(policies=BY_NAME["policy"].choice_list())
    return {"config": LiveConfig().to_dict(), "bounds": bounds.to_dict(), "version": 0,
            "engine": {"model": "synthetic:tiny", "device": "cpu", "dtype": "float32", "block_size": 16,
                       "num_blocks": 1024, "kv_pool_bytes": 64 * 1024 * 1024}}


def bounds_from_dict(bounds: Mapping[str, Any]):
    """`ConfigBounds` from the JSON form in a config snapshot (`ConfigBounds.to_dict()`)."""
    from batchdeck.engine.config import ConfigBounds

    return ConfigBounds.from_dict(bounds)
