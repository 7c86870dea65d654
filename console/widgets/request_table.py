"""The live request table, updated in place: rows are keyed by request id; a new snapshot removes
rows that left, adds rows that arrived and `update_cell`s only the cells whose value changed."""
from __future__ import annotations

from typing import Any, Mapping

from rich.text import Text
from textual.widgets import DataTable

from batchdeck.console import format as fmt

COLUMNS = (("request_id", "id", 12), ("tenant", "tenant", 7), ("slo_class", "class", 11), ("state", "state", 9),
           ("prompt_tokens", "prompt", 6), ("output_tokens", "output", 8), ("ttft", "TTFT", 7))
STATE_STYLE = {"prefill": "bold #5b9cf5", "decode": "bold #4fc36b", "waiting": "yellow", "preempted": "bold red"}


def cells(row: Mapping[str, Any]) -> tuple[Any, ...]:
    state = str(row.get("state", "?"))
    out_tokens = f"{row.get('output_tokens', 0)}/{row.get('max_tokens', '?')}" if row.get("max_tokens") else \
        str(row.get("output_tokens", 0))
    return (
        str(row.get("request_id", "?")),
        str(row.get("tenant", "-")),
        str(row.get("slo_class", "-")),
        Text(state, style=STATE_STYLE.get(state, "")),
        Text(str(row.get("prompt_tokens", "-")), justify="right"),
        Text(out_tokens, justify="right"),
        Text(fmt.ms(row.get("ttft")), justify="right"),
    )


class RequestTable(DataTable):
    DEFAULT_CSS = """
    RequestTable { height: 1fr; }
    """

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes, cursor_type="row", zebra_stripes=True)
        self._rows: dict[str, tuple[Any, ...]] = {}
        self.rebuilds = 0  # stays 0: rows are never cleared and rebuilt (a test checks it)

    def on_mount(self) -> None:
        for key, label, width in COLUMNS:
            self.add_column(label, key=key, width=width)

    def sync(self, rows: Mapping[str, Mapping[str, Any]]) -> None:
        """Make the table show `rows` (request id -> snapshot row, in the engine's order: running, then
        waiting) with the fewest changes. The cursor stays on the request it was on."""
        selected = self.selected_request_id
        current = self._rows
        for rid in [r for r in current if r not in rows]:
            self.remove_row(rid)
            del current[rid]
        for rid, row in rows.items():
            new = cells(row)
            old = current.get(rid)
            if old is None:
                self.add_row(*new, key=rid)
            elif old != new:
                for (key, _, _), a, b in zip(COLUMNS, old, new):
                    if a != b:
                        self.update_cell(rid, key, b)
            current[rid] = new
        order = {rid: i for i, rid in enumerate(rows)}
        if [r.key.value for r in self.ordered_rows] != list(rows):  # the engine's order (reorders, rebuilds none)
            self.sort("request_id", key=lambda rid: order.get(str(rid), len(order)))
        if selected is not None and selected in current:
            index = self.get_row_index(selected)
            if index != self.cursor_row:
                self.move_cursor(row=index, animate=False, scroll=False)

    @property
    def selected_request_id(self) -> str | None:
        if not self.row_count:
            return None
        try:
            key = self.coordinate_to_cell_key(self.cursor_coordinate).row_key
        except Exception:
            return None
        return None if key is None else key.value
