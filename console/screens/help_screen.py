"""The help screen (`?` / F1): every key and every palette command, generated from the bindings and
the palette's own command list, so nothing is typed twice and nothing can go stale.

`help_sections(app)` is pure over what it is given (bindings, candidates): tests compare it with the
app's BINDINGS and `commands.candidates`."""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

from rich.table import Table
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

from batchdeck.console.commands import candidates

# the request table's own cursor keys (DataTable's), for completeness
TABLE_KEYS: tuple[tuple[str, str], ...] = (("↑ ↓ pgup pgdn home end", "move the selection in the request table"),)


def key_rows(bindings: Iterable[Binding], display: Any) -> list[tuple[str, str]]:
    """(keys, what they do) per action, in binding order; bindings of one action are merged."""
    rows: dict[str, list[Any]] = {}
    for b in Binding.make_bindings(bindings):  # "plus,equals_sign" -> one binding per key
        keys = display(b)
        what = b.tooltip or b.description
        entry = rows.get(b.action)
        if entry is None:
            rows[b.action] = [[keys], what]
        elif keys not in entry[0]:
            entry[0].append(keys)
    return [(" ".join(keys), what) for keys, what in rows.values()]


def command_rows(config: Mapping[str, Any] | None, bounds: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    """(palette command, help) for every command the palette offers now (choice settings merged)."""
    out: dict[str, tuple[str, str]] = {}
    for c in candidates("", config, bounds):
        if c.changes is not None and len(c.changes) == 1:
            key = next(iter(c.changes))
            entry = out.get(key)
            value = str(c.changes[key])
            if entry is None:
                out[key] = (f"{key} {value}", f"set {key} at the next iteration")
            else:
                out[key] = (f"{entry[0]}|{value}", entry[1])
        else:
            out[c.text] = (c.text, c.help)
    return list(out.values())


def _table(title: str, rows: Sequence[tuple[str, str]], left: str) -> Table:
    table = Table(title=title, title_justify="left", title_style="bold", show_header=True, header_style="dim",
                  box=None, padding=(0, 2, 0, 0), expand=True)
    table.add_column(left, style="bold cyan", no_wrap=True)
    table.add_column("does", ratio=1)
    for a, b in rows:
        table.add_row(a, b)
    return table


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,question_mark,f1,q", "close", "Close")]

    def __init__(self, sections: Sequence[tuple[str, str, Sequence[tuple[str, str]]]]) -> None:
        super().__init__()
        self.sections = sections

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help-dialog") as box:
            box.border_title = "Keys and palette commands"
            box.border_subtitle = "esc / ? close · ctrl+p opens the palette"
            for title, left, rows in self.sections:
                yield Static(_table(title, rows, left), classes="help-section")

    def action_close(self) -> None:
        self.dismiss(None)

    @staticmethod
    def plain(sections: Sequence[tuple[str, str, Sequence[tuple[str, str]]]]) -> str:
        """The sections as plain text (tests, `--help`-style dumps)."""
        lines = []
        for title, _, rows in sections:
            lines.append(title)
            lines.extend(f"  {a}  {b}" for a, b in rows)
        return "\n".join(lines)
