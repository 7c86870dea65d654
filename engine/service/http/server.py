"""`batchdeck serve`: an OpenAI-compatible HTTP server in front of the engine.

    batchdeck serve [MODEL] [--model M] [--host 127.0.0.1] [--port 8000] [--served-model-name NAME]
                    [--api-key KEY] [--metrics-prefix batchdeck|vllm] [--max-waiting N] [engine flags]
                    [--mqtt HOST:PORT --engine-id ID [mqtt flags]] [--drain-timeout S] [--status-interval S]

The HTTP event loop only parses, detokenizes and streams. By default the engine runs in its own
process (engine/service/engine_process.py: outputs come back once per iteration, telemetry record
for record), so the two never share one interpreter lock; `--engine-in-process` keeps it in this
process, in its worker thread (AsyncEngine). The run itself is a `HeadlessRunner` (engine/service/headless.py): with
`--mqtt` the same process publishes telemetry and obeys control exactly as `batchdeck engine`
does, it prints vLLM-style status lines, and on SIGINT/SIGTERM it drains: /health answers 503, new
requests 503, in-flight ones get `--drain-timeout` seconds, the rest are aborted, then it exits 0.

`start_http_server(...)` opens the same server beside any running AsyncEngine (the console's
`--port` uses it).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import socket
from dataclasses import dataclass
import logging
from typing import Any, Callable

PROG = "batchdeck serve"
log = logging.getLogger(__name__)


def register_cli(subparsers: Any) -> None:
    from batchdeck.engine.service.flags import add_engine_flags
    from batchdeck.engine.service.headless import add_runner_flags

    p = subparsers.add_parser(
        "serve", help="serve the engine over an OpenAI-compatible HTTP API (with Prometheus /metrics)",
        description="An OpenAI-compatible server: /v1/completions, /v1/chat/completions, /v1/models, "
                    "/health, /version and Prometheus /metrics. Takes every engine flag generate takes; "
                    "with --mqtt it also publishes telemetry and obeys control like `batchdeck engine`, so "
                    "`batchdeck console --attach` steers the serving engine.")
    p.add_argument("model_positional", nargs="?", default=None, metavar="MODEL",
                   help="synthetic:<name> or a local HF model directory (same as --model)")
    add_engine_flags(p)
    add_serve_flags(p)
    add_runner_flags(p)
    p.add_argument("--engine-in-process", action="store_true",
                   help="run the engine in the server's own process (default: its own process, so the HTTP "
                        "event loop and the engine do not share one interpreter lock)")
    p.set_defaults(func=_cmd_serve)


def add_serve_flags(p: argparse.ArgumentParser, *, port: int | None = 8000) -> None:
    """The HTTP server's own flags (the console adds them with no port: no server unless --port)."""
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=port, help=f"port to listen on (default {port or 'none'})")
    p.add_argument("--served-model-name", default=None,
                   help="the model name clients send and /v1/models lists (default: --model)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: $BATCHDECK_API_KEY)")
    p.add_argument("--metrics-prefix", default="batchdeck", choices=["batchdeck", "vllm"],
                   help="prefix of the /metrics names (vllm: an existing vLLM dashboard works unchanged)")


def check_serve_args(args: argparse.Namespace) -> None:
    if args.port is not None and not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    if args.served_model_name is not None and not args.served_model_name.strip():
        raise ValueError("--served-model-name must not be empty")


def api_key(args: argparse.Namespace) -> str | None:
    return args.api_key if args.api_key is not None else (os.environ.get("BATCHDECK_API_KEY") or None)


