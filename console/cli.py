"""`batchdeck console`: open the live-tuning console.

    batchdeck console [--model M] [--preset P] [--attach mqtt://HOST:PORT/ENGINE_ID]
                      [--record FILE] [--replay FILE] [--speed X] [engine sizing flags]
                      [--port 8000 [--host H] [--served-model-name N] [--api-key K] [--metrics-prefix P]]

Default: an engine on the embedded default (`synthetic:tiny` on CPU, `synthetic:qwen3-0.6b` when CUDA
is present) under the quickstart preset's workload, looping, in a child process so the UI never takes
interpreter time from it (console/engine_process.py; `--engine-in-process` keeps it in this one).
`--preset` plays that preset (workload + timeline) instead; `--attach` watches and steers a headless
`batchdeck engine` over MQTT; `--replay` plays a recording back with no engine. `--port` opens the
OpenAI-compatible server (`batchdeck serve`'s) beside the in-process engine: any OpenAI client's
requests join the dashboard and the request table (with their tenant and class) while the operator
steers; with `--port` the built-in steady load is off unless a `--preset` is given.

`run_console(...)` is the same thing for other commands (`batchdeck replay PRESET` without
`--headless` opens the console with the preset driving it).
"""
from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any, Mapping

from batchdeck.engine.service.flags import add_engine_flags, given_engine_flags
from batchdeck.engine.service.http.server import add_serve_flags, api_key, check_serve_args

TINY_MODEL = "synthetic:tiny"
CUDA_MODEL = "synthetic:qwen3-0.6b"
INPROCESS_HZ = 5.0  # the engine thread shares the GIL with the UI: repaint less often


def register_cli(subparsers: Any) -> None:
    p = subparsers.add_parser("console", help="open the live-tuning console (Textual TUI)",
                              description="Watch and steer the engine live: throughput, latency, batch "
                                          "composition, KV cache, GPU memory; change policy and limits "
                                          "from the command palette (ctrl+p) or the config panel (c).")
    add_engine_flags(p)  # model not given: the embedded default for this machine (see default_model)
    p.add_argument("--preset", default=None, help="play a preset's workload and timeline (name or YAML file)")
    p.add_argument("--attach", default=None, metavar="mqtt://HOST:PORT/ENGINE_ID",
                   help="watch and steer a headless engine over MQTT instead of starting one; with "
                        "mqtt://USER@HOST:PORT/ENGINE_ID the password comes from $BATCHDECK_MQTT_PASSWORD "
                        "(a password in the URL shows in ps)")
    p.add_argument("--record", default=None, metavar="FILE", help="write everything received and done as JSONL")
    p.add_argument("--replay", default=None, metavar="FILE",
                   help="play a recording back (console --record or replay --record), no engine")
    p.add_argument("--speed", type=float, default=1.0, help="preset / replay speed (default 1)")
    add_serve_flags(p, port=None)
    p.add_argument("--engine-in-process", action="store_true",
                   help="run the engine in the console's own process (default: a child process, so the UI "
                        "never takes interpreter time from the engine; --port always serves in-process)")
    p.add_argument("--refresh-hz", type=float, default=None,
                   help="repaints per second, at most 10 (default: 5 with an in-process engine, which shares "
                        "the interpreter with the UI; 10 attached or replaying)")
    p.set_defaults(func=_cmd_console)


def default_model(device: str | None) -> str:
    """synthetic:tiny on CPU; a real model's shape when CUDA is there (and not turned away)."""
    if device is not None and not device.startswith("cuda"):
        return TINY_MODEL
    try:
        import torch

        return CUDA_MODEL if torch.cuda.is_available() else TINY_MODEL
    except Exception:
        return TINY_MODEL


def _check(args: argparse.Namespace) -> None:
    modes = [f for f in ("attach", "replay") if getattr(args, f, None)]
    if len(modes) > 1:
        raise ValueError("--attach and --replay exclude each other: a replay has no engine to attach to")
    if modes and getattr(args, "preset", None):
        raise ValueError(f"--preset needs an in-process engine; it cannot be combined with --{modes[0]}")
    if args.refresh_hz is not None and not 10.0 >= args.refresh_hz > 0:
        raise ValueError(f"--refresh-hz must be in (0, 10], got {args.refresh_hz}")
    if not args.speed > 0:
        raise ValueError(f"--speed must be > 0, got {args.speed}")
    _check_files(args)
    if getattr(args, "port", None) is not None:
        if modes:
            raise ValueError(f"--port serves the in-process engine; it cannot be combined with --{modes[0]}")
        check_serve_args(args)


