"""`batchdeck replay` and `batchdeck compare` (registered by batchdeck/cli.py through `register_cli`).

    batchdeck replay PRESET [--headless] [--report out.json] [--html out.html] [--record run.jsonl]
                            [--speed X] [--duration-scale F] [--set KEY=VALUE ...] [--no-timeline]
                            [engine setting flags, as for generate]
    batchdeck compare a.json b.json ... [--phases]

PRESET is a shipped preset's name (`batchdeck replay --list`) or a YAML file. Headless, the preset
runs to its end with a progress bar on stderr, a summary is printed, and the report is written
(`--report`, default `PRESET-report.json`; `--html` for the page with plots). Without --headless
the console opens with the preset's timeline driving it (the `open_console` the command line wires in,
which plays it through `presets.replay.run_preset_async(preset, engine=...)`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable

import yaml

from batchdeck.engine.service.flags import add_engine_flags, given_engine_flags


def _key_value(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. chunk_size=256), got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


REPLAY_HELP = """\
Play a preset: its workload (requests submitted at their arrival times, greedy, seeded) and its
timeline of live config changes. PRESET is a shipped preset's name (--list) or a YAML file.

With --headless it runs to the end with a progress bar, prints a summary (the whole run and each
phase between config changes) and writes the JSON report (--report, default PRESET-report.json),
the HTML page with plots (--html) and the JSONL recording (--record). Without --headless the
console opens with the timeline driving it; your own changes are recorded with source "console".

examples:
  batchdeck replay static-vs-continuous --headless --html report.html
  batchdeck replay chunked-prefill --headless --duration-scale 0.2      # a short look
  batchdeck replay chunked-prefill --headless --no-timeline --report whole.json
  batchdeck replay chunked-prefill --headless --no-timeline --set chunk_size=256 --report chunked.json
  batchdeck compare whole.json chunked.json
"""


def register_cli(sub: argparse._SubParsersAction, open_console: Callable[..., int] | None = None) -> None:
    """`replay` and `compare`; `open_console(preset, overrides=, record=, speed=, duration_scale=)` runs a
    replay in the console (None: only --headless replays)."""
    rp = sub.add_parser("replay", help="play a preset (workload + timeline) headless to a report, or in the console",
                        description=REPLAY_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    rp.add_argument("preset", nargs="?", help="a shipped preset's name or a preset YAML file")
    rp.add_argument("--list", action="store_true", help="list the shipped presets and exit")
    rp.add_argument("--headless", action="store_true", help="no console: run to the end and write the report")
    rp.add_argument("--report", metavar="OUT.json", help="JSON report (headless default: PRESET-report.json)")
    rp.add_argument("--html", metavar="OUT.html", help="self-contained HTML report with plots")
    rp.add_argument("--record", metavar="RUN.jsonl", help="record all telemetry and actions as JSONL")
    rp.add_argument("--speed", type=_positive, default=1.0, help="workload time runs X times faster (default 1)")
    rp.add_argument("--duration-scale", type=_positive, default=1.0, metavar="F",
                    help="shorten (<1) the preset: durations, counts, trace limits and timeline times times F")
    rp.add_argument("--set", dest="set_", action="append", type=_key_value, default=[], metavar="KEY=VALUE",
                    help="override one of the preset's settings (repeatable; any engine setting, by its name "
                         "as in the preset), e.g. --set batching=continuous --set num_blocks=512")
    rp.add_argument("--no-timeline", action="store_true",
                    help="drop the preset's timeline: run one config throughout (for A/B runs with --set)")
    add_engine_flags(rp)  # the preset's settings apply unless a flag (or --set) is given
    rp.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    rp.set_defaults(func=lambda args: cmd_replay(args, open_console))

    cp = sub.add_parser("compare", help="side-by-side table of replay reports",
                        description="Print the summaries of replay reports side by side (with --phases, each "
                                    "phase of each report as a column).")
    cp.add_argument("reports", nargs="+", metavar="REPORT.json")
    cp.add_argument("--phases", action="store_true", help="one column per phase of each report")
    cp.set_defaults(func=cmd_compare)


def _set_changes(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """--set KEY=VALUE entries split into (live settings, start-time settings); unknown keys refused."""
    from batchdeck.engine.settings import BY_NAME, ConfigError

    live: dict[str, Any] = {}
    start: dict[str, Any] = {}
    for key, value in getattr(args, "set_", []) or []:
        if key not in BY_NAME:
            raise ValueError(f"--set: {ConfigError(key, value, 'a setting: ' + ', '.join(BY_NAME))}")
        (live if BY_NAME[key].live else start)[key] = value
    return live, start


def prepare_preset(args: argparse.Namespace):
    """The preset with --set's live settings / --no-timeline applied (checked like the file itself)."""
    from batchdeck.engine.config import ConfigError, LiveConfig, validate_changes
    from batchdeck.presets import load_preset, resolve_preset
    from batchdeck.presets.schema import bounds_for

    preset = load_preset(resolve_preset(args.preset))
    changes, start = _set_changes(args)
    if changes:
        from batchdeck.policies import validate_policy_params

        bounds = bounds_for({**preset.engine, **start})
        try:
            first = validate_changes(LiveConfig(), preset.config, bounds) if preset.config else LiveConfig()
            validate_changes(first, changes, bounds, validate_policy_params)
        except ConfigError as exc:
            raise ValueError(f"--set: {exc}") from None
        preset = dataclasses.replace(preset, config={**preset.config, **changes})
    if getattr(args, "no_timeline", False):
        preset = dataclasses.replace(preset, timeline=[])
    return preset


def overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    """The engine settings given as flags, and --set's start-time settings, by name."""
    return {**given_engine_flags(args), **_set_changes(args)[1]}


