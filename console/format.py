"""Number formatting for the dashboard: short, fixed-width friendly, '-' for missing values."""
from __future__ import annotations


def ms(value: float | None) -> str:
    """Seconds -> '12.3ms' / '1.20s'."""
    if value is None:
        return "-"
    if value >= 1.0:
        return f"{value:.2f}s"
    v = value * 1e3
    return f"{v:.0f}ms" if v >= 100 else f"{v:.1f}ms"


def rate(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 10_000:
        return f"{value / 1000:.1f}k"
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def count(value: int | float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}"


def size(value: int | float | None) -> str:
    """Bytes -> '1.5 GiB'."""
    if value is None:
        return "-"
    v = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(v) < 1024 or unit == "TiB":
            return f"{v:.0f} {unit}" if unit in ("B", "KiB") else f"{v:.1f} {unit}"
        v /= 1024
    return f"{v:.1f} TiB"


def pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"


def bar(fraction: float, width: int) -> str:
    """A horizontal bar of `width` cells with eighth-block resolution."""
    fraction = min(max(fraction, 0.0), 1.0)
    eighths = round(fraction * width * 8)
    full, rest = divmod(eighths, 8)
    partial = " ▏▎▍▌▋▊▉"[rest] if rest else ""
    return ("█" * full + partial).ljust(width, "·")[:width]


def short(value: int | float | None) -> str:
    """12345 -> '12.3k', 1234567 -> '1.2M'."""
    if value is None:
        return "-"
    v = float(value)
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.1f}{suffix}"
    return f"{v:.0f}"


def gsize(value: int | float | None) -> str:
    """Bytes -> '52.0G' / '512M' (compact, for tight panels)."""
    if value is None:
        return "-"
    v = float(value)
    if v >= 1 << 30:
        return f"{v / (1 << 30):.1f}G"
    if v >= 1 << 20:
        return f"{v / (1 << 20):.0f}M"
    return f"{v / 1024:.0f}K"
