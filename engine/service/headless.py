"""`batchdeck engine`: the engine without a UI, serving a preset and/or requests over MQTT.

    batchdeck engine --model M [--preset P] [--mqtt HOST[:PORT]] [--engine-id ID] [--device ...]
                     [sizing flags as in generate] [--read-only] [--no-results]
                     [--mqtt-username U --mqtt-password-file FILE] [--mqtt-tls --mqtt-ca FILE ...]
                     [--status-interval S]

- With `--preset`, its workload is served (open-loop requests at their arrival times on the engine
  clock, closed-loop clients re-issuing on finish) and its timeline applied (`set` with source
  "preset", pause/resume), through the `PresetHooks` the command line wires in (the service does
  not import presets). Sizing and live settings come from the preset; flags given on the command
  line override them.
- With `--mqtt`, telemetry is published and control obeyed (engine/mqtt_bridge.py) until SIGINT or
  SIGTERM; the preset (if any) runs meanwhile. Without `--mqtt` the preset runs to its end and the
  command exits.
- Security: without broker credentials anyone who reaches the broker can steer the engine and read
  every MQTT-submitted prompt on PREFIX/results; a warning says so at start. The password comes from
  `--mqtt-password-file` or $BATCHDECK_MQTT_PASSWORD (never visible in `ps`); `--no-results`
  publishes no results; a broker ACL (README, "Securing MQTT") decides who may publish control.
- Every `--status-interval` seconds a vLLM-style status line goes to stderr; everything else it
  says (loading, shutdown, the MQTT link) is logged (`logging`, `--log-level`).
- On SIGINT/SIGTERM: stop admitting (preset and MQTT submits), give in-flight requests up to
  `--drain-timeout` seconds (default 0) to finish, abort the rest (listed on stderr; each also
  produces a RequestRecord with finish_reason "abort"), flush telemetry, publish the retained
  "offline", exit 0. A second signal exits at once (status 130).
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import signal
import socket
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, TextIO

from batchdeck.engine.service.flags import add_engine_flags
from batchdeck.engine.service.served_model import EngineDeadError

PROG = "batchdeck engine"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PresetHooks:
    """What `batchdeck engine --preset` needs from the presets room, handed in by the command line.

    load(name_or_path) -> the preset (a shipped preset's name or a YAML file); its settings under
    the flags given become the engine's configs through `flags.engine_configs`.
    driver(async_engine, preset, speed=, duration_scale=) -> an object with `async run()` and
    `progress() -> {"finished", "rejected", ...}` that plays it.
    """

    load: Callable[[str], Any]
    driver: Callable[..., Any]


def register_cli(subparsers: Any, presets: PresetHooks | None = None) -> None:
    """Add `batchdeck engine`; without `presets`, `--preset` is refused."""
    p = subparsers.add_parser(
        "engine", help="run the engine headless: a preset's workload and/or MQTT telemetry and control",
        description="Run the engine without a UI. Serves a preset's workload (--preset) and requests submitted "
                    "over MQTT (--mqtt), publishes telemetry, obeys control commands, prints a periodic "
                    "status line; SIGINT/SIGTERM aborts in-flight requests, publishes offline and exits 0.")
    add_engine_flags(p)  # a preset's settings apply unless the flag is given
    p.add_argument("--preset", default=None, help="a shipped preset's name or a preset YAML file")
    p.add_argument("--speed", type=float, default=1.0, help="play the preset this many times faster")
    p.add_argument("--duration-scale", type=float, default=1.0, help="shorten (<1) or stretch the preset")
    add_runner_flags(p)
    p.set_defaults(func=_cmd_engine, preset_hooks=presets)


def add_runner_flags(p: argparse.ArgumentParser) -> None:
    """The flags of a HeadlessRunner: MQTT telemetry and control, status lines, GPU sampling, draining
    (shared by `batchdeck engine` and `batchdeck serve`)."""
    p.add_argument("--mqtt", default=None, metavar="HOST[:PORT]", help="MQTT broker (default port 1883)")
    p.add_argument("--engine-id", default=None, help="topic prefix batchdeck/<ID> (default: the host name)")
    p.add_argument("--read-only", action="store_true", help="refuse every control command that changes anything")
    p.add_argument("--no-results", action="store_true",
                   help="do not publish PREFIX/results (each MQTT-submitted request's prompt and output, readable "
                        "by every subscriber the broker's ACL lets in)")
    p.add_argument("--mqtt-username", default=None, help="broker user name (with a password, see below)")
    p.add_argument("--mqtt-password-file", default=None, metavar="FILE",
                   help="read the broker password from the first line of FILE (not visible in ps)")
    p.add_argument("--mqtt-password", default=None,
                   help="broker password; visible to every local user in ps: prefer --mqtt-password-file or "
                        "$BATCHDECK_MQTT_PASSWORD (read when neither flag is given)")
    p.add_argument("--mqtt-tls", action="store_true", help="connect with TLS (system CAs unless --mqtt-ca)")
    p.add_argument("--mqtt-ca", default=None, metavar="FILE", help="CA certificate(s) to trust (implies TLS)")
    p.add_argument("--mqtt-cert", default=None, metavar="FILE", help="client certificate (implies TLS)")
    p.add_argument("--mqtt-key", default=None, metavar="FILE", help="client certificate's key")
    p.add_argument("--mqtt-tls-insecure", action="store_true", help="do not check the broker's host name")
    p.add_argument("--status-interval", type=float, default=5.0, help="seconds between status lines (0: none)")
    p.add_argument("--gpu-interval", type=float, default=1.0, help="seconds between GPU samples over MQTT (0: none)")
    p.add_argument("--drain-timeout", type=float, default=0.0,
                   help="on SIGINT/SIGTERM, seconds to let in-flight requests finish before aborting them")


# ---------------------------------------------------------------------------------------------
# Configuration


def _default_engine_id() -> str:
    host = re.sub(r"[^A-Za-z0-9_.:-]", "-", socket.gethostname() or "engine")[:100]
    return host or "engine"


def engine_setup(args: argparse.Namespace):
    """(EngineConfig, LiveConfig, Preset | None): the preset's settings under the flags given."""
    from batchdeck.engine.service.flags import engine_configs

    preset = None
    if args.preset is not None:
        hooks: PresetHooks | None = getattr(args, "preset_hooks", None)
        if hooks is None:
            raise ValueError("--preset is not available here: this command was built without presets")
        preset = hooks.load(args.preset)
    cfg, live = engine_configs(args, preset)
    return cfg, live, preset


def mqtt_settings(args: argparse.Namespace):
    from batchdeck.engine.service.mqtt_bridge import MqttSettings, parse_broker

    host, port = parse_broker(args.mqtt)
    password = mqtt_password(args)
    tls = bool(args.mqtt_tls or args.mqtt_ca or args.mqtt_cert)
    for flag, path in (("--mqtt-ca", args.mqtt_ca), ("--mqtt-cert", args.mqtt_cert), ("--mqtt-key", args.mqtt_key)):
        if path is not None and not os.path.isfile(path):
            raise FileNotFoundError(f"{flag} {path}: no such file")
    return MqttSettings(host=host, port=port, username=args.mqtt_username, password=password, tls=tls,
                        ca_certs=args.mqtt_ca, certfile=args.mqtt_cert, keyfile=args.mqtt_key,
                        tls_insecure=args.mqtt_tls_insecure)


def mqtt_password(args: argparse.Namespace) -> str | None:
    """--mqtt-password-file (its first line), else --mqtt-password, else $BATCHDECK_MQTT_PASSWORD."""
    if args.mqtt_password_file is not None:
        if args.mqtt_password is not None:
            raise ValueError("give --mqtt-password-file or --mqtt-password, not both")
        try:
            with open(args.mqtt_password_file, encoding="utf-8") as f:
                line = f.readline().rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"--mqtt-password-file {args.mqtt_password_file}: cannot read it "
                             f"({getattr(exc, 'strerror', None) or exc})") from None
        if not line:
            raise ValueError(f"--mqtt-password-file {args.mqtt_password_file}: the first line (the password) is empty")
        return line
    if args.mqtt_password is not None:
        return args.mqtt_password
    return os.environ.get("BATCHDECK_MQTT_PASSWORD")


