"""The live request table, updated in place: rows are keyed by request id; a new snapshot removes
rows that left, adds rows that arrived and `update_cell`s only the cells whose value changed.

The selection is a request id, not a row number: it changes only when the operator moves the cursor
(keys, mouse, `move_cursor`), follows its request when rows move, and stays named when its request
leaves the table (`selection_gone`), so an action never lands on whichever row slid under the cursor."""
from __future__ import annotations

from typing import Any, Mapping

from rich.text import Text
from textual.widgets import DataTable

from batchdeck.console.request_view import age

# (key, label, width, right-aligned): no cell padding. Every cell keeps one blank cell between columns:
# a text column ends with one (its values are at least one cell shorter than the column: class and
# state are closed sets), a number column starts with one, except `prompt`, whose left neighbour
# (state) always ends with one. So nine columns fit the request box of a 120-column terminal (74 cells
# beside the settings pane, scrollbar included; a test checks).
COLUMNS = (("request_id", "id", 13, False), ("tenant", "tenant", 8, False), ("slo_class", "class", 12, False),
           ("state", "state", 10, False), ("prompt_tokens", "prompt", 6, True),
           ("num_cached_tokens", "cached", 7, True), ("output_tokens", "output", 8, True),
           ("ttft", "TTFT", 6, True), ("age", "age", 4, True))
STATE_STYLE = {"prefill": "bold #5b9cf5", "decode": "bold #4fc36b", "waiting": "yellow", "preempted": "bold red"}


def age_text(seconds: float | None) -> str:
    """At most 3 characters: '42s', '17m', '5h', '12d'."""
    if seconds is None:
        return "-"
    if seconds < 99.5:
        return f"{max(0.0, seconds):.0f}s"
    if seconds < 99.5 * 60:
        return f"{seconds / 60:.0f}m"
    if seconds < 99.5 * 3600:
        return f"{seconds / 3600:.0f}h"
    return f"{seconds / 86400:.0f}d" if seconds < 999.5 * 86400 else "old"


def ttft_text(seconds: float | None) -> str:
    """At most 5 characters: '9.5ms', '320ms', '2.42s', '12.3s', '240s', then as `age_text`."""
    if seconds is None:
        return "-"
    if seconds < 0.00995:
        return f"{max(0.0, seconds) * 1e3:.1f}ms"
    if seconds < 0.9995:
        return f"{seconds * 1e3:.0f}ms"
    if seconds < 9.995:
        return f"{seconds:.2f}s"
    if seconds < 99.95:
        return f"{seconds:.1f}s"
    return f"{seconds:.0f}s" if seconds < 999.5 else age_text(seconds)


def cells(row: Mapping[str, Any], now: float | None = None) -> tuple[Any, ...]:
    state = str(row.get("state", "?"))
    out_tokens = f"{row.get('output_tokens', 0)}/{row.get('max_tokens', '?')}" if row.get("max_tokens") else \
        str(row.get("output_tokens", 0))
    return (
        str(row.get("request_id", "?")),
        str(row.get("tenant", "-")),
        str(row.get("slo_class", "-")),
        Text(state, style=STATE_STYLE.get(state, "")),
        Text(str(row.get("prompt_tokens", "-")), justify="right"),
        Text(str(row.get("num_cached_tokens", "-")), justify="right"),
        Text(out_tokens, justify="right"),
        Text(ttft_text(row.get("ttft")), justify="right"),
        Text(age_text(age(row, now)), justify="right"),
    )


class RequestTable(DataTable):
    DEFAULT_CSS = """
    RequestTable { height: 1fr; }
    RequestTable.-stale > .datatable--cursor { background: $panel; color: $text-muted; text-style: none; }
    """

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes, cursor_type="row", zebra_stripes=True, cell_padding=0)
        self._rows: dict[str, tuple[Any, ...]] = {}
        self.rebuilds = 0  # stays 0: rows are never cleared and rebuilt (a test checks it)
        self.selected_id: str | None = None  # the operator's selection (see the module docstring)
        self._syncing = False  # cursor moves made by sync() are not the operator's

    def on_mount(self) -> None:
        for key, label, width, right in COLUMNS:
            self.add_column(Text(label, justify="right" if right else "left"), key=key, width=width)

    def watch_cursor_coordinate(self, old, new) -> None:
        super().watch_cursor_coordinate(old, new)
        if not self._syncing and self.row_count:
            self.selected_id = self._key_under_cursor()
            self.remove_class("-stale")

    def sync(self, rows: Mapping[str, Mapping[str, Any]], now: float | None = None) -> None:
        """Make the table show `rows` (request id -> snapshot row, in the order to show) with the fewest
        changes. The cursor follows the selected request; if it left, the selection still names it."""
        self._syncing = True
        try:
            current = self._rows
            for rid in [r for r in current if r not in rows]:
                self.remove_row(rid)
                del current[rid]
            for rid, row in rows.items():
                new = cells(row, now)
                old = current.get(rid)
                if old is None:
                    self.add_row(*new, key=rid)
                elif old != new:
                    for (key, *_), a, b in zip(COLUMNS, old, new):
                        if a != b:
                            self.update_cell(rid, key, b)
                current[rid] = new
            order = {rid: i for i, rid in enumerate(rows)}
            if [r.key.value for r in self.ordered_rows] != list(rows):  # the given order (reorders, rebuilds none)
                self.sort("request_id", key=lambda rid: order.get(str(rid), len(order)))
            selected = self.selected_id
            if selected is not None and selected in current:
                index = self.get_row_index(selected)
                if index != self.cursor_row:
                    self.move_cursor(row=index, animate=False, scroll=False)
            # the cursor no longer marks the selection: dim it until the operator picks a row
            self.set_class(self.selection_gone, "-stale")
        finally:
            self._syncing = False

    def forget_rows(self) -> None:
        """Empty the table (a replay seeked backwards); the selection is dropped too."""
        self._syncing = True
        try:
            self.clear()
            self._rows.clear()
            self.selected_id = None
        finally:
            self._syncing = False

    def _key_under_cursor(self) -> str | None:
        try:
            key = self.coordinate_to_cell_key(self.cursor_coordinate).row_key
        except Exception:
            return None
        return None if key is None else key.value

    @property
    def selection_gone(self) -> bool:
        """The selected request is no longer in the table (finished, aborted, or filtered out)."""
        return self.selected_id is not None and self.selected_id not in self._rows

    @property
    def selected_request_id(self) -> str | None:
        """The selected request if it is still in the table; else None (see `selected_id`)."""
        if self.selected_id is None and self.row_count:  # nothing chosen yet: the row under the cursor
            return self._key_under_cursor()
        return None if self.selection_gone else self.selected_id
