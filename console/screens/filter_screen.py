"""The request-table filter prompt (`/`): one line, checked before it closes; enter applies, an empty
line clears the filter, esc leaves it as it was. The syntax is `request_view.parse_filter`'s."""
from __future__ import annotations

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Static

from batchdeck.console.request_view import FILTER_FIELDS, FilterError, parse_filter

HINT = ("words that must all match: " + " ".join(f"{k}=…" for k in FILTER_FIELDS)
        + " (a prefix; state=run / state=waiting are groups) or a bare word matching any of them")


class FilterScreen(ModalScreen[str | None]):
    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, current: str = "") -> None:
        super().__init__()
        self.current = current

    def compose(self) -> ComposeResult:
        with Vertical(id="filter-dialog") as box:
            box.border_title = "Filter requests"
            box.border_subtitle = "enter apply · empty clears · esc cancel"
            yield Input(self.current, placeholder="e.g. tenant=a state=waiting", id="filter-input")
            yield Static(HINT, id="filter-hint")

    @on(Input.Submitted, "#filter-input")
    def submitted(self, event: Input.Submitted) -> None:
        text = " ".join(event.value.split())
        try:
            parse_filter(text)
        except FilterError as exc:
            self.query_one("#filter-hint", Static).update(Text.assemble(("refused: ", "bold red"), str(exc)))
            return
        self.dismiss(text)

    def action_cancel(self) -> None:
        self.dismiss(None)
