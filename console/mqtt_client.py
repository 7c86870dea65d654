"""`MqttClient`: the console attached to a headless engine over MQTT (issue #4's topic contract).

Topics, record decoding and the command form are the wire protocol's (engine/service/protocol.py),
the module the engine's MQTT bridge publishes with.

Connection state: `connecting` until the first broker connection, then `connected` while the broker
link is up and the engine's status is online, `engine offline` while it is not, and `reconnecting`
(with backoff) after the broker link drops. Nothing on screen is cleared when the link drops; the
dashboard keeps the last data and carries on when messages flow again.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import ssl
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterable, Mapping
from urllib.parse import unquote, urlparse

from batchdeck.console.client import Client, CommandResult, ConnectionState, as_request_list, merge_submit_results
from batchdeck.engine.service.backoff import Backoff
from batchdeck.engine.service.protocol import (BUS_TOPICS, CONFIG, CONTROL, CONTROL_REPLY, STATUS, command, decode,
                                                subtopic, topic_prefix)

SHOWN = frozenset({"iteration", "request", "gpu", "requests", "event"})  # telemetry the console displays


@dataclass(frozen=True)
class AttachTarget:
    host: str
    port: int
    engine_id: str
    username: str | None = None
    password: str | None = None
    tls: bool = False

    @property
    def prefix(self) -> str:
        return topic_prefix(self.engine_id)


def parse_attach_url(url: str) -> AttachTarget:
    """`mqtt://[user:pass@]HOST[:PORT]/ENGINE_ID` (`mqtts://` for TLS); ValueError says what is wrong."""
    parsed = urlparse(url if "://" in url else f"mqtt://{url}")
    if parsed.scheme not in ("mqtt", "mqtts"):
        raise ValueError(f"--attach {url!r}: the scheme must be mqtt:// or mqtts://")
    if not parsed.hostname:
        raise ValueError(f"--attach {url!r}: no broker host; expected mqtt://HOST:PORT/ENGINE_ID")
    engine_id = parsed.path.strip("/")
    if not engine_id or "/" in engine_id or "+" in engine_id or "#" in engine_id:
        raise ValueError(f"--attach {url!r}: expected one engine id after the host, as in mqtt://HOST:PORT/ENGINE_ID")
    try:
        port = parsed.port or (8883 if parsed.scheme == "mqtts" else 1883)
    except ValueError:
        raise ValueError(f"--attach {url!r}: the port must be a number in 1..65535") from None
    return AttachTarget(parsed.hostname, port, engine_id,
                        unquote(parsed.username) if parsed.username else None,
                        unquote(parsed.password) if parsed.password else None, parsed.scheme == "mqtts")


class MqttClient(Client):
    kind = "mqtt"

    def __init__(self, target: AttachTarget | str, *, reply_timeout: float = 5.0, backoff: tuple[float, float] = (0.2, 5.0),
                 keepalive: int = 5) -> None:
        super().__init__()
        self.target = parse_attach_url(target) if isinstance(target, str) else target
        self.prefix = self.target.prefix
        self.reply_timeout = reply_timeout
        self.backoff = backoff
        self.keepalive = keepalive
        self.state = ConnectionState.CONNECTING
        self.engine_status: str | None = None  # the retained PREFIX/status payload
        self.description = f"{self.prefix} @ {self.target.host}:{self.target.port}"
        self.connects = 0
        self.last_error: str | None = None
        self._client: Any = None
        self._connected = False
        self._pending: dict[str, asyncio.Future] = {}
        self._ids = itertools.count(1)
        self._session = uuid.uuid4().hex[:8]
        self._task: asyncio.Task | None = None
        self._first_attempt: asyncio.Event | None = None
        self._last_time: float | None = None  # newest engine time in a record
        self._last_seen = 0.0  # monotonic when it arrived

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._task is None:
            self._first_attempt = asyncio.Event()
            self._task = asyncio.create_task(self._run(), name="mqtt-client")
            try:
                await asyncio.wait_for(self._first_attempt.wait(), timeout=self.reply_timeout)
            except asyncio.TimeoutError:
                pass

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None
        self._fail_pending("the console is closing")
        self.state = ConnectionState.STOPPED

    def _update_state(self) -> None:
        if not self._connected:
            self.state = ConnectionState.RECONNECTING if self.connects else ConnectionState.CONNECTING
        elif self.engine_status == "online":
            self.state = ConnectionState.CONNECTED
        else:
            self.state = ConnectionState.OFFLINE

    async def _run(self) -> None:
        import aiomqtt

        backoff = Backoff(*self.backoff)
        t = self.target
        while True:
            tls = ssl.create_default_context() if t.tls else None
            try:
                async with aiomqtt.Client(t.host, t.port, username=t.username, password=t.password,
                                          identifier=f"batchdeck-console-{self._session}", keepalive=self.keepalive,
                                          tls_context=tls, timeout=self.reply_timeout) as client:
                    self._client = client
                    await client.subscribe(f"{self.prefix}/#", qos=1)
                    self._connected = True
                    self.connects += 1
                    backoff.reset()
                    self._update_state()
                    self._first_attempt.set()
                    async for message in client.messages:
                        self._on_message(str(message.topic), message.payload)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # aiomqtt.MqttError and socket errors: try again later
                self.last_error = f"{type(exc).__name__}: {exc}"
            finally:
                self._client = None
                self._connected = False
                self._update_state()
                self._fail_pending("the broker link dropped before the engine replied")
            self._first_attempt.set()
            await asyncio.sleep(backoff.delay())

    def _fail_pending(self, why: str) -> None:
        for fut in self._pending.values():
            if not fut.done():
                fut.set_result({"ok": False, "error": why})
        self._pending.clear()

    # -- incoming -------------------------------------------------------------------------------
    def _on_message(self, topic: str, payload: Any) -> None:
        sub = subtopic(self.prefix, topic)
        if sub is None:
            return
        raw = payload.decode("utf-8", errors="replace") if isinstance(payload, (bytes, bytearray)) else str(payload)
        if sub == STATUS:
            self.engine_status = raw.strip().strip('"') or None
            self._update_state()
            return
        if sub == CONTROL:
            return  # our own (or another console's) commands
        try:
            data = json.loads(raw) if raw else None
        except json.JSONDecodeError:
            return
        if sub == CONTROL_REPLY:
            if isinstance(data, dict):
                fut = self._pending.pop(str(data.get("id")), None)
                if fut is not None and not fut.done():
                    fut.set_result(data)
            return
        if sub == CONFIG:
            if isinstance(data, dict):
                self.config_snapshot = {**(self.config_snapshot or {}), **data}
                sim = (data.get("engine") or {}).get("simulation")
                if sim:  # a simulated engine: the header says so, and which profile
                    self.description = (f"SIMULATED {sim.get('device_name')} (profile {sim.get('profile')}) · "
                                        f"{self.prefix} @ {self.target.host}:{self.target.port}")
                self._push("config", dict(self.config_snapshot))
            return
        kind = BUS_TOPICS.get(sub)
        if kind not in SHOWN:
            return
        items = data if isinstance(data, list) else [data]
        for item in items:
            if not isinstance(item, dict):
                continue
            try:
                record = decode(kind, item)
            except ValueError:
                continue
            stamp = item.get("time")
            if isinstance(stamp, (int, float)) and (self._last_time is None or stamp >= self._last_time):
                self._last_time, self._last_seen = float(stamp), time.monotonic()
            self._push(kind, record)

    def now(self) -> float | None:
        if self._last_time is None:
            return None
        if self.state == ConnectionState.CONNECTED:
            return self._last_time + min(time.monotonic() - self._last_seen, 2.0)
        return self._last_time  # link down or engine gone: hold the picture still

    # -- commands -------------------------------------------------------------------------------
    async def _command(self, op: str, **fields: Any) -> dict[str, Any]:
        client = self._client
        if client is None or not self._connected:
            return {"ok": False, "error": f"not connected to the broker ({self.state}); try again when connected"}
        if self.engine_status != "online":
            return {"ok": False, "error": f"the engine {self.target.engine_id!r} is offline"}
        cid = f"{self._session}-{next(self._ids)}"
        fut = asyncio.get_running_loop().create_future()
        self._pending[cid] = fut
        try:
            await client.publish(f"{self.prefix}/{CONTROL}", command(cid, op, **fields), qos=1)
            return await asyncio.wait_for(fut, timeout=self.reply_timeout)
        except asyncio.TimeoutError:
            return {"ok": False, "error": f"no reply from the engine within {self.reply_timeout:g}s"}
        except Exception as exc:
            return {"ok": False, "error": f"could not send the command: {type(exc).__name__}: {exc}"}
        finally:
            self._pending.pop(cid, None)

    @staticmethod
    def _result(op: str, reply: Mapping[str, Any], data: Any = None) -> CommandResult:
        if not reply.get("ok"):
            return CommandResult(False, op, error=str(reply.get("error") or "refused (no reason given)"))
        return CommandResult(True, op, applied_iteration=reply.get("applied_iteration"), config=reply.get("config"),
                             data=data if data is not None else reply.get("iteration"))

    async def get_config(self) -> CommandResult:
        reply = await self._command("get")
        result = self._result("get", reply)
        if result.ok and isinstance(reply.get("config"), dict):
            cfg = reply["config"]
            snap = cfg if "config" in cfg else {**(self.config_snapshot or {}), "config": cfg, "version": cfg.get("version")}
            for key in ("bounds", "version", "engine"):
                if key in reply:
                    snap[key] = reply[key]
            self.config_snapshot = snap
            result.config = snap
        return result

    async def set(self, changes: Mapping[str, Any]) -> CommandResult:
        reply = await self._command("set", params=dict(changes))
        result = self._result("set", reply)
        if result.ok and isinstance(result.config, dict) and self.config_snapshot is not None:
            cfg = result.config.get("config", result.config)
            self.config_snapshot = {**self.config_snapshot, "config": cfg, "version": cfg.get("version")}
            result.config = cfg
        return result

    async def pause(self) -> CommandResult:
        return self._result("pause", await self._command("pause"))

    async def resume(self) -> CommandResult:
        return self._result("resume", await self._command("resume"))

    async def abort(self, request_id: str) -> CommandResult:
        return self._result("abort", await self._command("abort", request_id=str(request_id)), data=str(request_id))

    async def submit(self, requests: Mapping[str, Any] | Iterable[Mapping[str, Any]]) -> CommandResult:
        items = as_request_list(requests)
        replies = await asyncio.gather(*(self._command("submit", request=dict(r)) for r in items))
        return merge_submit_results([self._result("submit", rep, data=str(r.get("id", "?")))
                                     for r, rep in zip(items, replies)])