def open_control_warning(settings: Any, engine_id: str, read_only: bool, publish_results: bool) -> str | None:
    """The start-time warning for an engine that obeys control without broker credentials (None
    when it has credentials: the broker's ACL then decides who may publish control)."""
    if settings is None or settings.username is not None or settings.certfile is not None:
        return None
    from batchdeck.engine.service.protocol import CONFIG, CONTROL, STATUS, TELEMETRY_TOPICS, topic_prefix

    prefix = topic_prefix(engine_id)
    risks = ([] if read_only else [f"publish to {prefix}/{CONTROL} and steer this engine (submit, set, pause, abort)"])
    if publish_results:
        risks.append(f"read every MQTT-submitted prompt and output on {prefix}/{TELEMETRY_TOPICS['result']}")
    risks.append(f"publish a retained {prefix}/{STATUS} or /{CONFIG}")
    return (f"no broker credentials given: anyone who can reach {settings.host}:{settings.port} can "
            + "; ".join(risks) + ". Connect as a user of a broker with a password file and an ACL (README, "
            "'Securing MQTT'): --mqtt-username U --mqtt-password-file FILE" + ("" if read_only else ", or --read-only")
            + ("" if not publish_results else ", and --no-results"))


def _check_args(args: argparse.Namespace) -> None:
    if args.preset is None and args.mqtt is None:
        raise ValueError("nothing to serve: give --preset P (runs it and exits) and/or --mqtt HOST:PORT "
                         "(serves control and telemetry until SIGINT/SIGTERM)")
    for name in ("speed", "duration_scale"):
        value = getattr(args, name)
        if not value > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {value!r}")
    check_runner_args(args)


