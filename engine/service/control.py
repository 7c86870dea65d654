"""Control commands (the MQTT `PREFIX/control` topic, or any other transport): parse, validate, run.

Two layers:

- `parse_control(payload, read_only=...)` is pure: bytes in, a typed `Command` or an `Invalid` out.
  It checks the envelope -- JSON, an object, `id`, `op`, the op's fields and no unknown keys -- and
  refuses every changing op in read-only mode. It never raises.
- `ControlHandler.handle(payload)` runs a valid command against an `AsyncEngine` and returns the
  reply. Values are checked where they are defined (`set` params by the engine's config validation,
  a `submit` request by `parse_request`), so a bad value is refused with the same message the
  engine gives anywhere else. It never raises either: every payload gets exactly one reply.

Commands (JSON objects):

    {"id": "1", "op": "set", "params": {"max_num_seqs": 16}}      live changes (validated, applied at
                                                                   the next iteration boundary)
    {"id": "2", "op": "get"}                                      the live config, bounds, version
    {"id": "3", "op": "pause"} / {"id": "4", "op": "resume"}
    {"id": "5", "op": "abort", "request_id": "r1"}
    {"id": "6", "op": "submit", "request": {"prompt": "hi", "max_tokens": 8}}
                                                                   a `batchdeck generate` input line

Replies: `{"id", "ok": true, "config": <live config>, ...}` with `applied_iteration` for `set`
(the first iteration that runs with the change), `request_id` for `submit`/`abort`, `paused` for
`pause`/`resume`; or `{"id", "ok": false, "error": "..."}`, with `"id": null` when no id could be
read. A refused command changes nothing.

`submit`: `arrival_time` (engine-clock seconds) in the future delays the submission until then (at
most `MAX_ARRIVAL_AHEAD_S` ahead); a past or missing one means now. Without `id` the request gets
`mqtt-<random>`. The finished request's RequestRecord reaches telemetry through the engine's sink
as every request's does; `on_result` additionally gets a `batchdeck generate`-style output line
(id, prompt and output token ids, text, finish_reason, metrics).
"""
from __future__ import annotations

import asyncio
import json
import math
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping

from batchdeck.engine.config import LIVE_KEYS, ConfigError
from batchdeck.engine.request import RequestError
from batchdeck.engine.request_spec import MAX_ARRIVAL_AHEAD_S  # one bound for generate and MQTT

if TYPE_CHECKING:
    from batchdeck.engine.service.async_engine import AsyncEngine, RequestStream

OPS: tuple[str, ...] = ("set", "get", "pause", "resume", "abort", "submit")
CHANGING_OPS = frozenset({"set", "pause", "resume", "abort", "submit"})
OP_FIELDS: dict[str, tuple[str, ...]] = {  # required fields besides id and op
    "set": ("params",),
    "get": (),
    "pause": (),
    "resume": (),
    "abort": ("request_id",),
    "submit": ("request",),
}
MAX_PAYLOAD_BYTES = 256 * 1024
MAX_ID_CHARS = 256
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed overflows beyond (in the engine thread: it would stop the engine)

CommandId = str | int | None


@dataclass(frozen=True)
class Command:
    """A well-formed command. Field values beyond their shape are checked when it runs."""

    id: str | int
    op: str
    params: dict[str, Any] | None = None  # set
    request_id: str | None = None  # abort
    request: dict[str, Any] | None = None  # submit


@dataclass(frozen=True)
class Invalid:
    """A command refused before it ran; `reply()` is what the sender gets."""

    id: CommandId
    error: str

    def reply(self) -> dict[str, Any]:
        return error_reply(self.id, self.error)


