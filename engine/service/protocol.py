"""The wire protocol between an engine and its clients: one module that both ends of MQTT import.

Topics (`PREFIX` = `batchdeck/<engine_id>`; the names are a contract):

    PREFIX/status                  retained "online" / "offline"; the engine's Last Will sets "offline"
    PREFIX/config                  retained JSON: {"config", "bounds", "version", "engine", "paused"}
    PREFIX/telemetry/iteration     QoS 0; one IterationRecord or a JSON list of them
    PREFIX/telemetry/request       one RequestRecord per finished request
    PREFIX/telemetry/gpu           GpuSample
    PREFIX/telemetry/requests      the request-table snapshot {"time", "iteration", "num_running", "num_waiting",
                                   ..., "requests", "policy"} (request_table.requests_message)
    PREFIX/events                  Event records, flattened (config_change, preemption, request_rejected, ...)
    PREFIX/results                 QoS 1; a `batchdeck generate`-style output line per request submitted
                                   over MQTT, when it finishes (none with `engine --no-results`)
    PREFIX/control                 commands in (the schema below); retained ones are ignored (and logged):
                                   the broker would replay one on every connect
    PREFIX/control/reply           replies out (QoS 1): one per command, in the order the commands arrived

Records: `encode(record)` is the JSON form of any telemetry record (dataclasses read field by
field, events flattened by `Event.to_dict()`), `decode(topic, obj)` the typed record back (unknown
keys ignored, so a newer engine's fields do not break an older reader), `dumps(obj)` the bytes
(compact; a NaN or infinity becomes null). Recordings (engine/service/recording.py) use the same
encoding, one `{"type": topic, ...}` object per line.

Control commands (JSON objects):

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
read. `parse_control` checks a command's envelope (pure, never raises); engine/service/control.py
runs it.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any, Mapping

from batchdeck.engine.config import LIVE_KEYS
from batchdeck.engine.request import MAX_ID_CHARS as MAX_REQUEST_ID_CHARS
from batchdeck.engine.service.gpu_monitor import GpuSample
from batchdeck.engine.telemetry import Event, IterationRecord, RequestRecord

# -- topics ---------------------------------------------------------------------------------------
TOPIC_ROOT = "batchdeck"
STATUS = "status"
CONFIG = "config"
CONTROL = "control"
CONTROL_REPLY = "control/reply"
INSTANCE = "instance"  # not retained: {"instance", "host", "pid"} of each engine as it connects (see mqtt_bridge)
ONLINE, OFFLINE = b"online", b"offline"
# bus topic -> MQTT topic suffix (telemetry the engine publishes)
TELEMETRY_TOPICS: dict[str, str] = {"iteration": "telemetry/iteration", "request": "telemetry/request",
                                    "gpu": "telemetry/gpu", "requests": "telemetry/requests", "event": "events",
                                    "result": "results"}
# MQTT topic suffix -> bus topic (what a client reads back)
BUS_TOPICS: dict[str, str] = {suffix: topic for topic, suffix in TELEMETRY_TOPICS.items()}
# the bus topics /metrics is fed from (the server's Prometheus collector, and what serve's engine process
# forwards to it); `requests` (the request-table snapshot, forwarded without its rows) keeps the running
# and waiting gauges current when the queue changes without an iteration (an abort while idle)
METRICS_TOPICS = ("iteration", "request", "event", "gpu", "requests")
# bus topics published with QoS 1 (a result answers a submit, like its reply); the rest of the telemetry is QoS 0
QOS1_TELEMETRY = frozenset({"result"})


def topic_prefix(engine_id: str) -> str:
    return f"{TOPIC_ROOT}/{engine_id}"


def subtopic(prefix: str, topic: str) -> str | None:
    """The part of `topic` after `prefix/`, or None when it is not under the prefix."""
    return topic[len(prefix) + 1:] if topic.startswith(prefix + "/") else None


# -- records --------------------------------------------------------------------------------------
RECORD_TYPES: dict[str, type] = {"iteration": IterationRecord, "request": RequestRecord, "gpu": GpuSample}
_FIELDS: dict[type, tuple[str, ...]] = {}
_EVENT_CORE = ("kind", "time", "iteration")


def encode(record: Any) -> Any:
    """The JSON form of a telemetry record. Dataclass records are read field by field, shallowly:
    `dataclasses.asdict` deep-copies and costs ~10x more, on the loop thread that shares the GIL
    with the engine. Events are flattened (`Event.to_dict()`); mappings are copied."""
    if isinstance(record, Event):
        return record.to_dict()
    if isinstance(record, Mapping):
        return dict(record)
    cls = type(record)
    names = _FIELDS.get(cls)
    if names is None:
        if not dataclasses.is_dataclass(cls):
            to_dict = getattr(record, "to_dict", None)
            return to_dict() if callable(to_dict) else record
        names = _FIELDS[cls] = tuple(f.name for f in dataclasses.fields(cls))
    return {name: getattr(record, name) for name in names}


def decode(topic: str, data: Any) -> Any:
    """The typed record for a JSON object received on `topic` ("iteration", "request", "gpu",
    "event"; other topics keep the dict). Unknown keys are ignored. Raises ValueError if unusable."""
    if not isinstance(data, Mapping):
        raise ValueError(f"a {topic} record must be a JSON object, got {type(data).__name__}")
    try:
        cls = RECORD_TYPES.get(topic)
        if cls is not None:
            names = _FIELDS.get(cls) or _FIELDS.setdefault(cls, tuple(f.name for f in dataclasses.fields(cls)))
            return cls(**{k: data[k] for k in names if k in data})
        if topic == "event":
            rest = {k: v for k, v in data.items() if k not in _EVENT_CORE and k != "type"}
            return Event(str(data["kind"]), float(data.get("time") or 0.0), int(data.get("iteration") or 0), rest)
    except (TypeError, KeyError) as exc:
        raise ValueError(f"malformed {topic} record: {exc}") from None
    return dict(data)


def _finite(value: Any) -> Any:
    """`value` with every NaN/inf float (at any depth) replaced by None: they are not JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _default(obj: Any) -> Any:
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=str)
    return encode(obj) if dataclasses.is_dataclass(obj) or hasattr(obj, "to_dict") else str(obj)


def dumps_text(obj: Any) -> str:
    """Compact JSON text; NaN/inf become null (checked only when the fast path refuses them)."""
    try:
        return json.dumps(obj, separators=(",", ":"), default=_default, allow_nan=False)
    except ValueError:
        return json.dumps(_finite(obj), separators=(",", ":"), default=_default, allow_nan=False)


def dumps(obj: Any) -> bytes:
    """`dumps_text` as UTF-8 bytes (an MQTT payload)."""
    return dumps_text(obj).encode()


# -- control commands -----------------------------------------------------------------------------
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
        if len(str(rid)) > MAX_REQUEST_ID_CHARS:  # no request has such an id: refuse it without echoing it
            return Invalid(cid, f'"request_id" has {len(str(rid))} characters; request ids have at most '
                                f'{MAX_REQUEST_ID_CHARS}')
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


def command(command_id: str | int, op: str, **fields: Any) -> bytes:
    """A control command's payload (what a client publishes on PREFIX/control)."""
    return dumps({"id": command_id, "op": op, **fields})


def reply_json(reply: Mapping[str, Any]) -> bytes:
    """A reply as compact JSON bytes (non-JSON values become strings)."""
    return dumps(reply)
