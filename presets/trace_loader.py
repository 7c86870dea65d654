"""Request traces: arrival times and token counts read from a CSV or JSONL file.

`load_trace` turns a trace file into `(arrival_s, input_tokens, output_tokens)` tuples, arrival times
relative to the first kept row. Errors are `TraceError`s naming the file, the line and the column.
"""
from __future__ import annotations

import csv
import functools
import json
import math
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, TypeVar

TIME_UNITS = ("s", "ms", "datetime")
COLUMN_ROLES = ("time", "input", "output")

_DATETIME_RE = re.compile(
    r"^\s*(\d{4}-\d{2}-\d{2})[T ](\d{2}:\d{2}:\d{2})(?:[.,](\d+))?\s*(Z|[+-]\d{2}:?\d{2})?\s*$"
)


class TraceError(ValueError):
    """A trace that cannot be read; the message names the file, the line and the column."""


def trace_format(path: str | Path) -> str:
    """'jsonl' for .jsonl/.ndjson files, 'csv' for .csv files; TraceError otherwise."""
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".csv":
        return "csv"
    raise TraceError(f"{path}: unknown trace format {suffix!r}; use a .csv or .jsonl file")


def parse_datetime(text: str) -> float:
    """Seconds since the epoch for an ISO-like timestamp with any number of fractional digits.

    Azure's traces write `2023-11-16 18:15:46.6805900` (7 digits, more than `datetime` keeps);
    the fraction is added as a float so no digit is lost. Naive times are taken as UTC.
    """
    m = _DATETIME_RE.match(text)
    if not m:
        raise ValueError(f"not a datetime like 2023-11-16 18:15:46.6805900: {text!r}")
    date, clock, frac, tz = m.groups()
    base = datetime.strptime(f"{date} {clock}", "%Y-%m-%d %H:%M:%S")
    if tz is None or tz == "Z":
        base = base.replace(tzinfo=timezone.utc)
    else:
        sign = 1 if tz[0] == "+" else -1
        hh, mm = int(tz[1:3]), int(tz[-2:])
        base = base.replace(tzinfo=timezone(sign * timedelta(hours=hh, minutes=mm)))
    return base.timestamp() + (float("0." + frac) if frac else 0.0)


T = TypeVar("T")


def per_file_version(parse: Callable[..., T]) -> Callable[..., T]:
    """`parse(path, *args)` memoized by the path, the file's modification time and size and the args
    (the last 8 calls): one replay's early check, its scaling and its workload parse a trace once, and an
    edited file is parsed again. `parse` returns something immutable (it is shared); a file that cannot
    be stat'ed is parsed each time (so that its error is raised)."""
    cached = functools.lru_cache(maxsize=8)(lambda path, version, *args: parse(Path(path), *args))

    def call(path: Path, *args: Any) -> T:
        try:
            st = Path(path).stat()
        except OSError:
            return parse(Path(path), *args)
        return cached(str(path), (st.st_mtime_ns, st.st_size), *args)

    return call


def _rows(path: Path) -> Iterator[tuple[int, Mapping[str, Any]]]:
    """Yield (line number, record) for every data row of a CSV or JSONL file."""
    fmt = trace_format(path)
    try:
        fh = open(path, newline="" if fmt == "csv" else None, encoding="utf-8-sig")
    except OSError as e:
        raise TraceError(f"{path}: cannot open trace file: {e.strerror or e}") from None
    with fh:
        if fmt == "csv":
            reader = csv.DictReader(fh)
            if reader.fieldnames is None:
                raise TraceError(f"{path}: line 1: empty CSV file, expected a header row")
            for record in reader:
                yield reader.line_num, record
        else:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise TraceError(f"{path}: line {lineno}: not valid JSON: {e.msg}") from None
                if not isinstance(record, dict):
                    raise TraceError(f"{path}: line {lineno}: expected a JSON object per line")
                yield lineno, record


def trace_columns(path: str | Path) -> list[str]:
    """The column names of a trace: the CSV header, or the keys of the first JSONL record."""
    path = Path(path)
    for _, record in _rows(path):
        return list(record.keys())
    if trace_format(path) == "csv":
        with open(path, newline="", encoding="utf-8-sig") as fh:
            header = next(csv.reader(fh), None)
        return list(header or [])
    return []


