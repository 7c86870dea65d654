"""The `batchdeck` command: the one place that wires the rooms together.

Each room registers its own subcommands (`register_cli`); this module only builds the parser,
hands each room what it needs from another (the console to `replay`) and turns the operator's
errors into a message and exit status 2.
"""
from __future__ import annotations

import argparse
import sys

from batchdeck import __version__, sim_cli
from batchdeck.console import cli as console_cli
from batchdeck.engine.config import ConfigError
from batchdeck.engine.service import flags, headless
from batchdeck.engine.service.http import server as http_server
from batchdeck.presets import bench
from batchdeck.engine.service.logs import add_log_level_flag, configure_logging
from batchdeck.presets import cli as presets_cli
from batchdeck.presets import load_preset, preset_driver, resolve_preset


def _cmd_generate(args: argparse.Namespace) -> int:
    from batchdeck.engine.service.generate import generate_files, run_generate

    clock = None
    if args.sim:  # offline: simulated time runs as fast as the CPU allows
        from batchdeck.engine.sim.clock import VirtualClock

        clock = VirtualClock()
    with generate_files(args.input, args.output) as (src, out):  # checked before the model loads
        engine = flags.build_engine(args, **({"clock": clock} if clock is not None else {}))
        return run_generate(engine, src, out, input_name=args.input, output_name=args.output)


def build_parser() -> argparse.ArgumentParser:
    parser = flags.Parser(prog="batchdeck", description="A live-tuning console for LLM batching.")
    parser.add_argument("--version", action="version", version=f"batchdeck {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=flags.Parser)
    gen = sub.add_parser("generate", help="serve a JSONL file of requests offline")
    gen.add_argument("--input", required=True, help="JSONL of requests")
    gen.add_argument("--output", required=True, help="JSONL of results, one line per request in input order, written as they finish")
    flags.add_engine_flags(gen)
    gen.set_defaults(func=_cmd_generate)
    headless.register_cli(sub, presets=headless.PresetHooks(load=lambda name: load_preset(resolve_preset(name)),
                                                            driver=preset_driver.headless_driver))
    http_server.register_cli(sub)
    console_cli.register_cli(sub)
    presets_cli.register_cli(sub, open_console=lambda *a, **kw: console_cli.run_console(*a, **kw))
    bench.register_cli(sub)
    sim_cli.register_cli(sub)
    for command in sub.choices.values():
        add_log_level_flag(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"batchdeck: {flags.explain(exc, args)}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as exc:  # ModelError, RequestError and friends
        print(f"batchdeck: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
