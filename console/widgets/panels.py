"""Text panels of the dashboard. Each has `show(...)` taking plain data and re-rendering itself only
when what it would print changed.

They are plain Widgets with a fixed size from the stylesheet, repainted with `refresh()` and never
with a layout pass: `Static.update()` asks for a relayout of the whole screen every time, which at
10 Hz costs more than everything else the dashboard does."""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from rich.console import RenderableType
from rich.text import Text
from textual.widget import Widget

from batchdeck.console import format as fmt
from batchdeck.console.commands import PANEL_SETTINGS, describe_bounds
from batchdeck.engine.service.gpu_monitor import GpuSample


class Panel(Widget):
    """Shows one renderable; skips identical updates; repaints without relayout (fixed size)."""

    DEFAULT_CSS = """
    Panel { height: 1fr; }
    """

    def __init__(self, *, title: str = "", id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.border_title = title
        self._last_key: Any = None
        self._factory: Callable[[], RenderableType] = lambda: ""
        self._built: tuple[Any, int] | None = None
        self._renderable: RenderableType = ""

    @property
    def text_width(self) -> int:
        """The width content is laid out for (known at render time)."""
        return self.content_size.width

    def render(self) -> RenderableType:
        # built here, not in show(): only now is the widget's size certain
        if self._built != (self._last_key, self.text_width):
            self._built = (self._last_key, self.text_width)
            self._renderable = self._factory()
        return self._renderable

    def show_if_changed(self, key: Any, renderable_factory: Callable[[], RenderableType]) -> None:
        if key == self._last_key:
            return
        self._last_key = key
        self._factory = renderable_factory
        self.refresh()


class StatTile(Panel):
    """A title (border), a big main line and a smaller second line."""

    def show(self, main: str, sub: str = "", style: str = "bold") -> None:
        def build() -> Text:
            t = Text(main, style=style, no_wrap=True, overflow="ellipsis")
            if sub:
                t.append("\n")
                t.append(sub, style="dim")
            return t

        self.show_if_changed((main, sub, style), build)


class KvGauge(Panel):
    def show(self, used: int | None, total: int | None, block_size: int | None, peak: float | None,
             prefix: Mapping[str, Any] | None = None) -> None:
        """`prefix`: the window's prefix-cache metrics (hit_rate, blocks_cached/evictable/free)."""
        cached = (prefix or {}).get("blocks_evictable") or 0
        hit_rate = (prefix or {}).get("hit_rate")

        def build() -> Text:
            if not total:
                return Text("no iterations yet", style="dim")
            frac = (used or 0) / total
            color = "green" if frac < 0.7 else ("yellow" if frac < 0.9 else "red")
            width = max(4, self.text_width - 6)
            t = Text(no_wrap=True, overflow="ellipsis")
            bar = fmt.bar(frac, width)
            if cached:  # cached blocks nobody holds: reclaimable, drawn after the used ones
                n_used = len(bar.rstrip("·"))
                n_cached = min(width - n_used, round(cached / total * width))
                t.append(bar[:n_used], style=color)
                t.append("▒" * n_cached, style="cyan")
                t.append(bar[n_used + n_cached:], style=color)
            else:
                t.append(bar, style=color)
            t.append(f" {frac * 100:3.0f}%\n", style="bold")
            t.append(f"{fmt.count(used)}/{fmt.count(total)} blocks", style="bold")
            if prefix is not None and (cached or hit_rate is not None):
                t.append(f" · {fmt.count(cached)} cached", style="cyan")
                if hit_rate is not None:
                    t.append(f" · hit {hit_rate * 100:.0f}%", style="cyan")
            return t

        key = (used, total, block_size, None if peak is None else round(peak, 3), cached,
               None if hit_rate is None else round(hit_rate, 2))
        self.show_if_changed(key, build)


class GpuPanel(Panel):
    def show(self, sample: GpuSample | None, kv_pool_bytes: int | None, device: str | None) -> None:
        def build() -> Text:
            t = Text(no_wrap=True, overflow="ellipsis")
            if sample is None or not sample.available:
                t.append("unavailable", style="bold yellow")
                t.append(f" · engine on {device or '?'}\n", style="dim")
                t.append(f"KV pool {fmt.size(kv_pool_bytes)}\n")
                # the reason's headline, word-wrapped over the lines left (the whole reason is the tooltip)
                reason = sample.reason if sample is not None and sample.reason else "no GPU sample yet"
                head = reason.split("): ", 1)[0] + ")" if "): " in reason else reason.split(": ", 1)[0]
                wrapped = Text(head, style="dim")
                lines = wrapped.wrap(self.app.console, max(1, self.text_width), overflow="ellipsis")
                for n, line in enumerate(lines[: max(1, self.content_size.height - 2)]):
                    if n:
                        t.append("\n")
                    t.append_text(line)
                return t
            if sample.name:
                t.append(f"{sample.name}\n", style="bold")
            used, total = sample.memory_used, sample.memory_total
            if used is not None and total:
                t.append(f"{fmt.size(used)} / {fmt.size(total)}", style="bold")
                t.append(f" used {used / total * 100:.0f}%\n", style="dim")
            else:
                t.append("memory -\n", style="dim")
            t.append(f"KV {fmt.gsize(sample.kv_pool_bytes or kv_pool_bytes)}")
            t.append(f" · torch {fmt.gsize(sample.torch_allocated)}/{fmt.gsize(sample.torch_reserved)}\n", style="dim")
            util = "-" if sample.utilization_gpu is None else f"{sample.utilization_gpu}%"
            power = "-" if sample.power_w is None else f"{sample.power_w:.0f}"
            limit = "" if sample.power_limit_w is None else f"/{sample.power_limit_w:.0f}"
            t.append(f"util {util} · {power}{limit} W", style="bold")
            if sample.temperature_c is not None:
                t.append(f" · {sample.temperature_c}°C", style="dim")
            return t

        reason = sample.reason if sample is not None and not sample.available else None
        if self.tooltip != reason:
            self.tooltip = reason
        key = None if sample is None else (sample.available, sample.reason, sample.memory_used, sample.memory_total,
                                           sample.torch_allocated, sample.torch_reserved, sample.utilization_gpu,
                                           sample.power_w, sample.temperature_c, sample.kv_pool_bytes)
        self.show_if_changed((key, kv_pool_bytes, device), build)


SHORT = {"max_num_seqs": "max_num_seqs", "max_batched_tokens": "max_batched_tok", "selective_threshold": "selective_thr",
         "static_timeout": "static_timeout"}


class SettingsPanel(Panel):
    """The live policy and settings, always visible, each with what it allows."""

    def show(self, config: Mapping[str, Any] | None, bounds: Mapping[str, Any] | None, version: int | None,
             paused: bool) -> None:
        def build() -> Text:
            t = Text(no_wrap=True, overflow="ellipsis")
            if not config:
                t.append("waiting for the engine's config…", style="dim")
                return t
            rows = []
            for key in PANEL_SETTINGS:
                if key not in config:
                    continue
                value = config[key]
                if key == "static_timeout":
                    value = f"{value:g}s"
                allowed = "" if key in ("policy", "mixing", "batching", "preemption") else \
                    describe_bounds(key, config, bounds)
                rows.append((SHORT.get(key, key), str(value), allowed))
            params = config.get("policy_params") or {}
            if params:
                rows.append(("params", ", ".join(f"{k}={v}" for k, v in params.items()), ""))
            for n, (label, value, allowed) in enumerate(rows):
                if n:
                    t.append("\n")
                t.append(label.ljust(16), style="dim")
                t.append(value.ljust(11), style="bold cyan")
                t.append(allowed, style="dim")
            return t

        subtitle = f"v{version}" + (" · PAUSED" if paused else "") if version is not None else ""
        if self.border_subtitle != subtitle:
            self.border_subtitle = subtitle
        self.show_if_changed((repr(config), repr(bounds), version, paused), build)


class ServicePanel(Panel):
    """SLO attainment per class and service per tenant (window share / cumulative tokens)."""

    def show(self, slo: Mapping[str, Mapping[str, Any]], service: Mapping[str, Mapping[str, int]],
             goodput: float | None) -> None:
        def build() -> Text:
            width = max(16, self.text_width)
            t = Text(no_wrap=True, overflow="ellipsis")
            if not slo and not service:
                t.append("no finished requests yet", style="dim")
                return t
            rows: list[tuple[str, str, str, str]] = []
            for cls, e in slo.items():
                frac = e.get("fraction", 0.0)
                color = "green" if frac >= 0.9 else ("yellow" if frac >= 0.5 else "red")
                rows.append((f"SLO {cls}", f"{frac * 100:.0f}%", f"bold {color}", f"{e['met']}/{e['count']}"))
            if goodput is not None:
                rows.append(("goodput", f"{goodput:.2f}/s", "bold", ""))
            total = sum(v.get("window", 0) for v in service.values()) or 1
            for tenant, v in list(service.items())[:6]:
                rows.append((f"· {tenant}", f"{v.get('window', 0) / total * 100:.0f}%", "bold",
                             fmt.short(v.get("cumulative", 0))))
            right = max(len(r[3]) for r in rows)
            for n, (label, value, style, extra) in enumerate(rows):
                if n:
                    t.append("\n")
                left = width - right - 7
                t.append(label[:left].ljust(left))
                t.append(value.rjust(6), style=style)
                t.append(" " + extra.rjust(right), style="dim")
            return t

        key = (tuple((k, v.get("met"), v.get("count")) for k, v in slo.items()),
               tuple((k, v.get("window"), v.get("cumulative")) for k, v in service.items()),
               None if goodput is None else round(goodput, 2))
        self.show_if_changed(key, build)


class StatusBar(Panel):
    """One line: link state, iteration, config version, paused/frozen, what is behind the client."""

    def show(self, parts: Sequence[tuple[str, str]]) -> None:
        def build() -> Text:
            t = Text(no_wrap=True, overflow="ellipsis")
            for i, (text, style) in enumerate(parts):
                if i:
                    t.append("  ")
                t.append(text, style=style)
            return t

        self.show_if_changed(tuple(parts), build)
