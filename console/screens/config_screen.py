"""The config panel: every live setting as a Select or an Input, each labelled with its bounds.

Apply validates the changed fields together exactly as the engine will; a refusal is shown in the
panel (and nothing is sent). Valid changes are handed back to the app, which sends them as one
`set` and logs the iteration they took effect.
"""
from __future__ import annotations

from typing import Any, Mapping

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Select, Static

from batchdeck.console.commands import BOOL_SETTINGS, FLOAT_SETTINGS, INT_SETTINGS, PANEL_SETTINGS, choices, describe_bounds, parse_value, validate
from batchdeck.engine.config import ConfigError


class ConfigScreen(ModalScreen[dict[str, Any] | None]):
    BINDINGS = [Binding("escape", "cancel", "Close", tooltip="close without applying anything"),
                Binding("ctrl+s", "apply", "Apply", tooltip="apply the changed settings (checked against the "
                                                             "bounds first; a refusal is shown here)")]

    def __init__(self, config: Mapping[str, Any], bounds: Mapping[str, Any] | None) -> None:
        super().__init__()
        self.config = dict(config)
        self.bounds = dict(bounds or {})

    def compose(self) -> ComposeResult:
        with Vertical(id="config-dialog") as dialog:
            dialog.border_title = "Live configuration"
            dialog.border_subtitle = (f"v{self.config.get('version', '?')} · changes apply at the next iteration · "
                                      "ctrl+s apply · esc close")
            with Grid(id="config-grid"):
                for key in PANEL_SETTINGS:
                    if key not in self.config:
                        continue
                    yield Label(key, classes="config-key")
                    opts = choices(key, self.bounds)
                    value = self.config[key]
                    if isinstance(value, bool):  # a true/false setting's Select shows "true" / "false"
                        value = str(value).lower()
                    if opts is not None:
                        yield Select([(o, o) for o in opts], value=value if value in opts else Select.NULL,
                                     allow_blank=False, id=f"cfg-{key}", compact=True)
                    else:
                        yield Input(str(value), id=f"cfg-{key}", compact=True,
                                    type="integer" if key in INT_SETTINGS else "number")
                    yield Label(describe_bounds(key, self.config, self.bounds), classes="config-bounds")
            yield Static("", id="config-error")
            with Horizontal(id="config-buttons"):
                yield Button("Apply  ctrl+s", variant="primary", id="config-apply", compact=True)
                yield Button("Cancel  esc", id="config-cancel", compact=True)

    def changes(self) -> dict[str, Any]:
        """The settings that differ from the current config, typed; raises ConfigError for bad input."""
        out: dict[str, Any] = {}
        for key in PANEL_SETTINGS:
            if key not in self.config:
                continue
            widget = self.query_one(f"#cfg-{key}")
            if isinstance(widget, Select):
                value = widget.value
                if value is Select.NULL:
                    continue
                if key in BOOL_SETTINGS:
                    value = parse_value(key, value)
            else:
                raw = widget.value.strip()
                if not raw:
                    raise ConfigError(key, raw, "a value in " + describe_bounds(key, self.config, self.bounds))
                value = parse_value(key, raw)
                if key in FLOAT_SETTINGS:
                    value = float(value)
            if value != self.config[key]:
                out[key] = value
        return out

    def _show_error(self, message: str) -> None:
        self.query_one("#config-error", Static).update(f"[b red]refused:[/] {message}")

    @on(Button.Pressed, "#config-apply")
    def action_apply(self) -> None:
        try:
            changes = self.changes()
        except ConfigError as exc:
            self._show_error(str(exc))
            return
        if not changes:
            self.dismiss(None)
            return
        error = validate(changes, self.config, self.bounds)
        if error is not None:
            self._show_error(error)
            return
        self.dismiss(changes)

    @on(Button.Pressed, "#config-cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)
