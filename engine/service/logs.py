"""What the engine and the service say goes through the standard `logging` module, under the
`batchdeck` logger; `--log-level` on every command sets how much of it reaches stderr. The headless
status line and the progress bar are output, not log records: they print as they always did."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import TextIO

LOGGER = "batchdeck"
LEVELS = ("debug", "info", "warning", "error")
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_handler: logging.Handler | None = None


def add_log_level_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", default="info", type=str.lower, choices=LEVELS,
                        help="how much the engine and service log to stderr (default: info)")


def configure_logging(level: str = "info", stream: TextIO | None = None) -> None:
    """Send `batchdeck.*` log records at `level` and above to `stream` (stderr); calling it again
    replaces the handler it installed, so a command can be run twice in one process."""
    global _handler
    if level not in LEVELS:
        raise ValueError(f"--log-level must be one of {', '.join(LEVELS)}, got {level!r}")
    logger = logging.getLogger(LOGGER)
    if _handler is not None:
        logger.removeHandler(_handler)
    _handler = logging.StreamHandler(stream or sys.stderr)
    _handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
    logger.addHandler(_handler)
    logger.setLevel(level.upper())
