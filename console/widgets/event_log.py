"""The event log: config changes with the iteration they took effect, preemptions, errors, pauses
and the operator's own actions; appended to, never rewritten."""
from __future__ import annotations

from typing import Iterable

from rich.text import Text
from textual.widgets import RichLog

from batchdeck.console.state import LogLine

STYLES = {"config_change": "bold #f2c744", "preemption": "#e07b53", "request_rejected": "red", "error": "bold red",
          "pause": "magenta", "resume": "magenta", "action": "cyan", "refused": "bold red", "notice": "dim",
          "link": "bold yellow"}


def render_line(line: LogLine) -> Text:
    t = Text(no_wrap=False)
    t.append("       " if line.time is None else f"{line.time:6.1f}s ", style="dim")
    t.append(line.text, style=STYLES.get(line.kind, ""))
    return t


class EventLog(RichLog):
    DEFAULT_CSS = """
    EventLog { height: 1fr; }
    """

    def __init__(self, *, id: str | None = None, classes: str | None = None, max_lines: int = 1000) -> None:
        super().__init__(id=id, classes=classes, max_lines=max_lines, wrap=True, markup=False, auto_scroll=True,
                         min_width=16)

    def append(self, lines: Iterable[LogLine], limit: int = 200) -> None:
        lines = list(lines)
        if len(lines) > limit:  # a flood (thousands of preemptions): keep the newest, say how many were folded
            skipped = len(lines) - limit
            lines = lines[-limit:]
            self.write(Text(f"… {skipped} earlier events folded", style="dim"))
        for line in lines:
            self.write(render_line(line))