def _check_files(args: argparse.Namespace) -> None:
    """--replay and --record, before anything loads: each error names its flag."""
    replay, record = getattr(args, "replay", None), getattr(args, "record", None)
    if replay is not None and not Path(replay).is_file():
        why = "is a directory" if Path(replay).is_dir() else "does not exist"
        raise ValueError(f"--replay {replay!r} {why}: give a recording made with --record")
    if record is not None:
        if Path(record).is_dir():
            raise ValueError(f"--record {record!r} is a directory: give a file path for the recording")
        from batchdeck.presets.cli import check_output_path

        check_output_path("--record", record)  # makes its directory, as replay's --record, --report and --html do


def _cmd_console(args: argparse.Namespace) -> int:
    _check(args)
    http = None
    if args.port is not None:
        http = {"host": args.host, "port": args.port, "served_model_name": args.served_model_name,
                "api_key": api_key(args), "metrics_prefix": args.metrics_prefix}
    return run_console(args.preset, args=args, attach=args.attach, record=args.record, replay=args.replay,
                       speed=args.speed, refresh_hz=args.refresh_hz, http=http,
                       engine_process=not args.engine_in_process)


def _overrides(args: argparse.Namespace | None) -> dict[str, Any]:
    return {} if args is None else given_engine_flags(args)


def build_app(preset: Any = None, *, args: argparse.Namespace | None = None, overrides: Mapping[str, Any] | None = None,
              attach: str | None = None, record: str | Path | None = None, replay: str | Path | None = None,
              speed: float = 1.0, duration_scale: float = 1.0, refresh_hz: float | None = None, loaded: Any = None,
              log=None, steady_load: bool = True, engine_process: bool = False):
    """The ConsoleApp for a mode (in-process default / preset, attach, replay), not yet running.
    engine_process: build the engine (and its workload) in a child process instead of this one
    (console/engine_process.py); not with `loaded`, a model object already in this process."""
    from batchdeck.console.app import ConsoleApp
    from batchdeck.engine.service.recording import RecordingWriter

    say = log or (lambda line: print(line, file=sys.stderr, flush=True))
    drivers: list = []
    title = None
    if replay is not None:
        from batchdeck.console.player import ReplayClient

        client = ReplayClient(replay, speed=speed)
    elif attach is not None:
        from batchdeck.console.mqtt_client import MqttClient

        client = MqttClient(attach_target(attach))
    elif engine_process and loaded is None:
        from batchdeck.console.engine_process import EngineProcessClient, EngineSpec

        spec = EngineSpec(preset, {**_overrides(args), **(overrides or {})}, speed, duration_scale, steady_load,
                          announce=log is None)
        client = EngineProcessClient(spec)
        title = client.title
    else:
        client, drivers, title = _inprocess(preset, args, overrides, speed, duration_scale, loaded, say, steady_load)
    if refresh_hz is None:
        refresh_hz = INPROCESS_HZ if client.kind == "in-process" else 10.0
    recorder = RecordingWriter(record) if record is not None else None
    return ConsoleApp(client, recorder=recorder, drivers=drivers, refresh_hz=refresh_hz, title=title)


def attach_target(url: str) -> Any:
    """The --attach URL's target; a user given without a password in the URL (where `ps` would show
    it) takes the password from $BATCHDECK_MQTT_PASSWORD."""
    import dataclasses
    import os

    from batchdeck.console.mqtt_client import parse_attach_url

    target = parse_attach_url(url)
    if target.username is not None and target.password is None:
        target = dataclasses.replace(target, password=os.environ.get("BATCHDECK_MQTT_PASSWORD"))
    return target


