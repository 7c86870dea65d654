"""A real mosquitto broker for tests, on a free loopback port with its own temp config.

    from tests.mqtt_broker import broker, MqttProbe   # `broker` is a pytest fixture

A test waits for a condition with a generous deadline (`eventually`, `MqttProbe.wait_for`), never
for a fixed time: a loaded 2-core CI machine can be many times slower than a laptop.

Tests using it are skipped when the mosquitto binary is missing (`.ci/run` installs Debian's
`mosquitto`). `Broker.stop()` / `start()` restart it on the same port (retained messages are not
persisted, as after a real broker crash without persistence).
"""
from __future__ import annotations

import asyncio
import inspect
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest

from batchdeck.engine.service.protocol import CONTROL, CONTROL_REPLY, TELEMETRY_TOPICS, subtopic, topic_prefix

MOSQUITTO_CANDIDATES = ("/usr/sbin/mosquitto", "/usr/bin/mosquitto", "/usr/local/sbin/mosquitto")


def mosquitto_binary() -> str | None:
    found = shutil.which("mosquitto")
    if found:
        return found
    return next((p for p in MOSQUITTO_CANDIDATES if os.access(p, os.X_OK)), None)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    """`extra_config`: more mosquitto.conf lines (auth, TLS); `client_kwargs`: what aiomqtt clients
    of the test (MqttProbe, retained) need to connect to it."""

    def __init__(self, binary: str, workdir: Path, port: int | None = None, extra_config: str = "",
                 client_kwargs: dict[str, Any] | None = None):
        self.binary = binary
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.workdir = workdir
        self.client_kwargs = client_kwargs or {}
        self.config = workdir / "mosquitto.conf"
        anonymous = "" if "allow_anonymous" in extra_config else "allow_anonymous true\n"
        # Started as root, mosquitto would switch to the `mosquitto` user, which cannot read the
        # test's private temp files (password file, certificates): keep the current user.
        user = f"user {pwd.getpwuid(os.geteuid()).pw_name}\n" if os.geteuid() == 0 else ""
        self.config.write_text(f"listener {self.port} {self.host}\n{anonymous}{user}persistence false\n{extra_config}")
        self.log = workdir / "mosquitto.log"
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        log = open(self.log, "ab")
        self.proc = subprocess.Popen([self.binary, "-c", str(self.config)], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not listen on {self.address}: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


DEADLINE_S = 60.0  # generous: only a broken run waits this long


REPO = Path(__file__).resolve().parents[1]


def run_batchdeck(args: list[str], drive: Callable[[subprocess.Popen], Awaitable[None]], *, sigterm: bool = True,
                  env_drop: tuple[str, ...] = ()) -> tuple[int, str]:
    """Run `python -m batchdeck ARGS` (this checkout on PYTHONPATH, one OpenMP thread), await `drive(proc)`
    on a fresh loop, then SIGTERM it (unless `sigterm` is False: the drive ends it) and wait for its exit.
    On any failure the process is killed and its stderr's tail printed. Returns (exit status, stderr)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for name in env_drop:
        env.pop(name, None)
    proc = subprocess.Popen([sys.executable, "-m", "batchdeck", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        asyncio.run(drive(proc))
        if sigterm:
            proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    except BaseException:
        if proc.poll() is None:
            proc.kill()
        print(f"batchdeck {args[0]} stderr:", proc.communicate()[1].decode()[-3000:])
        raise
    return proc.returncode, err.decode()


async def wait_online(probe: "MqttProbe", proc: subprocess.Popen, timeout: float = 90.0, what: str = "the engine") -> None:
    """Wait for the retained `online` status of the engine `proc` runs (failing at once if it exits)."""
    deadline = time.monotonic() + timeout
    while b"online" not in probe.on("status"):
        assert proc.poll() is None, proc.communicate()[1].decode()
        assert time.monotonic() < deadline, f"{what} never came online"
        await asyncio.sleep(0.05)


async def eventually(predicate: Callable[[], Any], timeout: float = DEADLINE_S, what: str = "condition") -> Any:
    """Wait until `predicate()` is truthy (polled on the loop; awaited when it returns an awaitable) and
    return its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.fixture
def one_torch_thread():
    """Run the test's engine with one torch thread (restored after). On a small shared CPU machine
    two OpenMP threads contending with other processes make a tiny model's step 20x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def broker(tmp_path):
    binary = mosquitto_binary()
    if binary is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    b = Broker(binary, tmp_path)
    b.start()
    try:
        yield b
    finally:
        b.stop()


class MqttProbe:
    """A test client: subscribes to `batchdeck/<id>/#`, collects every message, sends commands.

    Use as `async with MqttProbe(broker, "e1") as probe:`.
    """

    def __init__(self, broker: Broker, engine_id: str):
        self.broker = broker
        self.prefix = topic_prefix(engine_id)
        self.messages: list[tuple[str, bytes, bool]] = []  # (topic suffix, payload, retain flag)
        self._client: Any = None
        self._reader: asyncio.Task | None = None
        self._n = 0

    async def __aenter__(self) -> "MqttProbe":
        import aiomqtt

        self._client = aiomqtt.Client(self.broker.host, self.broker.port, timeout=5, **self.broker.client_kwargs)
        await self._client.__aenter__()
        await self._client.subscribe(self.prefix + "/#", qos=1)
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        try:
            await self._client.__aexit__(None, None, None)
        except Exception:
            pass

    async def _read(self) -> None:
        async for m in self._client.messages:
            suffix = subtopic(self.prefix, str(m.topic))
            payload = m.payload if isinstance(m.payload, bytes) else str(m.payload).encode()
            self.messages.append((suffix, payload, bool(m.retain)))

    def on(self, suffix: str) -> list[bytes]:
        return [p for s, p, _ in self.messages if s == suffix]

    def json_on(self, suffix: str) -> list[Any]:
        return [json.loads(p) for p in self.on(suffix)]

    def iteration_records(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for body in self.json_on(TELEMETRY_TOPICS["iteration"]):
            out.extend(body if isinstance(body, list) else [body])
        return out

    async def wait_for(self, predicate: Callable[[], Any], timeout: float = DEADLINE_S, what: str = "condition") -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                seen = sorted({s for s, _, _ in self.messages})
                raise AssertionError(f"timed out after {timeout} s waiting for {what}; topics seen: {seen}")
            await asyncio.sleep(0.02)

    async def send(self, payload: bytes | str | dict) -> None:
        if isinstance(payload, dict):
            payload = json.dumps(payload)
        await self._client.publish(f"{self.prefix}/{CONTROL}", payload, qos=1)

    async def command(self, cmd: dict[str, Any], timeout: float = DEADLINE_S) -> dict[str, Any]:
        """Send a command with a fresh id and wait for its reply."""
        self._n += 1
        cid = f"probe-{self._n}"
        await self.send({**cmd, "id": cid})
        return await self.reply_to(cid, timeout)

    async def reply_to(self, cid: Any, timeout: float = DEADLINE_S) -> dict[str, Any]:
        def find() -> dict[str, Any] | None:
            for r in self.json_on(CONTROL_REPLY):
                if r.get("id") == cid:
                    return r
            return None

        return await self.wait_for(find, timeout, f"the reply to {cid!r}")


class ThreadProbe:
    """A probe on its own paho network thread. `connect()` blocks its caller until the subscription
    is confirmed, so right after `Broker.start()` a test is subscribed again before anything on its
    event loop (an engine's bridge reconnecting with queued replies) can publish.

    Messages: (topic suffix, payload, retain flag), appended by the network thread.
    """

    def __init__(self, broker: Broker, engine_id: str, *, username: str | None = None, password: str | None = None,
                 topics: tuple[str, ...] = ("#",)):
        self.broker = broker
        self.prefix = topic_prefix(engine_id)
        self.messages: list[tuple[str, bytes, bool]] = []
        self.username = username if username is not None else broker.client_kwargs.get("username")
        self.password = password if username is not None else broker.client_kwargs.get("password")
        self.topics = topics  # filters under the prefix
        self._client: Any = None

    def connect(self, timeout: float = DEADLINE_S) -> "ThreadProbe":
        import paho.mqtt.client as paho

        client = paho.Client(paho.CallbackAPIVersion.VERSION2, clean_session=True)
        if self.username is not None:
            client.username_pw_set(self.username, self.password)
        subscribed = threading.Event()
        client.on_connect = lambda c, userdata, flags, rc, props=None: c.subscribe(
            [(f"{self.prefix}/{t}", 1) for t in self.topics])
        client.on_subscribe = lambda *args: subscribed.set()
        client.on_message = lambda c, userdata, m: self.messages.append(
            (subtopic(self.prefix, m.topic), bytes(m.payload), bool(m.retain)))
        client.connect(self.broker.host, self.broker.port, keepalive=30)
        client.loop_start()
        self._client = client
        if not subscribed.wait(timeout):
            self.close()
            raise AssertionError(f"probe not subscribed to {self.prefix}/# after {timeout} s")
        return self

    def close(self) -> None:
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
            self._client = None

    def send(self, payload: bytes | str | dict, *, retain: bool = False, timeout: float = DEADLINE_S) -> None:
        self.publish(CONTROL, payload, retain=retain, timeout=timeout)

    def publish(self, suffix: str, payload: bytes | str | dict, *, retain: bool = False,
                timeout: float = DEADLINE_S) -> None:
        """Publish QoS 1 under the prefix; returns once the broker acknowledged it (mosquitto also
        acknowledges a publish its ACL drops)."""
        if isinstance(payload, dict):
            payload = json.dumps(payload)
        info = self._client.publish(f"{self.prefix}/{suffix}", payload, qos=1, retain=retain)
        info.wait_for_publish(timeout)

    def json_on(self, suffix: str) -> list[Any]:
        return [json.loads(p) for s, p, _ in list(self.messages) if s == suffix]

    def on(self, suffix: str) -> list[bytes]:
        return [p for s, p, _ in list(self.messages) if s == suffix]

    def replies(self) -> list[dict[str, Any]]:
        return self.json_on(CONTROL_REPLY)


async def restart_broker(broker, probe: ThreadProbe, bridge: Any, while_down=None, after_start=None) -> None:
    """Stop the broker, wait for the bridge to notice, run `while_down`, start it again and
    re-subscribe the probe (then run `after_start`) before the event loop, and so the bridge, runs again."""
    broker.stop()
    probe.close()
    await eventually(lambda: not bridge.connected, what="the bridge to see the broker gone")
    if while_down is not None:
        await while_down()
    broker.start()
    probe.connect()  # blocks the loop: subscribed before the bridge can reconnect and publish
    if after_start is not None:
        after_start()


async def retained(broker: Broker, topic: str, timeout: float = 5.0) -> bytes | None:
    """The retained payload on `topic` as a fresh client sees it (None if nothing is retained)."""
    import aiomqtt

    async with aiomqtt.Client(broker.host, broker.port, timeout=5, **broker.client_kwargs) as client:
        await client.subscribe(topic, qos=1)
        try:
            async with asyncio.timeout(timeout):
                async for m in client.messages:
                    if m.retain:
                        return m.payload if isinstance(m.payload, bytes) else str(m.payload).encode()
        except TimeoutError:
            return None
    return None