def default_report_path(name: str) -> str:
    """`NAME-report.json` in the working directory, the name reduced to a safe file name (a preset's name
    is free text: `../x` must not write elsewhere)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip(".-") or "preset"
    return f"{stem}-report.json"


def check_output_path(flag: str, path: str | None) -> None:
    """That `path` can be written (its directory is made, as `write_outputs` would); else a ValueError
    naming the flag."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"{flag} {path!r} is a directory: give a file path")
    blocker = next((p for p in target.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise ValueError(f"{flag} {path!r}: {str(blocker)!r} is a file, not a directory")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"{flag} {path!r}: cannot make its directory: {exc.strerror or exc}") from None
    if not os.access(target.parent, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise ValueError(f"{flag} {path!r} cannot be written (permission denied)")


def write_outputs(result, report_path: str | None, html_path: str | None, out=None) -> dict[str, Any]:
    out = out if out is not None else sys.stderr
    report = result.report()
    if report_path:
        Path(report_path).parent.mkdir(parents=True, exist_ok=True)
        with open(report_path, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1, default=str)
        out.write(f"report: {report_path}\n")
    if html_path:
        from batchdeck.presets.html_report import write_html

        Path(html_path).parent.mkdir(parents=True, exist_ok=True)
        write_html(report, html_path)
        out.write(f"html report: {html_path}\n")
    return report


def summary_text(report: dict[str, Any]) -> str:
    from batchdeck.presets.compare import metric_rows, render_table
    from batchdeck.presets.report import phase_label

    cols = [("whole run", report["summary"])]
    phases = report.get("phases") or []
    if len(phases) > 1:
        for ph in phases:
            cols.append((f"[{ph['index']}] {phase_label(ph.get('changes'))}", ph))
    rows = [[label, *cells] for label, _, cells in metric_rows([c for _, c in cols])]
    return render_table(["metric", *(c for c, _ in cols)], rows)


def cmd_replay(args: argparse.Namespace, open_console: Callable[..., int] | None = None) -> int:
    if args.list:
        from batchdeck.presets import load_preset, shipped_presets

        for name, path in shipped_presets().items():
            desc = " ".join(load_preset(path).description.split())
            print(f"{name:24} {desc[:100]}{'...' if len(desc) > 100 else ''}")
        return 0
    if not args.preset:
        raise ValueError("replay: give a preset (a shipped name or a YAML file); `batchdeck replay --list` lists them")
    preset = prepare_preset(args)
    overrides = overrides_from(args)
    if not args.headless:
        return _replay_in_console(args, preset, overrides, open_console)

    from batchdeck.presets.replay import progress_printer, run_preset

    report_path = args.report or default_report_path(preset.name)
    for flag, path in (("--report", report_path), ("--html", args.html), ("--record", args.record)):
        check_output_path(flag, path)  # before the run: a run must never end in a file that cannot be written
    progress = None if args.quiet else progress_printer()
    result = run_preset(preset, overrides=overrides, speed=args.speed, duration_scale=args.duration_scale,
                        record=args.record, progress=progress, interruptible=True)
    report = write_outputs(result, report_path, args.html)
    if args.record:
        sys.stderr.write(f"recording: {args.record}\n")
    if not args.quiet:
        sim = (report["run"].get("engine") or {}).get("simulation")
        if sim:
            run = report["run"]
            print(f"SIMULATED: {sim['device_name']} (profile {sim['profile']}); {report['summary']['num_iterations']:,} "
                  f"iterations in {run['wall_time_s']:.1f} s: {run.get('simulated_iterations_per_s')} simulated "
                  f"iterations/s ({run.get('simulated_iterations_per_cpu_s')} per CPU second)")
        print(summary_text(report))
        from batchdeck.presets.analytic import analytic_lines

        for line in analytic_lines(report.get("analytic") or {}):
            print(line)
    failed = [t for t in report.get("timeline") or [] if t.get("status") == "error"]
    for t in failed:  # in the report too; said here so a script sees it (and the exit status)
        sys.stderr.write(f"batchdeck: timeline[{t.get('index')}] {t.get('action')} failed: {t.get('error')}\n")
    if result.error:
        sys.stderr.write(f"batchdeck: the engine failed during the replay: {result.error}\n")
        return 1
    if not result.interrupted and not report["summary"].get("num_requests"):
        sys.stderr.write("batchdeck: no request arrived: the workload produced none (a trace whose `start` is past "
                         "its last row, or an empty trace file?)\n")
        return 1
    if result.interrupted:
        sys.stderr.write("batchdeck: interrupted: the report covers the replay up to then (requests in flight "
                         "were aborted)\n")
        return 130
    return 1 if failed else 0


def _replay_in_console(args: argparse.Namespace, preset, overrides: dict[str, Any],
                       open_console: Callable[..., int] | None) -> int:
    if open_console is None:
        raise ValueError("replay: the console is not available; run with --headless to replay to a report")
    wanted = [f"--{k}" for k in ("report", "html") if getattr(args, k)]
    if wanted:
        raise ValueError(f"replay: {' and '.join(wanted)} are written by headless replays: add --headless "
                         "(in the console, --record keeps the whole session)")
    check_output_path("--record", args.record)  # before the console opens, as a headless replay checks it
    from batchdeck.presets.replay import read_preset_traces

    read_preset_traces(preset, args.duration_scale)  # a bad row is named here, not inside the console
    return int(open_console(preset, overrides=overrides, record=args.record, speed=args.speed,
                            duration_scale=args.duration_scale) or 0)


def cmd_compare(args: argparse.Namespace) -> int:
    from batchdeck.presets.compare import main_compare

    return main_compare(args.reports, phases=args.phases)