def _inprocess(preset: Any, args: argparse.Namespace | None, overrides: Mapping[str, Any] | None, speed: float,
               duration_scale: float, loaded: Any, say, steady_load: bool = True):
    from batchdeck.engine.service.async_engine import AsyncEngine
    from batchdeck.engine.service.bus import Bus
    from batchdeck.engine.sim.engine import make_engine
    from batchdeck.presets import load_preset, resolve_preset
    from batchdeck.presets.schema import Preset

    from batchdeck.console.inprocess_client import InProcessClient
    from batchdeck.console.workload import steady_workload

    kw = {**_overrides(args), **(overrides or {})}
    bus = Bus()
    extra = {"loaded": loaded} if loaded is not None else {}
    if kw.get("sim"):  # simulated time runs at wall time x speed; the workload follows the engine clock
        from batchdeck.engine.sim.clock import PacedClock

        extra["clock"] = PacedClock(speed)
        speed = 1.0
    if preset is not None:
        preset = preset if isinstance(preset, Preset) else load_preset(resolve_preset(preset))
        say(f"batchdeck console: loading {kw.get('model', preset.model)} for preset {preset.name} …")
        llm = make_engine(*inprocess_configs(preset, kw), sink=bus, **extra)
        engine = AsyncEngine(llm)

        async def play() -> None:
            from batchdeck.presets.replay import run_preset_async

            await run_preset_async(preset, engine=engine, speed=speed, duration_scale=duration_scale, source="preset")

        sim = f" · SIMULATED {llm.profile.label()}" if llm.simulation else ""
        return InProcessClient(engine, bus), [play], f"batchdeck · {preset.name}{sim}"
    quick = load_preset(resolve_preset("quickstart"))
    cfg, live = inprocess_configs(None, kw)
    say(f"batchdeck console: loading {cfg.model} …")
    llm = make_engine(cfg, live, sink=bus, **extra)
    engine = AsyncEngine(llm)
    # quickstart's rates keep a free CPU core about half busy with synthetic:tiny; a loaded or slower
    # machine would queue without end, so on CPU the steady load runs at half of them
    cpu = llm.device.type == "cpu" and llm.simulation is None
    steady = steady_workload(engine, quick, loop=True, speed=speed * (0.5 if cpu else 1.0))  # on the engine clock
    return InProcessClient(engine, bus), [steady.run] if steady_load else [], (
        f"batchdeck · SIMULATED {llm.profile.label()}" if llm.simulation else None)


def inprocess_configs(preset: Any, kw: Mapping[str, Any]):
    """(EngineConfig, LiveConfig) of the console's in-process engine: a preset's settings under the flags
    given, or, without a preset, the flags over the per-device defaults (the embedded default model;
    synthetic:tiny keeps a 1024-block pool)."""
    from batchdeck.engine.config import resolve_configs
    from batchdeck.engine.service.flags import preset_engine_configs

    if preset is not None:
        return preset_engine_configs(preset, dict(kw))
    kw = dict(kw)
    if kw.get("sim"):  # the profile fixes the model and the pool
        return resolve_configs(kw)
    kw.setdefault("model", default_model(kw.get("device")))
    return resolve_configs(kw, {"num_blocks": 1024} if kw["model"] == TINY_MODEL else {})


def run_console(preset: Any = None, *, args: argparse.Namespace | None = None,
                overrides: Mapping[str, Any] | None = None, attach: str | None = None,
                record: str | Path | None = None, replay: str | Path | None = None, speed: float = 1.0,
                duration_scale: float = 1.0, refresh_hz: float | None = None, loaded: Any = None,
                http: Mapping[str, Any] | None = None, engine_process: bool = True) -> int:
    """Open the console and block until the operator quits; returns the exit status.

    preset: a Preset, a shipped preset's name or a YAML path (its workload and timeline drive an
      in-process engine; operator changes are recorded as events with "source": "console").
    args: parsed `add_engine_flags` flags (model/device/dtype/sizing/live overrides); overrides:
      the same as a dict (EngineConfig fields and live keys), winning over args.
    attach / replay: the other two modes (no in-process engine). record: a JSONL file.
    http: start_http_server's keyword arguments (host, port, served_model_name, api_key,
      metrics_prefix) to serve the in-process engine over HTTP while the console runs.
    engine_process: the engine in a child process (the default); `http` and `loaded` keep it in this one.
    """
    app = build_app(preset, args=args, overrides=overrides, attach=attach, record=record, replay=replay,
                    speed=speed, duration_scale=duration_scale, refresh_hz=refresh_hz, loaded=loaded,
                    steady_load=http is None or preset is not None, engine_process=engine_process and http is None)

    async def main() -> None:
        server = None
        try:
            if http is not None:
                from batchdeck.engine.service.http.server import start_http_server

                server = await start_http_server(app.client.engine, app.client.bus, **http)
                app.sub_title = f"{app.sub_title} · serving {server.url}/v1"
            await app.run_async()
        finally:
            try:
                if server is not None:  # first, while the engine still runs: open streams can end
                    await server.stop()
            finally:
                await app.shutdown()

    asyncio.run(main())
    output = getattr(app.client, "output", None)  # what an engine process printed while the UI ran
    if output:
        sys.stderr.write("".join(output))
    return int(app.return_code or 0)
