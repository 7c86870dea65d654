"""Speculative decoding's figures over a sliding window of iterations: how many drafted tokens the
target model accepted, and how many tokens each iteration produced.

`SpecWindow` keeps the same window as the dashboard's throughput figures (`window_s` seconds of
engine time, records with time in (now - window_s, now]); `spec_stats()` is the aggregation itself.
Pure: no clock, no Textual; `now` comes from the caller.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Iterable

from engine.telemetry import IterationRecord


@dataclass(frozen=True)
class SpecStats:
    """Sums over some iterations (see `spec_stats`)."""

    iterations: int = 0
    proposed: int = 0  # draft tokens sent for verification
    accepted: int = 0  # of those, the tokens the target model agreed with
    generated: int = 0  # tokens sampled (accepted drafts plus each step's own token)

    @property
    def acceptance_rate(self) -> float | None:
        """accepted / proposed; None when nothing was proposed (speculation off, or no draft found)."""
        return self.accepted / self.proposed if self.proposed else None

    @property
    def tokens_per_iteration(self) -> float | None:
        """Generated tokens per iteration; None without iterations."""
        return self.generated / self.iterations if self.iterations else None


def spec_stats(iterations: Iterable[IterationRecord]) -> SpecStats:
    """The speculation sums over `iterations`."""
    n = proposed = accepted = generated = 0
    for rec in iterations:
        n += 1
        proposed += rec.spec_proposed
        accepted += rec.spec_accepted
        generated += rec.num_generated_tokens
    return SpecStats(n, proposed, accepted, generated)


class SpecWindow:
    """The iterations of the last `window_s` seconds of engine time, for `stats(now)`.

    Records older than the window are dropped as new ones arrive, so memory stays bounded by the
    window whatever the iteration rate. Feed it in time order (out-of-order records are kept until
    they fall out of the window).
    """

    def __init__(self, window_s: float = 10.0) -> None:
        if not window_s > 0.0:
            raise ValueError(f"window_s must be > 0 seconds, got {window_s!r}")
        self.window_s = window_s
        self._iterations: deque[IterationRecord] = deque()

    def add(self, rec: IterationRecord) -> None:
        self._iterations.append(rec)
        self._prune(rec.time - self.window_s)

    def _prune(self, cutoff: float) -> None:
        its = self._iterations
        while its and its[0].time <= cutoff:
            its.popleft()

    def stats(self, now: float) -> SpecStats:
        """The sums over the iterations with time in (now - window_s, now]."""
        cutoff = now - self.window_s
        self._prune(cutoff)
        return spec_stats(rec for rec in self._iterations if cutoff < rec.time <= now)


def summary(stats: SpecStats, spec_k: int | None) -> str:
    """One line for the dashboard: 'accepted 72% · 1.43 tok/it', or 'spec off · 1.00 tok/it' while
    spec_k is 0 and the window holds no drafts; '-' for a figure without data. Rich markup: the
    figures are bold. Short enough for the throughput plot's border at 120 columns."""
    per_it = "-" if stats.tokens_per_iteration is None else f"{stats.tokens_per_iteration:.2f}"
    if stats.acceptance_rate is None and spec_k == 0:
        head = "spec off"
    else:
        rate = "-" if stats.acceptance_rate is None else f"{stats.acceptance_rate * 100:.0f}%"
        head = f"accepted [b]{rate}[/]"
    return f"{head} · [b]{per_it}[/] tok/it"
