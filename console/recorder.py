"""`--record FILE`: everything the console receives and does, as JSONL.

One JSON object per line, each with a `"type"`:
  "iteration" | "request" | "gpu" | "requests"  the telemetry record's fields (as on MQTT)
  "event"   Event.to_dict() flattened: {"type": "event", "kind": "config_change", "changes": {...},
            "applied_iteration": N, "time": t, "iteration": i, "source": "console", ...}
  "action"  an operator input: {"type": "action", "op": "set"|"pause"|"resume"|"abort"|"submit"|...,
            "time": engine time, "wall_time": unix time, "origin": "palette"|"panel"|"key", "ok": ...,
            "error"?, "applied_iteration"?, op-specific fields}
  "config"  the config snapshot the console started with ({"config", "bounds", "version", "engine"})
Readers skip types they do not know. Lines are written as messages are drained (on the UI's timer)
and flushed once per drain, so a crash loses at most one tick.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import IO, Any, Iterable, Mapping

from batchdeck.console.client import TelemetryMessage, record_to_dict


def _default(obj: Any) -> Any:
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    to_dict = getattr(obj, "to_dict", None)
    if to_dict is not None:
        return to_dict()
    return str(obj)


def _clean(value: Any) -> Any:
    """NaN/inf are not JSON: written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def line_for(topic: str, record: Any) -> dict[str, Any]:
    data = record_to_dict(topic, record)
    out: dict[str, Any] = {"type": topic}
    for k, v in data.items():
        if k != "type":
            out[k] = _clean(v)
    return out


class Recorder:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._f: IO[str] | None = open(self.path, "w", encoding="utf-8")
        self.lines = 0

    def _write(self, obj: Mapping[str, Any]) -> None:
        if self._f is None:
            return
        self._f.write(json.dumps(obj, default=_default, separators=(",", ":")) + "\n")
        self.lines += 1

    def write_messages(self, messages: Iterable[TelemetryMessage | tuple[str, Any]]) -> None:
        for topic, record in messages:
            if topic in ("reset",):
                continue
            self._write(line_for(topic, record))
        self.flush()

    def config(self, snapshot: Mapping[str, Any], engine_time: float | None) -> None:
        self._write({"type": "config", "time": engine_time, **{k: v for k, v in snapshot.items() if k != "type"}})
        self.flush()

    def action(self, op: str, engine_time: float | None, **fields: Any) -> dict[str, Any]:
        obj = {"type": "action", "op": op, "time": engine_time, "wall_time": time.time(), **fields}
        self._write(obj)
        self.flush()
        return obj

    def flush(self) -> None:
        if self._f is not None:
            self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
