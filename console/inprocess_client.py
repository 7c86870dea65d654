"""`InProcessClient`: the console steering an `AsyncEngine` in this process.

Telemetry: the engine's sink is a `Bus`; this client holds one bounded drop-oldest subscription on
it that the UI drains on its timer (the engine thread only appends under a short lock, never waits).
A `GpuMonitor` thread publishes ("gpu", sample) on the same bus once a second.
Steering: the AsyncEngine's own methods, with `source="console"` on config changes and pauses.
"""
from __future__ import annotations

import asyncio
import itertools
from typing import Any, Iterable, Mapping

from batchdeck.engine.service.async_engine import AsyncEngine
from batchdeck.engine.service.bus import Bus, Subscription
from batchdeck.engine.config import ConfigError
from batchdeck.engine.service.gpu_monitor import GpuMonitor
from batchdeck.engine.service.served_model import EngineDeadError
from batchdeck.engine.request import RequestError
from batchdeck.engine.request_spec import parse_request
from batchdeck.engine.telemetry import null_sink

from batchdeck.console.client import (Client, CommandResult, ConnectionState, TelemetryMessage, as_request_list,
                            merge_submit_results)

SOURCE = "console"


def attach_bus(engine: AsyncEngine, bus: Bus | None = None) -> Bus:
    """Make `bus` (a new one by default) the engine's telemetry sink, keeping any sink it had."""
    if bus is None:
        bus = Bus()
    inner = engine.engine
    old = inner.sink
    if old is bus or getattr(old, "__self__", None) is bus:
        return bus
    if old is null_sink:
        inner.sink = bus
    else:
        def both(topic: str, record: Any, _old=old, _bus=bus) -> None:
            _old(topic, record)
            _bus.publish(topic, record)

        inner.sink = both
    return bus


class InProcessClient(Client):
    kind = "in-process"

    def __init__(self, engine: AsyncEngine, bus: Bus | None = None, *, gpu_interval_s: float | None = 1.0,
                 source: str = SOURCE, maxsize: int = 20000, stop_engine: bool = True) -> None:
        super().__init__(maxsize)
        self.engine = engine
        self.bus = attach_bus(engine, bus)
        self.source = source
        self.stop_engine = stop_engine
        self.state = ConnectionState.IN_PROCESS
        self._maxsize = maxsize
        self._sub: Subscription | None = None
        self._ids = itertools.count(1)
        inner = engine.engine
        self.gpu_monitor: GpuMonitor | None = None
        if gpu_interval_s:
            index = inner.device.index if inner.device.type == "cuda" and inner.device.index is not None else 0
            self.gpu_monitor = GpuMonitor(index, gpu_interval_s, inner.kv_cache.num_bytes, clock=inner.clock)
        cfg = inner.config
        self.description = f"{cfg.model} · {cfg.device} · {cfg.dtype} · in-process"
        if inner.simulation:  # a simulated engine says so, and which profile
            self.description = f"SIMULATED · {cfg.model} · {inner.profile.label()} · in-process"
        self.config_snapshot = inner.config_snapshot()

    async def start(self) -> None:
        if self._sub is None:
            self._sub = self.bus.subscribe(maxsize=self._maxsize, name="console")
        if not self.engine.running:
            await self.engine.start()
        if self.gpu_monitor is not None and self.gpu_monitor._thread is None:
            self.gpu_monitor.start(self.bus.publish)
        await self.get_config()

    async def stop(self) -> None:
        if self.gpu_monitor is not None:
            await asyncio.to_thread(self.gpu_monitor.stop)
        if self._sub is not None:
            self._sub.close()
        if self.stop_engine and self.engine.running:
            await self.engine.stop()
        self.state = ConnectionState.STOPPED

    @property
    def failure(self) -> str | None:
        """Why the engine stopped iterating (its step raised), or None."""
        return None if self.engine.error is None else EngineDeadError.of(self.engine.error).describe()

    def _refuse_if_failed(self, op: str) -> CommandResult | None:
        """A failed engine runs no further iteration: a change would be "applied" to nothing, a resume
        would raise; both are refused with the reason instead."""
        failure = self.failure
        return None if failure is None else CommandResult(False, op, error=failure)

    def drain(self, max_items: int | None = None) -> list[TelemetryMessage]:
        if self.engine.error is not None and self.state == ConnectionState.IN_PROCESS:
            self.state = ConnectionState.FAILED
        out = super().drain(max_items)
        if self._sub is not None:
            room = None if max_items is None else max_items - len(out)
            if room is None or room > 0:
                msgs = self._sub.drain(room)
                self.received += len(msgs)
                out.extend(TelemetryMessage(m.topic, m.record) for m in msgs)
            self.dropped = self._sub.dropped
        return out

    def now(self) -> float | None:
        return self.engine.engine.clock()

    # -- steering -------------------------------------------------------------------------------
    async def get_config(self) -> CommandResult:
        snap = await self.engine.call(lambda e: e.config_snapshot())
        self.config_snapshot = snap
        return CommandResult(True, "get", config=snap)

    async def set(self, changes: Mapping[str, Any]) -> CommandResult:
        if (refused := self._refuse_if_failed("set")) is not None:
            return refused
        try:
            reply = await self.engine.update_config(dict(changes), source=self.source)
        except ConfigError as exc:
            return CommandResult(False, "set", error=str(exc))
        except (ValueError, TypeError) as exc:  # a policy's own parameter check
            return CommandResult(False, "set", error=str(exc))
        if self.config_snapshot is not None:
            self.config_snapshot = {**self.config_snapshot, "config": reply.config, "version": reply.config["version"]}
        return CommandResult(True, "set", applied_iteration=reply.applied_iteration, config=reply.config)

    async def pause(self) -> CommandResult:
        if (refused := self._refuse_if_failed("pause")) is not None:
            return refused
        it = await self.engine.pause(source=self.source)
        return CommandResult(True, "pause", data=it)

    async def resume(self) -> CommandResult:
        if (refused := self._refuse_if_failed("resume")) is not None:
            return refused
        it = await self.engine.resume(source=self.source)
        return CommandResult(True, "resume", data=it)

    async def abort(self, request_id: str) -> CommandResult:
        if await self.engine.abort(str(request_id)):
            return CommandResult(True, "abort", data=str(request_id))
        return CommandResult(False, "abort", error=f"request {request_id!r} is not running or waiting (finished or unknown)")

    async def submit(self, requests: Mapping[str, Any] | Iterable[Mapping[str, Any]]) -> CommandResult:
        tokenizer = self.engine.engine.loaded.tokenizer
        results = []
        for obj in as_request_list(requests):
            try:
                spec = parse_request(obj, tokenizer, default_id=f"console-{next(self._ids)}")
                await self.engine.add_request(spec.request_id, spec.prompt_token_ids, spec.sampling,
                                              arrival_time=None, tenant=spec.tenant, priority=spec.priority,
                                              slo_class=spec.slo_class)
            except RequestError as exc:
                results.append(CommandResult(False, "submit", error=str(exc)))
            except EngineDeadError as exc:
                results.append(CommandResult(False, "submit", error=exc.describe()))
            else:
                results.append(CommandResult(True, "submit", data=spec.request_id))
        return merge_submit_results(results)