def error_reply(command_id: CommandId, error: str) -> dict[str, Any]:
    return {"id": command_id, "ok": False, "error": error}


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _type_name(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null",
            int: "integer", float: "number"}.get(type(value), type(value).__name__)


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value) if isinstance(value, (str, int, float, bool, type(None))) else _type_name(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_id(obj: dict[str, Any]) -> tuple[CommandId, str | None]:
    """The command id and, if it is missing or unusable, why (the reply then carries id null)."""
    if "id" not in obj:
        return None, 'missing "id": every command needs an id (a string) to match its reply'
    cid = obj["id"]
    if isinstance(cid, bool) or not isinstance(cid, (str, int)):
        return None, f'"id" must be a string (or an integer), got {_type_name(cid)}'
    if isinstance(cid, str) and not 0 < len(cid) <= MAX_ID_CHARS:
        return None, f'"id" must be a string of 1 to {MAX_ID_CHARS} characters, got {len(cid)} characters'
    if isinstance(cid, int) and abs(cid) >= 2**53:
        return None, '"id" integer is too large; use a string'
    return cid, None


def parse_control(payload: Any, *, read_only: bool = False) -> Command | Invalid:
    """Check a control payload's envelope. Pure and total: returns, never raises."""
    try:
        return _parse(payload, read_only)
    except Exception as exc:  # noqa: BLE001 - defensive: the contract is "every payload gets a reply"
        return Invalid(None, f"malformed command ({type(exc).__name__}: {exc})")


def _parse(payload: Any, read_only: bool) -> Command | Invalid:
    if isinstance(payload, (bytes, bytearray, memoryview)):
        raw = bytes(payload)
        if len(raw) > MAX_PAYLOAD_BYTES:
            return Invalid(None, f"command is {len(raw)} bytes; at most {MAX_PAYLOAD_BYTES} are accepted")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            return Invalid(None, f"command is not UTF-8 text (byte {exc.start}): send a JSON object")
    elif isinstance(payload, str):
        text = payload
        if len(text) > MAX_PAYLOAD_BYTES:
            return Invalid(None, f"command is {len(text)} characters; at most {MAX_PAYLOAD_BYTES} are accepted")
    elif payload is None:
        return Invalid(None, 'empty command: send a JSON object like {"id": "1", "op": "get"}')
    else:
        return Invalid(None, f"command payload must be bytes or text, got {type(payload).__name__}")
    if not text.strip():
        return Invalid(None, 'empty command: send a JSON object like {"id": "1", "op": "get"}')
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        return Invalid(None, f"command is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}")
    except (ValueError, RecursionError) as exc:
        return Invalid(None, f"command is not valid JSON: {exc}")
    if not _all_finite(obj):
        cid = _read_id(obj)[0] if isinstance(obj, dict) else None
        return Invalid(cid, "command contains a number out of range (inf or nan): numbers must be finite")
    if not isinstance(obj, dict):
        return Invalid(None, f'a command must be a JSON object like {{"id": "1", "op": "get"}}, got {_type_name(obj)}')

    cid, id_error = _read_id(obj)
    if id_error is not None:
        return Invalid(None, id_error)
    if "op" not in obj:
        return Invalid(cid, 'missing "op": one of ' + ", ".join(OPS))
    op = obj["op"]
    if not isinstance(op, str) or op not in OPS:
        return Invalid(cid, f"unknown op {_short(op)}: one of " + ", ".join(OPS))
    allowed = ("id", "op") + OP_FIELDS[op]
    unknown = [k for k in obj if k not in allowed]
    if unknown:
        return Invalid(cid, f"unknown key {_short(unknown[0])} for op {op!r}: allowed " + ", ".join(allowed))
    missing = [k for k in OP_FIELDS[op] if k not in obj]
    if missing:
        return Invalid(cid, f"op {op!r} needs {missing[0]!r}")
    if read_only and op in CHANGING_OPS:
        return Invalid(cid, f"read-only engine: op {op!r} changes the engine and is refused "
                            "(only 'get' is served; the engine was started with --read-only)")

    if op == "set":
        params = obj["params"]
        if not isinstance(params, dict) or not params:
            return Invalid(cid, '"params" must be a non-empty object of live settings: ' + ", ".join(LIVE_KEYS)
                           + f"; got {_type_name(params) if not isinstance(params, dict) else 'an empty object'}")
        bad = [k for k in params if k not in LIVE_KEYS]
        if bad:
            return Invalid(cid, f"unknown key {_short(bad[0])} in params: live settings are " + ", ".join(LIVE_KEYS))
        return Command(cid, op, params=params)
    if op == "abort":
        rid = obj["request_id"]
        if isinstance(rid, bool) or not isinstance(rid, (str, int)) or rid == "":
            return Invalid(cid, f'"request_id" must be a non-empty string, got {_short(rid)}')
        return Command(cid, op, request_id=str(rid))
    if op == "submit":
        req = obj["request"]
        if not isinstance(req, dict):
            return Invalid(cid, '"request" must be an object like a `batchdeck generate` input line, '
                                f"got {_type_name(req)}")
        return Command(cid, op, request=req)
    return Command(cid, op)


def _all_finite(value: Any) -> bool:
    """False if any float inside `value` is inf or nan (JSON like 1e400 parses to inf)."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, float):
            if not math.isfinite(v):
                return False
        elif isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return True


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
        self._delayed: set[asyncio.Task] = set()

    def stop_admitting(self) -> None:
        self.accepting = False

    async def close(self, grace: float = 0.5) -> None:
        """Cancel delayed submissions; give result watchers `grace` seconds (an aborted request's
        result is then still reported), then cancel them too."""
        for t in list(self._delayed):
            t.cancel()
        watchers = [t for t in self._tasks if t not in self._delayed]
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
            self._delayed.add(self._spawn(self._delayed_submit(spec, ahead)))
            return self._ok(cmd, request_id=spec.request_id, arrival_time=spec.arrival_time, scheduled=True)
        await self._add(spec, now)
        return self._ok(cmd, request_id=spec.request_id)

    # -- submission helpers ---------------------------------------------------------------------
    def _spawn(self, coro: Any) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(self._delayed.discard)
        return task

    async def _add(self, spec: Any, arrival: float) -> "RequestStream":
        stream = await self.engine.add_request(spec.request_id, spec.prompt_token_ids, spec.sampling,
                                               arrival_time=arrival, tenant=spec.tenant, priority=spec.priority,
                                               slo_class=spec.slo_class)
        self._spawn(self._watch(spec, stream))
        return stream

    async def _delayed_submit(self, spec: Any, delay: float) -> None:
        await asyncio.sleep(delay)
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
        await stream.collect()
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


def reply_json(reply: Mapping[str, Any]) -> bytes:
    """A reply as compact JSON bytes (non-JSON values become strings)."""
    return json.dumps(reply, separators=(",", ":"), default=str).encode()