def check_runner_args(args: argparse.Namespace) -> None:
    """The checks of `add_runner_flags`' values."""
    from batchdeck.engine.service.mqtt_bridge import check_engine_id

    for name in ("status_interval", "gpu_interval", "drain_timeout"):
        value = getattr(args, name)
        if not value >= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0 seconds, got {value!r}")
    if args.engine_id is not None:
        check_engine_id(args.engine_id)
    if args.read_only and args.mqtt is None:
        raise ValueError("--read-only applies to MQTT control; give --mqtt HOST:PORT too")
    if args.no_results and args.mqtt is None:
        raise ValueError("--no-results applies to MQTT; give --mqtt HOST:PORT too")


def _cmd_engine(args: argparse.Namespace) -> int:
    _check_args(args)
    settings = mqtt_settings(args) if args.mqtt is not None else None
    cfg, live, preset = engine_setup(args)

    from batchdeck.engine.service.bus import Bus
    from batchdeck.engine.sim.engine import make_engine

    bus = Bus()
    t0 = time.monotonic()
    engine = make_engine(cfg, live, sink=bus)
    where = engine.profile.label() if cfg.sim else f"on {cfg.device}"
    log.info(f"model {cfg.model} {where} ({cfg.dtype}) loaded in {time.monotonic() - t0:.1f} s; "
         f"{engine.blocks.num_blocks} KV blocks of {cfg.block_size} tokens; "
         + (f"preset {preset.name}" if preset else "no preset")
         + (f"; MQTT {settings.host}:{settings.port}" if settings else ""))
    runner = HeadlessRunner(engine, bus, preset=preset, make_driver=args.preset_hooks.driver if preset else None,
                            settings=settings,
                            engine_id=args.engine_id or _default_engine_id(), read_only=args.read_only,
                            publish_results=not args.no_results,
                            status_interval=args.status_interval, gpu_interval=args.gpu_interval,
                            drain_timeout=args.drain_timeout, speed=args.speed, duration_scale=args.duration_scale)
    return asyncio.run(runner.run())


# ---------------------------------------------------------------------------------------------
# The run


