"""The cyclic collector's freeze (`gc.freeze`), held while an engine runs.

A full (generation-2) collection walks every tracked object that is not frozen and holds the GIL, so
the engine's thread stalls for as long as that takes (~0.3 s measured on an H200 host mid-replay over
the model and the imports). Like vLLM's engine core, the first `hold()` collects and then freezes
everything alive; holds are counted and the last `release()` unfreezes it all so it can be collected.

`refreeze()` (only while a hold is active) freezes again what was created since: for a run that keeps
what it makes until it ends (a replay's telemetry, see `RetainedFreezer`). Long-running services
never call it: a frozen reference cycle is not collected until the last release. Objects freed by
reference counting are freed whether frozen or not. `gc.freeze` itself is O(1).
"""
from __future__ import annotations

import gc
import threading
from typing import Any

_lock = threading.RLock()  # hold/release on the loop, refreeze on an engine's worker thread
_holders = 0


def hold() -> None:
    """Collect, then freeze what is alive (the first holder only); pair with `release()`."""
    global _holders
    with _lock:
        if _holders == 0:
            gc.collect()
            gc.freeze()
        _holders += 1


def release() -> None:
    """Give a hold back; the last one unfreezes everything frozen meanwhile."""
    global _holders
    with _lock:
        if _holders <= 0:
            raise RuntimeError("heap_freeze.release: no hold to release")
        _holders -= 1
        if _holders == 0:
            gc.unfreeze()


def holders() -> int:
    return _holders


def refreeze() -> bool:
    """While a hold is active, freeze everything created since the last freeze; whether it did."""
    with _lock:
        if _holders == 0:
            return False
        gc.freeze()
        return True


class RetainedFreezer:
    """A telemetry sink beside one that keeps every record to the run's end (a replay's `ListSink`):
    counts them and calls `refreeze()` every `every` records, so a full collection walks at most the
    last `every` records' objects (and the run's live state) instead of all kept so far.

    A fixed step bounds the pause whatever the run's length at one O(1) freeze per step. What is
    frozen stays frozen until the last hold's release (the engine's stop); reference cycles that
    become garbage in between are collected only then."""

    __slots__ = ("every", "records", "refreezes")

    def __init__(self, every: int = 1024):
        if every < 1:
            raise ValueError(f"RetainedFreezer: every must be >= 1, got {every!r}")
        self.every = every
        self.records = 0
        self.refreezes = 0  # refreeze() calls made while a hold was active

    def __call__(self, topic: str, record: Any) -> None:
        self.records += 1
        if self.records % self.every == 0:
            if refreeze():
                self.refreezes += 1
