"""Batch composition per iteration: one column per iteration, stacked decode / prefill / padding
tokens, the token budget as a dotted line, and a yellow rule where a config change took effect.

Drawn directly with block characters (eighth-cell resolution): repainting it is ~1 ms, so it can
follow the engine iteration by iteration where a general plotting library would not keep up.
"""
from __future__ import annotations

import bisect
import itertools
import math
from dataclasses import dataclass
from typing import Sequence

from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual.strip import Strip
from textual.widget import Widget

from batchdeck.console.state import Mark

EIGHTHS = " ▁▂▃▄▅▆▇█"
DECODE = Style(color="#4fc36b")
PREFILL = Style(color="#5b9cf5")
MARK = Style(color="#f2c744", bold=True)
AXIS = Style(color="#8a8a8a")
BUDGET = Style(color="#c06060")
COLORS = ("#4fc36b", "#5b9cf5", "#8a8a8a")


@dataclass(frozen=True)
class Column:
    """One column: an iteration, or the mean of `count` consecutive iterations from `iteration`."""

    iteration: int
    decode: float
    prefill: float
    padding: float = 0
    count: int = 1

    @property
    def total(self) -> int:
        return self.decode + self.prefill + self.padding


def nice_ceiling(value: float) -> float:
    """The smallest 1/2/2.5/5 x 10^k at or above value (axis tops that read well)."""
    if value <= 0:
        return 1.0
    k = 1.0
    while k * 10 <= value:
        k *= 10
    while k > value:
        k /= 10
    for m in (1, 2, 2.5, 5, 10):
        if m * k >= value:
            return m * k
    return 10 * k


def _label(v: float) -> str:
    return f"{v / 1000:.1f}k" if v >= 10000 else f"{v:.0f}"


def count_in_span(records: Sequence, span_s: float) -> int:
    """How many of the newest records lie within `span_s` seconds of the newest."""
    if not records:
        return 0
    cutoff = records[-1].time - span_s
    n = 0
    for r in reversed(records):
        if r.time <= cutoff:
            break
        n += 1
    return n


def columns_for(records: Sequence, width: int, span_s: float | None) -> list[Column]:
    """Columns for the newest records: one per iteration when `span_s` is None, else the last
    `span_s` seconds with consecutive iterations averaged so they fit `width` columns."""
    if not records:
        return []
    if span_s is None:
        recs = list(records)[-width:]
        return [Column(r.iteration, r.num_decode_tokens, r.num_prefill_tokens, r.num_padding_tokens) for r in recs]
    n = count_in_span(records, span_s)
    recs = list(itertools.islice(records, len(records) - n, None))
    k = max(1, math.ceil(len(recs) / max(1, width)))
    start = len(recs) % k  # whole groups, aligned to the newest record
    cols = []
    for i in range(start, len(recs), k):
        group = recs[i:i + k]
        n = len(group)
        cols.append(Column(group[0].iteration, sum(r.num_decode_tokens for r in group) / n,
                           sum(r.num_prefill_tokens for r in group) / n, sum(r.num_padding_tokens for r in group) / n,
                           group[-1].iteration - group[0].iteration + 1))
    return cols


_STYLE_CACHE: dict[tuple[str, str | None], Style] = {}


def _style(color: str, bgcolor: str | None = None) -> Style:
    key = (color, bgcolor)
    style = _STYLE_CACHE.get(key)
    if style is None:
        style = _STYLE_CACHE[key] = Style(color=color, bgcolor=bgcolor)
    return style


class _Line:
    """Runs of (text, style), merging neighbours with the same style."""

    __slots__ = ("runs", "_chars", "_style")

    def __init__(self) -> None:
        self.runs: list[tuple[str, Style | None]] = []
        self._chars: list[str] = []
        self._style: Style | None = None

    def add(self, chars: str, style: Style | None) -> None:
        if style is not self._style and self._chars:
            self.runs.append(("".join(self._chars), self._style))
            self._chars = []
        self._style = style
        self._chars.append(chars)

    def done(self) -> list[tuple[str, Style | None]]:
        if self._chars:
            self.runs.append(("".join(self._chars), self._style))
            self._chars = []
        return self.runs


