"""Throughput over time (prompt and generation tok/s per half-second bin) with textual-plotext,
a vertical rule where each config change took effect. Plotext takes tens of milliseconds to build
a frame, so the app redraws this one at most once a second and only when its data changed."""
from __future__ import annotations

from typing import Sequence

from textual_plotext import PlotextPlot

from batchdeck.console.format import short
from batchdeck.console.state import Mark


class ThroughputPlot(PlotextPlot):
    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self._key: object = None

    def set_data(self, times: Sequence[float], prompt: Sequence[float], gen: Sequence[float],
                 marks: Sequence[Mark]) -> bool:
        """Replot if anything changed; returns whether it did."""
        key = (len(times), times[-1] if times else None, tuple(m.time for m in marks))
        if key == self._key:
            return False
        self._key = key
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        plt.xlabel("engine time (s)")
        if times:
            plt.plot(list(times), list(gen), color=(79, 195, 107), marker="braille")
            plt.plot(list(times), list(prompt), color=(91, 156, 245), marker="braille")
            top = max(max(gen, default=0), max(prompt, default=0), 1.0)
            ticks = [0.0, top / 2, top]
            plt.yticks(ticks, [short(t) for t in ticks])
            lo, hi = times[0], times[-1]
            for m in marks:
                if lo <= m.time <= hi:
                    plt.vline(m.time, color=(242, 199, 68))
        self.refresh()
        return True