def _get(path: Path, lineno: int, record: Mapping[str, Any], column: str) -> Any:
    value = record.get(column)
    if value is None or (isinstance(value, str) and not value.strip()):
        if column not in record:
            have = ", ".join(map(str, record.keys()))
            raise TraceError(f"{path}: line {lineno}: missing column {column!r} (the row has: {have})")
        raise TraceError(f"{path}: line {lineno}, column {column!r}: empty value")
    return value


def _parse_time(path: Path, lineno: int, column: str, value: Any, unit: str) -> float:
    try:
        if unit == "datetime":
            if not isinstance(value, str):
                raise ValueError("expected a datetime string")
            return parse_datetime(value)
        if isinstance(value, bool):
            raise ValueError("a boolean is not a time")
        t = float(value)
        if not math.isfinite(t):
            raise ValueError("not finite")
        return t / 1000.0 if unit == "ms" else t
    except ValueError:
        what = "a datetime like 2023-11-16 18:15:46.6805900" if unit == "datetime" else f"a number ({unit})"
        raise TraceError(f"{path}: line {lineno}, column {column!r}: cannot parse {value!r} as {what}") from None


def _parse_tokens(path: Path, lineno: int, column: str, value: Any) -> int:
    try:
        if isinstance(value, bool):
            raise ValueError
        n = float(value)
        if not math.isfinite(n) or n != int(n) or n < 0:
            raise ValueError
        return int(n)
    except (ValueError, TypeError):
        raise TraceError(
            f"{path}: line {lineno}, column {column!r}: cannot parse {value!r} as a token count (an integer >= 0)"
        ) from None


@per_file_version
def _sorted_rows(path: Path, t_col: str, in_col: str, out_col: str, time_unit: str
                 ) -> tuple[tuple[float, int, int], ...]:
    """Every row's (time in the file's clock, input tokens, output tokens), by time (ties in file order)."""
    parsed: list[tuple[float, int, int]] = []
    for lineno, record in _rows(path):
        t = _parse_time(path, lineno, t_col, _get(path, lineno, record, t_col), time_unit)
        n_in = _parse_tokens(path, lineno, in_col, _get(path, lineno, record, in_col))
        n_out = _parse_tokens(path, lineno, out_col, _get(path, lineno, record, out_col))
        parsed.append((t, n_in, n_out))
    parsed.sort(key=lambda row: row[0])  # stable: ties keep file order
    return tuple(parsed)


def load_trace(
    path: str | Path,
    columns: Mapping[str, str],
    time_unit: str = "s",
    time_scale: float = 1.0,
    length_scale: float = 1.0,
    start: float = 0.0,
    limit: int | None = None,
) -> list[tuple[float, int, int]]:
    """Read a trace into `(arrival_s, input_tokens, output_tokens)` tuples sorted by arrival.

    `columns` maps `time`, `input`, `output` to the file's column names. `start` skips rows earlier
    than that many seconds after the trace's first row (trace time, before scaling); `limit` keeps
    at most that many rows. Arrivals are relative to the first kept row, inter-arrival gaps are
    multiplied by `time_scale`, token counts by `length_scale` (rounded, at least 1).
    """
    path = Path(path)
    missing = [role for role in COLUMN_ROLES if role not in columns]
    if missing:
        raise TraceError(f"{path}: columns must name {', '.join(COLUMN_ROLES)}; missing {', '.join(missing)}")
    if time_unit not in TIME_UNITS:
        raise TraceError(f"{path}: time_unit {time_unit!r} is not one of {', '.join(TIME_UNITS)}")
    if not time_scale > 0 or not length_scale > 0:
        raise TraceError(f"{path}: time_scale and length_scale must be > 0")
    if start < 0 or (limit is not None and limit < 1):
        raise TraceError(f"{path}: start must be >= 0 and limit >= 1")
    parsed = _sorted_rows(path, columns["time"], columns["input"], columns["output"], time_unit)
    if not parsed:
        return []
    t_first = parsed[0][0]
    kept = [row for row in parsed if row[0] - t_first >= start]
    if limit is not None:
        kept = kept[:limit]
    if not kept:
        return []
    t0 = kept[0][0]

    def scale(n: int) -> int:
        return max(1, round(n * length_scale))

    return [((t - t0) * time_scale, scale(n_in), scale(n_out)) for t, n_in, n_out in kept]