def chart_lines(columns: Sequence[Column], marks: Sequence[Mark], width: int, height: int,
                budget: int | None = None, autoscale: bool = False) -> list[list[tuple[str, Style | None]]]:
    """The chart as `height` lines of (text, style) runs, `width` cells each (pure; tested directly).
    The y axis spans the token budget (a full column is a full budget), or with `autoscale` the
    tallest column shown (small batches on a large budget stay readable)."""
    axis_w = 6
    plot_w = max(1, width - axis_w)
    rows = max(1, height - 1)
    cols = list(columns)[-plot_w:]
    peak = max((c.total for c in cols), default=0)
    if budget and peak <= budget and not autoscale:
        top = float(budget)  # a full column is a full token budget
    else:
        top = nice_ceiling(max(peak, 1))
    scale = rows * 8 / top
    bounds = []  # per column: eighths at which decode, prefill, padding end
    for c in cols:
        d = round(c.decode * scale)
        p = round((c.decode + c.prefill) * scale)
        q = round(c.total * scale)
        if c.total and q == 0:  # a busy iteration is never drawn empty
            q = 1
            p = 1 if (c.decode or c.prefill) else 0
            d = 1 if c.decode else 0
        bounds.append((d, p, q))
    mark_cols: set[int] = set()
    if cols and marks:
        its = [c.iteration for c in cols]
        end = cols[-1].iteration + cols[-1].count
        for m in marks:
            if its[0] <= m.iteration < end:
                mark_cols.add(bisect.bisect_right(its, m.iteration) - 1)
    budget_row = None
    if budget and budget < top:
        budget_row = min(rows - 1, int(budget * scale // 8))
    pad = plot_w - len(cols)
    lines = []
    for r in range(rows - 1, -1, -1):
        line = _Line()
        lo = r * 8
        if r == rows - 1:
            label = _label(top)
        elif r == 0:
            label = "0"
        elif r == rows // 2 and rows >= 4:
            label = _label(top * (r + 0.5) / rows)
        else:
            label = ""
        line.add(f"{label:>5}┤" if label else "     │", AXIS)
        empty, empty_style = ("┄", BUDGET) if r == budget_row else (" ", None)
        if pad:
            line.add(empty * pad, empty_style)
        for i, (d, p, q) in enumerate(bounds):
            if q <= lo:
                if i in mark_cols:
                    line.add("│", MARK)
                else:
                    line.add(empty, empty_style)
                continue
            lower = 0 if d > lo else (1 if p > lo else 2)
            color = COLORS[lower]
            if lower == 0 and lo < d < lo + 8 and q > d:  # decode ends inside this cell, more above
                line.add(EIGHTHS[d - lo], _style(color, COLORS[1] if p > d else COLORS[2]))
            elif lower <= 1 and lo < p < lo + 8 and q > p:  # prefill ends inside, padding above
                line.add(EIGHTHS[p - lo], _style(color, COLORS[2]))
            elif q < lo + 8:
                line.add(EIGHTHS[q - lo], _style(color))
            else:
                line.add("█", _style(color))
        lines.append(line.done())
    # x axis: first and last iteration, iterations per column, and where marks fall
    axis = [" "] * plot_w

    def put(at: int, label: str) -> None:
        for j, ch in enumerate(label):
            if 0 <= at + j < plot_w:
                axis[at + j] = ch

    if cols:
        first, last = f"it {cols[0].iteration}", f"{cols[-1].iteration}"
        put(pad if pad + len(first) < plot_w else 0, first)
        put(plot_w - len(last), last)
        per_col = max(c.count for c in cols)
        middle = f"{per_col} it/col" if per_col > 1 else "1 it/col"
        start = pad + len(first) + max(1, (plot_w - pad - len(first) - len(last) - len(middle)) // 2)
        if start + len(middle) < plot_w - len(last) and not any(start - 1 <= pad + i <= start + len(middle)
                                                                for i in mark_cols):
            put(start, middle)
    line = _Line()
    line.add(" " * axis_w, None)
    for i, ch in enumerate(axis):
        if i - pad in mark_cols:
            line.add("▲", MARK)
        else:
            line.add(ch, AXIS)
    lines.append(line.done())
    return lines


def render_chart(columns: Sequence[Column], marks: Sequence[Mark], width: int, height: int,
                 budget: int | None = None, autoscale: bool = False) -> Text:
    """`chart_lines` as Rich Text (for tests and plain-text dumps)."""
    text = Text(no_wrap=True, overflow="crop")
    for n, line in enumerate(chart_lines(columns, marks, width, height, budget, autoscale)):
        if n:
            text.append("\n")
        for chars, style in line:
            text.append(chars, style)
    return text


class BatchChart(Widget):
    DEFAULT_CSS = """
    BatchChart { height: 1fr; width: 1fr; }
    """

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.records: Sequence = ()
        self.span_s: float | None = None
        self.marks: list[Mark] = []
        self.budget: int | None = None
        self.autoscale = False
        self.columns: list[Column] = []
        self._key: object = None
        self._strips: list[Strip] | None = None
        self._strips_size: object = None

    @property
    def plot_width(self) -> int:
        return max(1, self.size.width - 6)

    def set_data(self, records: Sequence, marks: Sequence[Mark], budget: int | None, span_s: float | None,
                 autoscale: bool = False) -> None:
        """`records`: IterationRecords, oldest first (kept by reference; columns are made at render time,
        for the width the chart really has). `span_s` None: one column per iteration."""
        key = (records[-1].iteration if records else None, len(records), len(marks), budget, span_s, autoscale)
        if key == self._key:
            return
        self._key = key
        self.records = records
        self.marks = list(marks)
        self.budget = budget
        self.span_s = span_s
        self.autoscale = autoscale
        self._strips = None
        self.refresh()

    def render_line(self, y: int) -> Strip:
        size = self.size
        if self._strips is None or self._strips_size != size:
            self._strips_size = size
            self.columns = columns_for(self.records, self.plot_width, self.span_s)
            self._strips = [Strip([Segment(chars, style) for chars, style in line])
                            for line in chart_lines(self.columns, self.marks, size.width, size.height, self.budget,
                                                     self.autoscale)]
        if 0 <= y < len(self._strips):
            return self._strips[y]
        return Strip.blank(size.width)