class HeadlessRunner:
    """Owns one headless run: AsyncEngine, optional PresetDriver and MqttBridge, status lines, shutdown."""

    def __init__(self, engine: Any, bus: Any, *, preset: Any = None, make_driver: Callable[..., Any] | None = None,
                 settings: Any = None, engine_id: str = "engine",
                 read_only: bool = False, publish_results: bool = True,
                 status_interval: float = 5.0, gpu_interval: float = 1.0,
                 drain_timeout: float = 0.0, speed: float = 1.0, duration_scale: float = 1.0,
                 out: TextIO | None = None, install_signals: bool = True, prog: str = PROG):
        from batchdeck.engine.service.async_engine import AsyncEngine

        self.llm = engine
        self.bus = bus
        self.engine = AsyncEngine(engine)
        if preset is not None and make_driver is None:
            raise ValueError("a preset needs make_driver (PresetHooks.driver) to play it")
        self.preset = preset
        self.make_driver = make_driver
        self.settings = settings
        self.engine_id = engine_id
        self.read_only = read_only
        self.publish_results = publish_results
        self.status_interval = status_interval
        self.gpu_interval = gpu_interval
        self.drain_timeout = drain_timeout
        self.speed = speed
        self.duration_scale = duration_scale
        self.out = out or sys.stderr
        self.install_signals = install_signals
        self.prog = prog  # the command named at the start of every line it prints
        self.stop_event: asyncio.Event | None = None
        self.signal_name: str | None = None
        self.driver: Any = None
        self.bridge: Any = None
        self.aborted: list[str] = []
        self._failure_logged = False  # _failed() logged the engine's error already
        self._started = asyncio.Event()  # set once the engine runs and its clock restarted

    async def wait_started(self) -> None:
        """Until run() has started the engine (and restarted its clock): requests may come."""
        await self._started.wait()

    def say(self, line: str) -> None:
        """Log a line about the run (the `batchdeck` logger; the status line prints instead)."""
        log.info(line)

    def request_stop(self, why: str = "stop") -> None:
        if self.stop_event is None:
            return
        if self.stop_event.is_set():
            log.warning(f"{why} again: exiting now")
            os._exit(130)
        self.signal_name = why
        self.stop_event.set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self.stop_event = asyncio.Event()
        if self.install_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self.request_stop, sig.name)
        await self.engine.start()
        await self.engine.call(lambda e: e.restart_clock())
        self._started.set()
        background: list[asyncio.Task] = []
        status_sub = self.bus.subscribe({"iteration", "request"}, maxsize=8192, name="status-line")
        if self.status_interval > 0:
            background.append(asyncio.create_task(self._status_loop(status_sub)))
        if self.settings is not None:
            from batchdeck.engine.service.mqtt_bridge import MqttBridge

            warning = open_control_warning(self.settings, self.engine_id, self.read_only, self.publish_results)
            if warning is not None:
                log.warning(warning)
            self.bridge = MqttBridge(self.engine, self.bus, self.engine_id, self.settings, read_only=self.read_only,
                                     publish_results=self.publish_results, log=self.say)
            await self.bridge.start()
            if self.gpu_interval > 0:
                from batchdeck.engine.service.gpu_monitor import GpuMonitor

                monitor = GpuMonitor(interval_s=self.gpu_interval, kv_pool_bytes=self.llm.kv_cache.num_bytes,
                                     clock=self.llm.clock)
                monitor.prepare()  # before a preset's driver starts sending requests
                background.append(asyncio.create_task(monitor.run(self.bus.publish)))
        driver_task = None
        if self.preset is not None:
            assert self.make_driver is not None
            self.driver = self.make_driver(self.engine, self.preset, speed=self.speed,
                                           duration_scale=self.duration_scale)
            driver_task = asyncio.create_task(self.driver.run())
        rc = 0
        try:
            rc = await self._wait(driver_task)
        finally:
            await self._shutdown(driver_task, background, status_sub)
        return rc

    async def _wait(self, driver_task: asyncio.Task | None) -> int:
        assert self.stop_event is not None
        stopper = asyncio.create_task(self.stop_event.wait())
        failed = asyncio.create_task(self.engine.failed.wait())
        try:
            if driver_task is not None:
                await asyncio.wait([driver_task, stopper, failed], return_when=asyncio.FIRST_COMPLETED)
                if failed.done() or self.engine.error is not None:  # the preset may have failed of it first
                    return self._failed()
                if driver_task.done():
                    exc = driver_task.exception()
                    if exc is not None:
                        log.error(f"the preset run failed: {type(exc).__name__}: {exc}")
                        return 1
                    p = self.driver.progress()
                    log.info(f"preset {self.preset.name} finished: {p['finished']} request(s) "
                             f"({p['rejected']} rejected)"
                             + ("; serving MQTT until SIGINT/SIGTERM" if self.bridge is not None else ""))
                    if self.bridge is None:
                        return 0
            await asyncio.wait([stopper, failed], return_when=asyncio.FIRST_COMPLETED)
            return self._failed() if failed.done() else 0
        finally:
            stopper.cancel()
            failed.cancel()

    def _failed(self) -> int:
        """The engine stopped stepping on an error: say so now and end the run (exit 1, `offline` published);
        a process that kept its status `online` would look healthy while refusing every request."""
        log.error(f"{EngineDeadError.of(self.engine.error).describe()}; shutting down (exit 1)")
        self.signal_name = self.signal_name or "engine failed"
        self._failure_logged = True
        return 1

    async def _shutdown(self, driver_task: asyncio.Task | None, background: list[asyncio.Task],
                        status_sub: Any) -> None:
        why = self.signal_name or "done"
        if self.bridge is not None:
            self.bridge.control.stop_admitting()
            dropped = self.bridge.control.scheduled_ids()
            if dropped:  # accepted with a future arrival_time: they will never run
                more = len(dropped) - 20
                log.warning(f"{why}: dropped {len(dropped)} scheduled submission(s) not yet due: "
                            + ", ".join(dropped[:20]) + (f", ... ({more} more)" if more > 0 else ""))
        if driver_task is not None and not driver_task.done():
            driver_task.cancel()
            await asyncio.gather(driver_task, return_exceptions=True)
        if self.drain_timeout > 0 and self.llm.has_unfinished:
            deadline = time.monotonic() + self.drain_timeout
            while self.llm.has_unfinished and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
        if self.engine.running:
            self.aborted = await self.engine.call(_abort_all)
            for rid in self.aborted:
                self.engine.deliver_abort(rid)
        if self.aborted:
            more = len(self.aborted) - 20
            shown = ", ".join(self.aborted[:20]) + (f", ... ({more} more)" if more > 0 else "")
            log.info(f"{why}: aborted {len(self.aborted)} in-flight request(s): {shown}")
        elif why != "done":
            log.info(f"{why}: no request was in flight")
        for t in background:
            t.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        self._print_status(status_sub, final=True)
        if self.bridge is not None:
            await self.bridge.close()
            stats = self.bridge.stats()
            ending = ("offline published" if self.bridge.offline_published else
                      "never connected" if not stats["connects"] else "offline not published (broker away)")
            unanswered = (f"; {stats['replies_pending']} command(s) left unanswered (broker away)"
                          if stats["replies_pending"] else "")
            log.info(f"mqtt: published {stats['published']} message(s), dropped {stats['dropped']}; {ending}"
                     f"{unanswered}")
        status_sub.close()
        await self.engine.stop()
        if self.engine.error is not None and not self._failure_logged:
            log.error(EngineDeadError.of(self.engine.error).describe())

    # -- status line ----------------------------------------------------------------------------
    def _feed(self, sub: Any) -> int:
        msgs = sub.drain()
        for m in msgs:
            self._window.add(m.topic, m.record)
        return len(msgs)

    def _print_status(self, sub: Any, final: bool = False) -> None:
        from batchdeck.engine.service.metrics import status_line

        if not hasattr(self, "_window"):
            return
        self._feed(sub)
        line = status_line(self._window.snapshot(self.llm.clock()))
        print(f"{self.prog}: {'final: ' if final else ''}{line}", file=self.out, flush=True)

    async def _status_loop(self, sub: Any) -> None:
        from batchdeck.engine.service.metrics import MetricsWindow

        self._window = MetricsWindow(window_s=max(self.status_interval, 1.0), start=0.0)
        next_at = time.monotonic() + self.status_interval
        fresh = 0
        idle_printed = False
        while True:
            await asyncio.sleep(min(0.25, max(0.0, next_at - time.monotonic())))
            fresh += self._feed(sub)
            if time.monotonic() < next_at:
                continue
            next_at += self.status_interval
            if fresh or not idle_printed:  # an idle engine prints one line, not one every interval
                self._print_status(sub)
                idle_printed = not fresh
            fresh = 0


def _abort_all(e: Any) -> list[str]:
    """(In the worker thread.) Abort every unfinished request; their ids, in arrival order."""
    ids = [r.request_id for r in sorted((r for r in e.requests.values() if not r.is_finished),
                                        key=lambda r: (r.arrival_time, r.request_id))]
    return [rid for rid in ids if e.abort(rid) is not None]
