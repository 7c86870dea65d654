"""Control commands (the MQTT `PREFIX/control` topic, or any other transport): run them.

The command schema, its envelope check (`parse_control`, pure, never raises) and the reply form are
the wire protocol's (engine/service/protocol.py). `ControlHandler.handle(payload)` runs a valid
command against an `AsyncEngine` and returns the reply. Values are checked where they are defined
(`set` params by the engine's config validation, a `submit` request by `parse_request`), so a bad
value is refused with the same message the engine gives anywhere else. It never raises either:
every payload gets exactly one reply. A refused command changes nothing.

`submit`: `arrival_time` (engine-clock seconds) in the future delays the submission until then (at
most `MAX_ARRIVAL_AHEAD_S` ahead); a past or missing one means now. Without `id` the request gets
`mqtt-<random>`. The finished request's RequestRecord reaches telemetry through the engine's sink
as every request's does; `on_result` additionally gets a `batchdeck generate`-style output line
(id, prompt and output token ids, text, finish_reason, metrics).
"""
from __future__ import annotations

import asyncio
import uuid
from typing import TYPE_CHECKING, Any, Callable

from batchdeck.engine.config import ConfigError
from batchdeck.engine.request import RequestError
from batchdeck.engine.request_spec import MAX_ARRIVAL_AHEAD_S  # one bound for generate and MQTT
from batchdeck.engine.service.protocol import CHANGING_OPS, MAX_SEED, Command, Invalid, error_reply, parse_control
from batchdeck.engine.service.served_model import EngineDeadError

if TYPE_CHECKING:
    from batchdeck.engine.service.async_engine import AsyncEngine, RequestStream


