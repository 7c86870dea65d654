"""Recordings: everything an engine emitted (and what was done to it), one JSON object per line.

One format, one writer, one reader. `batchdeck replay --record`, the console's `--record` and
`batchdeck console --replay` all use this module. Each line is `{"type": TYPE, ...}`:

    "iteration" | "request" | "gpu" | "requests"   the telemetry record's fields (protocol.encode)
    "event"    Event.to_dict() flattened: {"type": "event", "kind": "config_change", "changes": {...},
               "applied_iteration": N, "time": t, "iteration": i, "source": "console", ...}
    "action"   an input: {"type": "action", "op": "set"|"pause"|"resume"|"abort"|"submit"|"replay"|...,
               "time": engine time, "wall_time": unix time, "ok": ..., "error"?, "applied_iteration"?,
               op-specific fields ("origin" from the console, with "typed" for a palette input refused
               before it parsed into "changes"; "timeline_index" from a preset)}
    "config"   a config snapshot ({"config", "bounds", "version", "engine"}), first in a recording

Readers skip types they do not know. NaN/inf are written as null.
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import IO, Any, Iterable, Mapping, NamedTuple

from batchdeck.engine.service.protocol import decode, dumps_text, encode

PLAYED_TYPES = ("iteration", "request", "event", "gpu", "requests", "action", "config")
NOT_RECORDED = frozenset({"reset"})  # a player's own control message


def recording_line(topic: str, record: Any) -> dict[str, Any]:
    """The object written for one record: `{"type": topic, ...fields}`."""
    return {"type": topic, **{k: v for k, v in encode(record).items() if k != "type"}}


class RecordingWriter:
    """Writes a recording; usable as a telemetry sink (`writer(topic, record)`) from any thread.

    Lines are flushed by `flush()` (and `write_messages`, `config`, `action`, `close`), so a
    reader that follows the file sees whole batches.
    """

    def __init__(self, target: str | Path | IO[str]):
        if isinstance(target, (str, Path)):
            self.path: Path | None = Path(target)
            self._file: IO[str] | None = open(self.path, "w", encoding="utf-8")
            self._owned = True
        else:
            self.path, self._file, self._owned = None, target, False
        self._lock = threading.Lock()
        self.lines = 0

    def _write(self, obj: Mapping[str, Any]) -> None:
        text = dumps_text(obj) + "\n"
        with self._lock:
            if self._file is None:
                return
            self._file.write(text)
            self.lines += 1

    def __call__(self, topic: str, record: Any) -> None:
        if topic not in NOT_RECORDED:
            self._write(recording_line(topic, record))

    def write_messages(self, messages: Iterable[tuple[str, Any]]) -> None:
        """Write (topic, record) pairs, then flush."""
        for topic, record in messages:
            self(topic, record)
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
        with self._lock:
            if self._file is not None:
                self._file.flush()

    def close(self) -> None:
        with self._lock:
            if self._file is None:
                return
            self._file.flush()
            if self._owned:
                self._file.close()
            self._file = None


class RecordingError(ValueError):
    """A recording that cannot be read; says which file and line."""


class Recording(NamedTuple):
    times: list[float]  # play time of each message: its engine time, or the one before it
    messages: list[tuple[str, Any]]  # (type, typed record); "action", "config" and "requests" stay dicts
    snapshot: dict[str, Any] | None  # the first config snapshot


def read_recording(path: str | Path) -> Recording:
    """Read a recording. Lines of unknown type are skipped; a malformed line raises RecordingError
    naming the line (a truncated last line -- a writer cut off -- is tolerated)."""
    path = Path(path)
    times: list[float] = []
    messages: list[tuple[str, Any]] = []
    snapshot: dict[str, Any] | None = None
    t = 0.0
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    for n, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            if n == len(lines):
                break
            raise RecordingError(f"{path}:{n}: not JSON ({exc.msg})") from None
        if not isinstance(obj, dict) or "type" not in obj:
            raise RecordingError(f"{path}:{n}: each line must be an object with a \"type\"")
        kind = obj["type"]
        if kind not in PLAYED_TYPES:
            continue
        data = {k: v for k, v in obj.items() if k != "type"}
        if kind == "config" and snapshot is None:
            snapshot = data
        try:
            record = decode(kind, data)
        except ValueError as exc:
            raise RecordingError(f"{path}:{n}: {exc}") from None
        stamp = obj.get("time")
        if kind == "request" and isinstance(obj.get("finish"), (int, float)) and obj["finish"] > 0:
            stamp = obj["finish"]
        if isinstance(stamp, (int, float)):
            t = max(t, float(stamp))
        times.append(t)
        messages.append((kind, record))
    return Recording(times, messages, snapshot)
