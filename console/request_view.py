"""Which request rows the table shows and in what order: sorting and filtering, as htop / nvitop do.

Pure: `arrange(rows, view)` takes the request-table snapshot (request id -> row, in the
engine's order: running, then waiting) and returns the rows to show, in order. The app keeps one
`RequestView`; keys and palette commands replace it.

A filter is words: `key=value` matches a field (`state=`, `tenant=`, `class=`, `id=`; a value may be
a prefix, `state=run` matches prefill and decode), a bare word matches any of them; every word must
match. Filtering by state understands `running` (prefill + decode) and `waiting` (waiting + preempted).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

# sort key -> its label; ascending age = the youngest first
SORT_KEYS: dict[str, str] = {
    "engine": "engine order",
    "state": "state",
    "tenant": "tenant",
    "class": "class",
    "ttft": "TTFT",
    "age": "age",
}
STATE_ORDER = {"prefill": 0, "decode": 1, "waiting": 2, "preempted": 3}
FILTER_FIELDS = {"state": "state", "tenant": "tenant", "class": "slo_class", "id": "request_id"}
STATE_GROUPS = {"running": ("prefill", "decode"), "waiting": ("waiting", "preempted")}


class FilterError(ValueError):
    """A filter that cannot be applied (an unknown field)."""


@dataclass(frozen=True)
class RequestView:
    sort: str = "engine"
    descending: bool = False
    filter: str = ""

    def describe(self) -> str:
        """What the table's subtitle says about the view ('' for the engine's order, unfiltered)."""
        parts = []
        if self.sort != "engine" or self.descending:
            parts.append(f"sort {SORT_KEYS[self.sort]} {'↓' if self.descending else '↑'}")
        if self.filter:
            parts.append(f"filter {self.filter}")
        return " · ".join(parts)


def next_sort(view: RequestView) -> RequestView:
    """The view sorted by the next key (engine → state → tenant → class → TTFT → age → engine);
    TTFT and age start with the greatest (the worst first), the others ascending."""
    keys = list(SORT_KEYS)
    key = keys[(keys.index(view.sort) + 1) % len(keys)]
    return RequestView(key, key in ("ttft", "age"), view.filter)


def parse_filter(text: str) -> list[tuple[str | None, str]]:
    """(field or None for any, lowercase value) per word; raises FilterError naming an unknown field."""
    terms: list[tuple[str | None, str]] = []
    for word in text.split():
        if "=" in word:
            key, _, value = word.partition("=")
            key = key.strip().lower()
            if key not in FILTER_FIELDS:
                raise FilterError(f"unknown filter field {key!r}: one of " + ", ".join(f"{k}=" for k in FILTER_FIELDS))
            terms.append((FILTER_FIELDS[key], value.strip().lower()))
        else:
            terms.append((None, word.lower()))
    return terms


def _matches(row: Mapping[str, Any], field: str | None, value: str) -> bool:
    if field is None:
        return any(_matches(row, f, value) for f in FILTER_FIELDS.values())
    have = str(row.get(field, "")).lower()
    if field == "state" and len(value) >= 3:
        for group, states in STATE_GROUPS.items():
            if group.startswith(value):  # state=run / state=waiting: the group
                return have in states
    return have.startswith(value) if field != "request_id" else value in have


def _number_key(field: str, sign: float) -> Callable[[Mapping[str, Any]], tuple]:
    """Rows without the value sort last in either direction."""
    def key(r: Mapping[str, Any]) -> tuple:
        v = r.get(field)
        return (1, 0.0) if not isinstance(v, (int, float)) else (0, sign * v)
    return key


def _sort_key(sort: str, descending: bool) -> Callable[[Mapping[str, Any]], tuple]:
    if sort == "state":
        return lambda r: (STATE_ORDER.get(str(r.get("state")), 9),)
    if sort in ("tenant", "class"):
        field = "tenant" if sort == "tenant" else "slo_class"
        return lambda r: (str(r.get(field, "")),)
    if sort == "ttft":  # no first token yet: last
        return _number_key("ttft", -1.0 if descending else 1.0)
    if sort == "age":  # the greatest age is the earliest arrival
        return _number_key("arrival", 1.0 if descending else -1.0)
    raise ValueError(f"unknown sort key {sort!r}: one of {', '.join(SORT_KEYS)}")


def arrange(rows: Mapping[str, Mapping[str, Any]], view: RequestView) -> dict[str, Mapping[str, Any]]:
    """The rows `view` shows, in its order (a stable sort: ties keep the engine's order)."""
    terms = parse_filter(view.filter) if view.filter else []
    items = [(rid, row) for rid, row in rows.items() if all(_matches(row, f, v) for f, v in terms)]
    if view.sort in ("ttft", "age"):
        key = _sort_key(view.sort, view.descending)
        items.sort(key=lambda item: key(item[1]))
    elif view.sort != "engine":
        key = _sort_key(view.sort, view.descending)
        items.sort(key=lambda item: key(item[1]), reverse=view.descending)
    elif view.descending:
        items.reverse()
    return dict(items)


def age(row: Mapping[str, Any], now: float | None) -> float | None:
    arrival = row.get("arrival")
    if now is None or not isinstance(arrival, (int, float)):
        return None
    return max(0.0, now - arrival)
