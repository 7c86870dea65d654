"""The MQTT bridge: telemetry out, control in, for a console or recorder on another host.

The topics, the record encoding and the control schema are the wire protocol's
(engine/service/protocol.py); the console's MQTT client reads the same module. The retained config
is `LLMEngine.config_snapshot()` plus the pause state, republished after every applied change,
pause/resume and reconnect; iteration records are batched (at most one message per
`flush_interval`, a JSON list when there are several); results answer submits and go out with QoS 1.

Telemetry reaches the bridge through bounded Bus subscriptions, so the engine never waits on the
network: iteration records (drop-oldest, `iteration_buffer`), request records / events / results
(drop-oldest, `record_buffer`) and snapshots (coalesced: only the latest request table and GPU
sample are kept). While the broker is away nothing is read, the buffers keep the newest records and
count what they drop (a record taken from the bus but not yet published waits for the next
connection); after reconnecting the bridge republishes its retained status and config and
flushes what was kept. Reconnection backs off exponentially from `reconnect_min` to
`reconnect_max` seconds. `stats()` says how many records were published and dropped.

Control: every command the broker delivers (and the client acknowledges, QoS 1) goes into one
intake queue that outlives the connection, and is started at once -- many commands run at one
iteration boundary, each with its engine calls in arrival order. Replies wait in an outbox until
they are published (an outbox head lost with the connection is published again after reconnecting),
so an acknowledged command is answered exactly once even if the broker goes away meanwhile. A
retained message on the control topic (the broker replays it on every subscribe) is ignored and
logged: control is an imperative, not a state.

`close()` answers the commands received so far, publishes what is still buffered, then the retained
"offline", then disconnects.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import random
import re
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import aiomqtt
import paho.mqtt.client as paho

from batchdeck.engine.service.backoff import Backoff
from batchdeck.engine.service.bus import Bus, Message, Subscription
from batchdeck.engine.service.control import ControlHandler
from batchdeck.engine.service.protocol import (CONFIG, CONTROL, CONTROL_REPLY, INSTANCE, OFFLINE, ONLINE,
                                                QOS1_TELEMETRY, STATUS, TELEMETRY_TOPICS, dumps, encode, error_reply,
                                                reply_json, topic_prefix)

if TYPE_CHECKING:
    from batchdeck.engine.service.async_engine import AsyncEngine

ENGINE_ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
CONFIG_EVENTS = frozenset({"config_change", "pause", "resume"})
_LOST = frozenset({paho.MQTT_ERR_NO_CONN, paho.MQTT_ERR_CONN_LOST, paho.MQTT_ERR_CONN_REFUSED})


class BrokerAddressError(ValueError):
    pass


def parse_broker(address: str, default_port: int = 1883) -> tuple[str, int]:
    """'host', 'host:port' or '[v6addr]:port' -> (host, port)."""
    address = address.strip()
    if not address:
        raise BrokerAddressError("--mqtt needs HOST or HOST:PORT, got an empty string")
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif address.count(":") == 1:
        host, _, port_text = address.partition(":")
    else:
        host, port_text = address, ""
    if not host:
        raise BrokerAddressError(f"--mqtt {address!r}: the host is missing (HOST:PORT)")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise BrokerAddressError(f"--mqtt {address!r}: port must be an integer in [1, 65535], got {port_text!r}")
    return host, int(port_text)


def check_engine_id(engine_id: str) -> str:
    if not isinstance(engine_id, str) or not ENGINE_ID_RE.match(engine_id):
        raise ValueError(f"engine id {engine_id!r} must be 1-128 characters of letters, digits, '_', '.', ':' or '-' "
                         "(it becomes a topic level: no '/', '+', '#' or spaces)")
    return engine_id


@dataclass
class MqttSettings:
    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_certs: str | None = None  # None with tls: the system's trusted CAs
    certfile: str | None = None
    keyfile: str | None = None
    tls_insecure: bool = False  # skip the host name check (self-signed test brokers)
    keepalive: int = 15
    timeout: float = 5.0  # connect / publish / disconnect

    def client_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"username": self.username, "password": self.password,
                              "keepalive": self.keepalive, "timeout": self.timeout}
        if self.tls or self.ca_certs or self.certfile:
            kw["tls_params"] = aiomqtt.TLSParameters(ca_certs=self.ca_certs, certfile=self.certfile,
                                                     keyfile=self.keyfile)
            if self.tls_insecure:
                kw["tls_insecure"] = True
        return kw


async def _cancel(*tasks: asyncio.Future, timeout: float = 2.0) -> None:
    """Cancel and wait, cancelling again while a task goes on (Python 3.11's wait_for can swallow a
    cancellation that races with the inner future's completion)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    pending = [t for t in tasks if not t.done()]
    while pending and loop.time() < deadline:
        for t in pending:
            t.cancel()
        await asyncio.wait(pending, timeout=0.05)
        pending = [t for t in pending if not t.done()]
    for t in tasks:
        if t.done() and not t.cancelled():
            t.exception()  # retrieved: no "exception was never retrieved" warnings


class _Forwarder(asyncio.Queue):
    """One connection's incoming-message queue (aiomqtt's `queue_type`): paho's message callback,
    which runs before the QoS 1 acknowledgement goes out, hands each message straight to the
    bridge's intake, which outlives the connection. Nothing stays here, so iterating
    `client.messages` only waits for the connection to end (and then raises)."""

    def __init__(self, intake: asyncio.Queue):
        super().__init__()
        self._intake = intake

    def put_nowait(self, item: Any) -> None:
        self._intake.put_nowait(item)


_log_info = logging.getLogger(__name__).info  # the default `log`: the connection's ups
_log_warning = logging.getLogger(__name__).warning  # the default `warn`: its downs, refused logins, retained commands
REFUSED_LOGIN = {4, 5, 134, 135}  # CONNACK codes: bad user name or password / not authorized (MQTT 3.1.1, 5)


def refused_login(exc: BaseException) -> bool:
    """Whether the broker turned the connection down for its credentials (retrying cannot help until
    they or its ACL change)."""
    rc = getattr(exc, "rc", None)
    try:
        return int(getattr(rc, "value", rc)) in REFUSED_LOGIN
    except (TypeError, ValueError):
        return False


class MqttBridge:
    def __init__(self, engine: "AsyncEngine", bus: Bus, engine_id: str, settings: MqttSettings, *,
                 read_only: bool = False, control: ControlHandler | None = None, publish_results: bool = True,
                 flush_interval: float = 0.1, max_batch: int = 256, max_running_commands: int = 256,
                 iteration_buffer: int = 1024, record_buffer: int = 4096,
                 reconnect_min: float = 0.1, reconnect_max: float = 5.0,
                 log: Callable[[str], None] | None = _log_info, warn: Callable[[str], None] | None = _log_warning):
        self.engine = engine
        self.bus = bus
        self.engine_id = check_engine_id(engine_id)
        self.settings = settings
        self.prefix = topic_prefix(engine_id)
        self.control = control or ControlHandler(engine, read_only=read_only, source="mqtt")
        self.publish_results = publish_results
        if self.control.on_result is None and publish_results:
            self.control.on_result = lambda line: bus.publish("result", line)
        if self.control.on_config is None:
            self.control.on_config = self._republish_config
        self.flush_interval = flush_interval
        self.max_batch = max_batch
        self.iteration_buffer = iteration_buffer
        self.record_buffer = record_buffer
        self.reconnect_min = reconnect_min
        self.reconnect_max = reconnect_max
        self.log = log or (lambda line: None)
        self.warn = warn or (lambda line: None)
        self.connected = False
        self.connects = 0
        self.published = 0
        self.publish_dropped = 0  # batches/records lost in a failed or refused publish
        self.last_error: str | None = None
        self.offline_published = False
        self._client: aiomqtt.Client | None = None
        self._subs: list[Subscription] = []
        self._task: asyncio.Task | None = None
        self._closing = False
        self._close_requested: asyncio.Event | None = None
        self._config_key: tuple | None = None
        self._last_iter_flush = 0.0
        self._ever_connected = False
        # Who this engine is to others on the same engine id (several engines on one id all run every command,
        # and each one's exit would publish "offline" for the others): announced at each connect.
        self.instance = {"instance": f"{random.randrange(1 << 64):016x}", "host": socket.gethostname(),
                         "pid": os.getpid()}
        self.others: dict[str, dict[str, Any]] = {}  # other instances seen on this engine id
        self._failures = 0
        # Control: the intake outlives every connection (each client forwards into it, see _Forwarder);
        # the outbox holds each command's handler task in arrival order until its reply is published.
        self.max_running_commands = max_running_commands
        self.commands_received = 0
        self.replies_published = 0
        self.retained_ignored = 0
        self._intake: asyncio.Queue[aiomqtt.Message] | None = None
        self._outbox: collections.deque[asyncio.Task] = collections.deque()
        self._record_backlog: collections.deque[Message] = collections.deque()  # taken from the bus, unpublished
        self._reply_ready: asyncio.Event | None = None
        self._running_commands: asyncio.Semaphore | None = None
        self._command_task: asyncio.Task | None = None

    def topic(self, suffix: str) -> str:
        return f"{self.prefix}/{suffix}"

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        """Subscribe to the bus and start connecting (in the background; never waits for the broker)."""
        if self._task is not None:
            raise RuntimeError("MqttBridge already started")
        self._close_requested = asyncio.Event()
        records = {"request", "event", "result"} if self.publish_results else {"request", "event"}
        self._subs = [
            self.bus.subscribe({"iteration"}, maxsize=self.iteration_buffer, name="mqtt-iteration"),
            self.bus.subscribe(records, maxsize=self.record_buffer, name="mqtt-records"),
            self.bus.subscribe({"requests", "gpu"}, policy="coalesce", name="mqtt-snapshots"),
        ]
        self._intake = asyncio.Queue()
        self._reply_ready = asyncio.Event()
        self._running_commands = asyncio.Semaphore(self.max_running_commands)
        self._command_task = asyncio.create_task(self._command_worker(), name="mqtt-commands")
        self._task = asyncio.create_task(self._run(), name="mqtt-bridge")

    async def wait_connected(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.connected:
            if time.monotonic() > deadline:
                raise TimeoutError(f"not connected to {self.settings.host}:{self.settings.port} "
                                   f"after {timeout} s ({self.last_error})")
            await asyncio.sleep(0.02)

    async def close(self, timeout: float = 5.0) -> None:
        """Flush buffered telemetry, publish retained "offline" and disconnect (when connected)."""
        if self._task is None:
            return
        self._closing = True
        self.control.stop_admitting()
        await self.control.close(grace=min(0.5, timeout / 4))  # results of just-aborted requests go out
        assert self._close_requested is not None
        self._close_requested.set()
        if self.connected:  # the session answers, flushes, publishes "offline" and disconnects
            await asyncio.wait([self._task], timeout=timeout)
        await _cancel(self._task)  # connecting or backing off (nothing can be published), or stuck
        assert self._command_task is not None
        await _cancel(self._command_task, *self._outbox)
        for sub in self._subs:
            sub.close()

    def stats(self) -> dict[str, Any]:
        dropped = sum(s.dropped for s in self._subs) + self.publish_dropped
        return {"connected": self.connected, "connects": self.connects, "published": self.published,
                "dropped": dropped, "publish_dropped": self.publish_dropped,
                "commands_received": self.commands_received, "replies_published": self.replies_published,
                "commands_running": sum(not t.done() for t in self._outbox),
                "replies_pending": len(self._outbox), "retained_ignored": self.retained_ignored,
                "subscriptions": [s.stats() for s in self._subs], "last_error": self.last_error}

    # -- connection loop ------------------------------------------------------------------------
    def _make_client(self) -> aiomqtt.Client:
        s = self.settings
        return aiomqtt.Client(
            s.host, s.port,
            identifier=f"batchdeck-{self.engine_id}-{os.getpid()}-{random.randrange(1 << 32):08x}",
            will=aiomqtt.Will(self.topic(STATUS), OFFLINE, qos=1, retain=True),
            clean_session=True, max_queued_outgoing_messages=10_000,
            queue_type=self._intake_for_client,  # incoming commands land in the bridge's own intake
            **s.client_kwargs(),
        )

    def _intake_for_client(self, maxsize: int = 0) -> asyncio.Queue:
        assert self._intake is not None
        return _Forwarder(self._intake)

    async def _run(self) -> None:
        backoff = Backoff(self.reconnect_min, self.reconnect_max)
        while not self._closing:
            session = False
            try:
                async with self._make_client() as client:
                    session = True
                    self._client = client
                    self.connects += 1
                    self._failures = 0
                    backoff.reset()
                    self._config_key = None
                    await self._on_connected(client)
                    self.connected = True  # status "online" and the config are out
                    self.log(f"mqtt: connected to {self.settings.host}:{self.settings.port} as {self.prefix}"
                             + (" (reconnected)" if self._ever_connected else ""))
                    self._ever_connected = True
                    await self._serve(client)
                    return  # close requested, offline published
            except Exception as exc:  # noqa: BLE001 - MqttError or a bug: either way, reconnect
                self.last_error = str(exc) or type(exc).__name__
                if not isinstance(exc, aiomqtt.MqttError):
                    self.last_error = f"{type(exc).__name__}: {exc}"
                self._failures += 1
                if refused_login(exc):
                    if self._failures == 1 or self._failures % 20 == 0:
                        self.warn(f"mqtt: the broker refused the login ({self.last_error}): check --mqtt-username "
                                  f"and the password file (or the broker's ACL); retrying with backoff up to "
                                  f"{self.reconnect_max:g} s")
                elif session or self._failures == 1 or self._failures % 20 == 0:
                    self.warn(f"mqtt: {'connection lost' if session else 'cannot connect'} "
                              f"({self.last_error}); retrying with backoff up to {self.reconnect_max:g} s")
            finally:
                self.connected = False
                self._client = None
            if self._closing:
                return
            await asyncio.sleep(backoff.delay())

    async def _on_connected(self, client: aiomqtt.Client) -> None:
        await client.subscribe(self.topic(CONTROL), qos=1)
        await client.subscribe(self.topic(INSTANCE), qos=1)
        await client.subscribe(self.topic(STATUS), qos=1)
        await client.publish(self.topic(STATUS), ONLINE, qos=1, retain=True)
        await self._publish_config(client)
        await client.publish(self.topic(INSTANCE), dumps(self.instance), qos=1)

    async def _on_peer_message(self, message: Any) -> None:
        """PREFIX/instance and PREFIX/status from others on this engine id: say when another engine shares
        it (and announce this one back once, so it learns too); while running, answer an "offline" (another
        engine on this id left, or this one's stale Last Will) with "online" again."""
        client = self._client
        if message.topic.matches(self.topic(INSTANCE)):
            try:
                other = json.loads(message.payload)
            except (ValueError, TypeError):
                return
            key = other.get("instance") if isinstance(other, dict) else None
            if not isinstance(key, str) or key == self.instance["instance"] or key in self.others:
                return
            self.others[key] = other
            self.warn(f"mqtt: another engine uses engine id {self.engine_id!r} (host {other.get('host')!r}, pid "
                      f"{other.get('pid')!r}): every command on {self.topic(CONTROL)} runs on both; give each engine "
                      "its own --engine-id")
            if client is not None:
                with contextlib.suppress(aiomqtt.MqttError):
                    await client.publish(self.topic(INSTANCE), dumps(self.instance), qos=1)
        elif message.payload == OFFLINE and not message.retain and not self._closing and client is not None:
            with contextlib.suppress(aiomqtt.MqttError):
                await client.publish(self.topic(STATUS), ONLINE, qos=1, retain=True)

    async def _serve(self, client: aiomqtt.Client) -> None:
        """Run one connected session until the connection fails (raises) or close is requested."""
        assert self._close_requested is not None
        pumps = [asyncio.create_task(self._watch_connection(client), name="mqtt-connection"),
                 asyncio.create_task(self._reply_pump(client), name="mqtt-replies"),
                 asyncio.create_task(self._iteration_pump(client), name="mqtt-iterations"),
                 asyncio.create_task(self._record_pump(client), name="mqtt-records"),
                 asyncio.create_task(self._snapshot_pump(client), name="mqtt-snapshots")]
        closer = asyncio.create_task(self._close_requested.wait())
        try:
            await asyncio.wait([*pumps, closer], return_when=asyncio.FIRST_COMPLETED)
            if not closer.done():  # a pump failed: the connection is gone
                for t in pumps:
                    if t.done() and not t.cancelled() and t.exception() is not None:
                        raise t.exception()
                raise aiomqtt.MqttError("a bridge task ended unexpectedly")
            # Close requested: the pumps publish what is buffered (replies included) and end by themselves.
            await asyncio.wait(pumps, timeout=max(0.5, self.settings.timeout - 1.0))
            for t in pumps:
                if t.done() and not t.cancelled() and t.exception() is not None:
                    raise t.exception()
        finally:
            await _cancel(*pumps, closer)
        await self._flush_all(client)
        await client.publish(self.topic(STATUS), OFFLINE, qos=1, retain=True)
        self.offline_published = True

    # -- publishing -----------------------------------------------------------------------------
    async def _publish(self, client: aiomqtt.Client, suffix: str, payload: bytes, *, qos: int = 0,
                       retain: bool = False, count: int = 1, keep: bool = False) -> bool:
        """Publish; a refused or timed-out publish is counted as dropped (False), a lost connection
        raises (counted as dropped unless `keep`: the caller publishes it again after reconnecting)."""
        try:
            await client.publish(self.topic(suffix), payload, qos=qos, retain=retain)
            self.published += count
            return True
        except aiomqtt.MqttCodeError as exc:
            if exc.rc in _LOST:
                if not keep:
                    self.publish_dropped += count
                raise
            self.publish_dropped += count
            return False  # e.g. the outgoing queue is full: a slow broker
        except aiomqtt.MqttError:  # timed out waiting for the broker
            self.publish_dropped += count
            return False

    async def _publish_config(self, client: aiomqtt.Client, *, force: bool = True) -> None:
        snap = self.engine.engine.config_snapshot()
        snap["paused"] = self.engine.paused
        key = (snap["version"], snap["paused"])
        if not force and key == self._config_key:
            return
        self._config_key = key
        await self._publish(client, CONFIG, dumps(snap), qos=1, retain=True)

    async def _republish_config(self) -> None:
        client = self._client
        if client is not None and self.connected:
            await self._publish_config(client, force=False)

    async def _publish_iterations(self, client: aiomqtt.Client, records: list[Any]) -> None:
        body = [encode(r) for r in records]
        await self._publish(client, TELEMETRY_TOPICS["iteration"], dumps(body[0] if len(body) == 1 else body),
                            count=len(body))

    async def _publish_message(self, client: aiomqtt.Client, msg: Message, *, keep: bool = False) -> None:
        await self._publish(client, TELEMETRY_TOPICS[msg.topic], dumps(encode(msg.record)),
                            qos=1 if msg.topic in QOS1_TELEMETRY else 0, keep=keep)
        if msg.topic == "event" and getattr(msg.record, "kind", None) in CONFIG_EVENTS:
            await self._publish_config(client, force=False)

    async def _flush_all(self, client: aiomqtt.Client) -> None:
        iter_sub, rec_sub, snap_sub = self._subs
        while True:
            batch = iter_sub.drain(self.max_batch)
            if not batch:
                break
            await self._publish_iterations(client, [m.record for m in batch])
        self._record_backlog.extend(rec_sub.drain())
        while self._record_backlog:
            await self._publish_message(client, self._record_backlog.popleft())
        for msg in snap_sub.drain():
            await self._publish_message(client, msg)

    # -- pumps (one connected session) ----------------------------------------------------------
    # A pump is never cancelled in the middle of a publish on close: once close is requested it
    # publishes what is buffered and returns (a record taken from the bus is not lost on the way).
    async def _next(self, sub: Subscription) -> Message | None:
        """The next message; None once close is requested and nothing is buffered."""
        msg = sub.get_nowait()
        if msg is not None:
            return msg
        assert self._close_requested is not None
        if self._close_requested.is_set():
            return None
        getter = asyncio.ensure_future(sub.get())
        closer = asyncio.ensure_future(self._close_requested.wait())
        try:
            await asyncio.wait([getter, closer], return_when=asyncio.FIRST_COMPLETED)
        finally:
            closer.cancel()
            if not getter.done():
                getter.cancel()  # waiting in Subscription.get takes nothing from the buffer
        if getter.done() and not getter.cancelled():
            return getter.result()
        return sub.get_nowait()

    async def _gather(self, since: float) -> None:
        """Sleep until `flush_interval` after `since` (or close): records pile up meanwhile, so the
        engine thread wakes this loop at most once per interval instead of once per record."""
        assert self._close_requested is not None
        wait = since + self.flush_interval - asyncio.get_running_loop().time()
        if wait > 0 and not self._close_requested.is_set():
            closer = asyncio.ensure_future(self._close_requested.wait())
            try:
                await asyncio.wait([closer], timeout=wait)
            finally:
                closer.cancel()

    async def _iteration_pump(self, client: aiomqtt.Client) -> None:
        sub = self._subs[0]
        loop = asyncio.get_running_loop()
        while (first := await self._next(sub)) is not None:
            await self._gather(self._last_iter_flush)
            records = [first.record] + [m.record for m in sub.drain(self.max_batch - 1)]
            self._last_iter_flush = loop.time()
            await self._publish_iterations(client, records)

    async def _record_pump(self, client: aiomqtt.Client) -> None:
        """Request records, events and results. What it took from the bus waits in `_record_backlog`
        until published: one lost with the connection goes out first in the next session."""
        sub = self._subs[1]
        backlog = self._record_backlog
        loop = asyncio.get_running_loop()
        last = 0.0
        while True:
            while backlog:
                await self._publish_message(client, backlog[0], keep=True)
                backlog.popleft()
            first = await self._next(sub)
            if first is None:
                return
            await self._gather(last)
            last = loop.time()
            backlog.extend([first, *sub.drain()])

    async def _snapshot_pump(self, client: aiomqtt.Client) -> None:
        sub = self._subs[2]
        while (msg := await self._next(sub)) is not None:
            await self._publish_message(client, msg)

    # -- control: intake (any connection) -> handler tasks -> outbox -> reply pump (this connection)
    async def _command_worker(self) -> None:
        """Start a handler for every command taken in, at once and in arrival order (their engine
        calls queue in that order and run together at the next iteration boundary). Runs for the
        bridge's lifetime, connected or not."""
        assert self._intake is not None and self._running_commands is not None and self._reply_ready is not None
        control_topic = self.topic(CONTROL)
        while True:
            message = await self._intake.get()
            if not message.topic.matches(control_topic):
                await self._on_peer_message(message)
                continue
            if message.retain:
                self.retained_ignored += 1
                self.warn(f"mqtt: ignored a retained message on {control_topic} (control is never retained; "
                          f"clear it with: mosquitto_pub -r -n -t {control_topic})")
                continue
            self.commands_received += 1
            await self._running_commands.acquire()
            task = asyncio.create_task(self.control.handle(message.payload), name="mqtt-command")
            task.add_done_callback(self._command_done)
            self._outbox.append(task)

    def _command_done(self, _task: asyncio.Task) -> None:
        assert self._running_commands is not None and self._reply_ready is not None
        self._running_commands.release()
        self._reply_ready.set()

    def _reply_of(self, task: asyncio.Task) -> dict[str, Any]:
        if not task.cancelled() and task.exception() is None:
            return task.result()
        why = "cancelled" if task.cancelled() else f"{type(task.exception()).__name__}: {task.exception()}"
        return error_reply(None, f"a command failed unexpectedly ({why})")

    async def _watch_connection(self, client: aiomqtt.Client) -> None:
        """Raises when the connection ends (messages themselves go to the intake, see _Forwarder);
        returns once close is requested."""
        assert self._close_requested is not None
        watch = asyncio.ensure_future(anext(aiter(client.messages)))
        watch.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved, also when abandoned
        closer = asyncio.ensure_future(self._close_requested.wait())
        try:
            await asyncio.wait([watch, closer], return_when=asyncio.FIRST_COMPLETED)
        finally:
            closer.cancel()
            if not watch.done():
                watch.cancel()
        if watch.done() and not watch.cancelled():
            watch.result()  # raises MqttError: disconnected

    async def _reply_pump(self, client: aiomqtt.Client) -> None:
        """Publish replies in command order; a reply leaves the outbox only once it is published
        (a lost connection raises with the reply still at the head, for the next session). Once
        close is requested, ends when every command received so far is answered."""
        assert self._reply_ready is not None and self._close_requested is not None
        outbox = self._outbox
        while True:
            while outbox and outbox[0].done():
                if await self._publish(client, CONTROL_REPLY, reply_json(self._reply_of(outbox[0])), qos=1,
                                       keep=True):
                    self.replies_published += 1
                outbox.popleft()
            closing = self._close_requested.is_set()
            if closing and not outbox and (self._intake is None or self._intake.empty()):
                return
            self._reply_ready.clear()
            if outbox and outbox[0].done():
                continue
            ready = asyncio.ensure_future(self._reply_ready.wait())
            closer = asyncio.ensure_future(self._close_requested.wait())
            try:  # once closing, poll: the commands still running or still in the intake are answered
                await asyncio.wait([ready] if closing else [ready, closer], return_when=asyncio.FIRST_COMPLETED,
                                   timeout=0.05 if closing else None)
            finally:
                ready.cancel()
                closer.cancel()