def listen_socket(host: str, port: int) -> socket.socket:
    """A bound, listening TCP socket (port 0: a free one), or a ValueError naming the address."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ValueError(f"--host {host!r}: cannot resolve it ({exc.strerror})") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock


@dataclass
class HttpServer:
    """A running server: its address, the OpenAI serving state and the metrics."""

    host: str
    port: int
    serving: Any
    metrics: Any
    _server: Any
    _task: asyncio.Task

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def stop(self) -> None:
        """Close the listener and the open connections (give in-flight streams a moment to end)."""
        self._server.should_exit = True
        await asyncio.gather(self._task, return_exceptions=True)
        if self.metrics is not None:
            self.metrics.close()


async def start_http_server(engine: Any, bus: Any, *, host: str = "127.0.0.1", port: int = 8000,
                            served_model_name: str | None = None, api_key: str | None = None,
                            metrics_prefix: str = "batchdeck", is_draining: Callable[[], bool] = lambda: False,
                            graceful_shutdown_s: float = 5.0) -> HttpServer:
    """Open the OpenAI server beside `engine` (a started or starting AsyncEngine whose telemetry goes
    to `bus`) on the running loop; returns once it accepts connections."""
    import uvicorn

    from batchdeck.engine.service.http.app import build_app
    from batchdeck.engine.service.http.prometheus import ServerMetrics
    from batchdeck.engine.service.http.serving import OpenAIServing

    served = engine.served_model()
    name = served_model_name or served.model
    metrics = ServerMetrics(name, metrics_prefix, policy=served.policy, config_version=served.config_version)
    metrics.start(bus, engine)
    serving = OpenAIServing(engine, name, is_draining=is_draining)
    app = build_app(serving, metrics, api_key=api_key, model_root=served.model)
    sock = listen_socket(host, port)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=graceful_shutdown_s, timeout_keep_alive=30)
    server = _quiet_server(config)
    task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            metrics.close()
            exc = task.exception()
            raise RuntimeError(f"the HTTP server did not start: {exc!r}")
        await asyncio.sleep(0.01)
    return HttpServer(host, sock.getsockname()[1], serving, metrics, server, task)


def _quiet_server_class():
    import contextlib

    import uvicorn

    class QuietServer(uvicorn.Server):
        """uvicorn without its own signal handling: the HeadlessRunner (or the console) owns SIGINT/SIGTERM."""

        @contextlib.contextmanager
        def capture_signals(self):
            yield

        def install_signal_handlers(self) -> None:  # uvicorn < 0.29
            return None

    return QuietServer


def _quiet_server(config: Any) -> Any:
    return _quiet_server_class()(config)


def _cmd_serve(args: argparse.Namespace) -> int:
    from batchdeck.engine.service.flags import engine_configs
    from batchdeck.engine.service.headless import _default_engine_id, check_runner_args, mqtt_settings

    if args.model_positional is not None:
        args.model = args.model_positional
    check_serve_args(args)
    check_runner_args(args)
    settings = mqtt_settings(args) if args.mqtt is not None else None
    cfg, live = engine_configs(args)
    sock_check = listen_socket(args.host, args.port)  # fail before loading the model if the port is taken
    sock_check.close()
    runner_kw = dict(settings=settings, engine_id=args.engine_id or _default_engine_id(), read_only=args.read_only,
                     publish_results=not args.no_results, status_interval=args.status_interval,
                     gpu_interval=args.gpu_interval, drain_timeout=args.drain_timeout)
    serve_kw = dict(host=args.host, port=args.port, served_model_name=args.served_model_name, api_key=api_key(args),
                    metrics_prefix=args.metrics_prefix)
    if not args.engine_in_process:
        from batchdeck.engine.service.engine_process import EngineProcess, ServeEngineSpec

        engine = EngineProcess(ServeEngineSpec(cfg, live, runner_kw, log_level=args.log_level, prog=PROG))
        return asyncio.run(run_serve_process(engine, **serve_kw))

    from batchdeck.engine.service.serve_runner import build_serve_runner

    return asyncio.run(run_serve(build_serve_runner(cfg, live, runner_kw, prog=PROG), **serve_kw))


DEAD_ENGINE_GRACE_S = 5.0  # after the engine process died: /health and new requests answer 503, then exit 1


async def run_serve_process(engine: Any, *, host: str, port: int, served_model_name: str | None = None,
                            api_key: str | None = None, metrics_prefix: str = "batchdeck",
                            on_ready: Callable[[HttpServer], None] | None = None,
                            install_signals: bool = True, stop: asyncio.Event | None = None) -> int:
    """Serve HTTP in this process in front of an EngineProcess until the engine process ends: after
    SIGINT/SIGTERM (it drains as `batchdeck engine` does: /health and new requests answer 503, in-flight
    requests get --drain-timeout, the rest are aborted; exit 0), or when it dies (every open stream gets
    an error event, /health and new requests 503 for DEAD_ENGINE_GRACE_S or until a signal, exit 1).
    A second signal exits at once (130). `stop` (an Event): setting it acts as the first signal does."""
    import signal

    loop = asyncio.get_running_loop()
    draining = asyncio.Event()
    drains: set[asyncio.Task] = set()

    def on_signal(name: str) -> None:
        if draining.is_set():
            log.warning(f"{name} again: exiting now")
            os._exit(130)
        draining.set()
        if not engine.running:
            return
        log.info(f"{name}: draining")
        task = loop.create_task(engine.drain(name))
        drains.add(task)
        task.add_done_callback(drains.discard)

    if install_signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig.name)
    watch = None
    if stop is not None:
        async def stop_when_set() -> None:
            await stop.wait()
            on_signal("stop")

        watch = loop.create_task(stop_when_set())
    await engine.start()
    try:
        server = await start_http_server(engine, engine.bus, host=host, port=port,
                                         served_model_name=served_model_name, api_key=api_key,
                                         metrics_prefix=metrics_prefix, is_draining=draining.is_set)
    except BaseException:
        await engine.stop()
        raise
    log.info(f"serving {server.serving.model_name!r} at {server.url}/v1 (metrics at {server.url}/metrics; "
             f"engine process {engine.pid})" + ("; API key required" if api_key else ""))
    if on_ready is not None:
        on_ready(server)
    try:
        rc = await engine.wait()
        if engine.died or (rc != 0 and not draining.is_set()):
            try:  # clients and health checks see the 503s; a signal ends this early
                await asyncio.wait_for(draining.wait(), DEAD_ENGINE_GRACE_S)
            except asyncio.TimeoutError:
                pass
    finally:
        if watch is not None:
            watch.cancel()
        if install_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
        await server.stop()
        await engine.stop()
    return rc


async def run_serve(runner: Any, *, host: str, port: int, served_model_name: str | None = None,
                    api_key: str | None = None, metrics_prefix: str = "batchdeck",
                    on_ready: Callable[[HttpServer], None] | None = None) -> int:
    """Serve HTTP beside a HeadlessRunner until it stops (SIGINT/SIGTERM, or `runner.request_stop()`)."""
    run = asyncio.get_running_loop().create_task(runner.run())
    await asyncio.sleep(0)  # run() creates its stop event before its first await

    def draining() -> bool:
        return runner.stop_event is not None and runner.stop_event.is_set()

    monitor = None
    try:
        server = await start_http_server(runner.engine, runner.bus, host=host, port=port,
                                         served_model_name=served_model_name, api_key=api_key,
                                         metrics_prefix=metrics_prefix, is_draining=draining)
    except BaseException:
        runner.request_stop("error")
        await asyncio.gather(run, return_exceptions=True)
        raise
    from batchdeck.engine.service.serve_runner import start_metrics_gpu_monitor

    monitor = start_metrics_gpu_monitor(runner)
    runner.say(f"serving {server.serving.model_name!r} at {server.url}/v1 (metrics at {server.url}/metrics)"
               + ("; API key required" if api_key else ""))
    if on_ready is not None:
        on_ready(server)
    try:
        rc = await run
    finally:
        if monitor is not None:
            monitor.cancel()
        await server.stop()
    return rc