class ControlHandler:
    """Runs control commands against an AsyncEngine; `handle(payload)` always returns one reply.

    `accepting = False` (set by `stop_admitting()`) refuses further submits, e.g. while shutting down.
    `on_result(line)` is called on the loop with a generate-style output line for each request
    submitted here when it finishes. `on_config(snapshot)` is awaited after a changing command
    succeeded, before the reply is returned (the MQTT bridge republishes its retained config there).
    """

    def __init__(self, engine: "AsyncEngine", *, read_only: bool = False, source: str = "mqtt",
                 on_result: Callable[[dict[str, Any]], None] | None = None,
                 on_config: Callable[[], Any] | None = None):
        self.engine = engine
        self.read_only = read_only
        self.source = source
        self.on_result = on_result
        self.on_config = on_config
        self.accepting = True
        self.handled = 0
        self.refused = 0
        self._tasks: set[asyncio.Task] = set()
        self._scheduled: dict[str, asyncio.Task] = {}  # request id -> its delayed submission, until it is due

    def scheduled_ids(self) -> list[str]:
        """Request ids accepted with a future arrival_time and not yet submitted to the engine."""
        return [rid for rid, t in self._scheduled.items() if not t.done()]

    def stop_admitting(self) -> None:
        self.accepting = False

    async def close(self, grace: float = 0.5) -> None:
        """Cancel delayed submissions; give result watchers `grace` seconds (an aborted request's
        result is then still reported), then cancel them too."""
        delayed = set(self._scheduled.values())
        for t in delayed:
            t.cancel()
        watchers = [t for t in self._tasks if t not in delayed]
        if watchers and grace > 0:
            await asyncio.wait(watchers, timeout=grace)
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def live_config(self) -> dict[str, Any]:
        return self.engine.engine.target_config.to_dict()

    async def handle(self, payload: Any) -> dict[str, Any]:
        self.handled += 1
        cmd = parse_control(payload, read_only=self.read_only)
        if isinstance(cmd, Invalid):
            self.refused += 1
            return cmd.reply()
        try:
            reply = await getattr(self, "_op_" + cmd.op)(cmd)
        except (ConfigError, RequestError) as exc:
            reply = error_reply(cmd.id, str(exc))
        except EngineDeadError as exc:
            reply = error_reply(cmd.id, exc.describe())
        except Exception as exc:  # noqa: BLE001 - reported to the sender; the engine goes on
            reply = error_reply(cmd.id, f"op {cmd.op!r} failed: {type(exc).__name__}: {exc}")
        if not reply["ok"]:
            self.refused += 1
        elif cmd.op in CHANGING_OPS and cmd.op != "submit" and self.on_config is not None:
            try:
                await self.on_config()
            except Exception:  # noqa: BLE001 - the command did run; a failed republish is retried later
                pass
        return reply

    def _ok(self, cmd: Command, **extra: Any) -> dict[str, Any]:
        return {"id": cmd.id, "ok": True, **extra, "config": extra.get("config", self.live_config())}

    # -- ops ------------------------------------------------------------------------------------
    async def _op_set(self, cmd: Command) -> dict[str, Any]:
        assert cmd.params is not None
        reply = await self.engine.update_config(cmd.params, source=self.source)
        return self._ok(cmd, applied_iteration=reply.applied_iteration, version=reply.config["version"],
                        config=reply.config)

    async def _op_get(self, cmd: Command) -> dict[str, Any]:
        # At the boundary, like every other op: a `get` after a `set` sees the change.
        snap, iteration = await self.engine.call(lambda e: (e.config_snapshot(), e.iteration))
        return self._ok(cmd, config=snap["config"], bounds=snap["bounds"], version=snap["version"],
                        engine=snap.get("engine"), paused=self.engine.paused, iteration=iteration)

    async def _op_pause(self, cmd: Command) -> dict[str, Any]:
        iteration = await self.engine.pause(source=self.source)
        return self._ok(cmd, paused=True, iteration=iteration)

    async def _op_resume(self, cmd: Command) -> dict[str, Any]:
        iteration = await self.engine.resume(source=self.source)
        return self._ok(cmd, paused=False, iteration=iteration)

    async def _op_abort(self, cmd: Command) -> dict[str, Any]:
        assert cmd.request_id is not None
        scheduled = self._scheduled.pop(cmd.request_id, None)
        if scheduled is not None and not scheduled.done():  # not due yet: it never reaches the engine
            scheduled.cancel()
            return self._ok(cmd, request_id=cmd.request_id, aborted=True, scheduled=True)
        if not await self.engine.abort(cmd.request_id):
            return error_reply(cmd.id, f"request {cmd.request_id!r} is not in flight (unknown or already finished)")
        return self._ok(cmd, request_id=cmd.request_id, aborted=True)

    async def _op_submit(self, cmd: Command) -> dict[str, Any]:
        from batchdeck.engine.request_spec import parse_request

        if not self.accepting:
            return error_reply(cmd.id, "the engine is shutting down and admits no new requests")
        assert cmd.request is not None
        spec = parse_request(cmd.request, self.engine.engine.loaded.tokenizer,
                             default_id=f"mqtt-{uuid.uuid4().hex[:12]}")
        if spec.sampling.seed is not None and spec.sampling.seed > MAX_SEED:
            return error_reply(cmd.id, f"seed must be an integer in [0, {MAX_SEED}], got {spec.sampling.seed}")
        now = self.engine.engine.clock()
        if spec.arrival_time is not None and spec.arrival_time > now:
            ahead = spec.arrival_time - now
            if ahead > MAX_ARRIVAL_AHEAD_S:
                return error_reply(cmd.id, f"arrival_time {spec.arrival_time!r} is {ahead:.0f} s ahead of the engine "
                                           f"clock ({now:.1f} s); at most {MAX_ARRIVAL_AHEAD_S:.0f} s ahead is accepted")
            waiting = self._scheduled.get(spec.request_id)
            if waiting is not None and not waiting.done():
                return error_reply(cmd.id, f"request id {spec.request_id!r} is already in use (scheduled, not yet due)")
            # as an immediate submit would be checked: refused in the reply, not at arrival
            self.engine.engine.check_request(spec.request_id, spec.prompt_token_ids, spec.sampling,
                                             tenant=spec.tenant, priority=spec.priority, slo_class=spec.slo_class)
            self._scheduled[spec.request_id] = self._spawn(self._delayed_submit(spec, ahead))
            return self._ok(cmd, request_id=spec.request_id, arrival_time=spec.arrival_time, scheduled=True)
        await self._add(spec, now)
        return self._ok(cmd, request_id=spec.request_id)

    # -- submission helpers ---------------------------------------------------------------------
    def _spawn(self, coro: Any) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _add(self, spec: Any, arrival: float) -> "RequestStream":
        stream = await self.engine.add_request(spec.request_id, spec.prompt_token_ids, spec.sampling,
                                               arrival_time=arrival, tenant=spec.tenant, priority=spec.priority,
                                               slo_class=spec.slo_class)
        self._spawn(self._watch(spec, stream))
        return stream

    async def _delayed_submit(self, spec: Any, delay: float) -> None:
        await asyncio.sleep(delay)
        self._scheduled.pop(spec.request_id, None)
        if not self.accepting:
            return
        try:
            await self._add(spec, spec.arrival_time)
        except (RequestError, ConfigError):
            pass  # the engine reported it as a request_rejected event
        except Exception as exc:  # noqa: BLE001
            message = f"scheduled submit of {spec.request_id!r} failed: {type(exc).__name__}: {exc}"
            await self.engine.call(lambda e: e.emit_event("error", message=message, source=self.source))

    async def _watch(self, spec: Any, stream: "RequestStream") -> None:
        try:
            await stream.collect()
        except EngineDeadError:
            return  # the engine failed: its error event reports it, there is no result to send
        if self.on_result is None:
            return
        req = self.engine.engine.requests.get(spec.request_id)
        if req is None:
            return
        from batchdeck.engine.service.generate import output_line

        try:
            line = output_line(req, self.engine.engine.loaded.tokenizer.decode(req.output_token_ids))
            self.on_result(line)
        except Exception:  # noqa: BLE001 - a result line is a convenience; telemetry has the record
            pass

