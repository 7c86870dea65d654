"""The one small interface the scheduler calls for ordering decisions.

The scheduler (engine/scheduler.py) owns the mechanism: token budgets, KV blocks, preemption.
A policy only answers three questions:

- in which order should waiting requests be admitted (`order_waiting`),
- which running request should give up its KV blocks when the pool runs dry (`pick_victim`),
- and, optionally, whether a waiting request deserves to preempt a running one (`should_preempt`;
  the scheduler only asks policies that override it, when the best waiting request finds the
  seats or the KV blocks short).

It is told about service as tokens are computed (`on_tokens_computed`), which is how fair
scheduling keeps its counters, about prompt tokens served from the prefix cache at admission
(`on_prefix_hit`), and about arrivals (`on_arrival`). It may ask how many prompt tokens of a waiting
request the prefix cache holds now (`cached_tokens`; 0 with prefix caching off): that changes as the
cache fills and evicts, so it must not be memoized as a fixed key. Policies are swapped live: a new
instance takes the queues as they are, so a policy keeps no queue of its own; `take_over` lets it
carry state over from the instance it replaces.

Policies are called from the engine's stepping thread only (order_waiting may update incremental
state); other threads read `snapshot()`.

Cost: the scheduler asks for `order_waiting` at most once per iteration (more only when the
waiting queue changed in between, e.g. after a preemption) and not at all when nothing could be
admitted. Keys that stay fixed while a request waits can be memoized with `WaitingKeys`.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from itertools import compress
from operator import attrgetter, ne
from typing import Any, Callable, ClassVar, Collection, Mapping, Sequence

from batchdeck.engine.config import ConfigError
from batchdeck.engine.request import Request

ADMISSION_SEQ = attrgetter("admission_seq")
_NUM_PREEMPTIONS = attrgetter("num_preemptions")


def _fmt(x: float | None, open_end: str) -> str:
    if x is None or (isinstance(x, float) and math.isinf(x)):
        return open_end
    return f"{x:g}" if isinstance(x, float) else str(x)


@dataclass(frozen=True)
class ParamSpec:
    """One policy parameter: its type, default and allowed range (inclusive).

    kind is int, float, bool, str (then `choices` lists the allowed values) or dict (then, when
    `low`/`high` are given, every value must be a number in that range and every key a string).
    """

    default: Any
    kind: type = float
    low: float | None = None
    high: float | None = None
    help: str = ""
    choices: Collection[str] | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ParamSpec":
        """A spec as `describe_policies` publishes it (an engine's config bounds carry them)."""
        kinds = {k.__name__: k for k in (int, float, bool, str, dict)}  # describe_policies writes kind.__name__
        return cls(default=d.get("default"), kind=kinds.get(str(d.get("kind")), float), low=d.get("low"),
                   high=d.get("high"), help=str(d.get("help") or ""), choices=d.get("choices"))

    def range_text(self) -> str:
        return f"[{_fmt(self.low, '-inf')}, {_fmt(self.high, 'inf')}]"

    def check(self, policy: str, name: str, value: Any) -> Any:
        key = f"policy_params.{name}"
        if self.kind is dict:
            if not isinstance(value, Mapping):
                raise ConfigError(key, value, f"an object ({self.help}) for policy {policy}")
            out = {}
            for k, v in value.items():
                if not isinstance(k, str):
                    raise ConfigError(key, value, f"an object with string keys ({self.help}) for policy {policy}")
                if self.low is not None or self.high is not None:
                    out[k] = self._number(policy, f"{key}.{k}", v, float)
                else:
                    out[k] = v
            return out
        if self.kind is bool:
            if not isinstance(value, bool):
                raise ConfigError(key, value, f"true or false for policy {policy}")
            return value
        if self.kind is str:
            if not isinstance(value, str) or (self.choices is not None and value not in self.choices):
                allowed = "one of " + ", ".join(self.choices) if self.choices is not None else "a string"
                raise ConfigError(key, value, f"{allowed} for policy {policy}")
            return value
        return self._number(policy, key, value, self.kind)

    def _number(self, policy: str, key: str, value: Any, kind: type) -> Any:
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        what = "an integer" if kind is int else "a number"
        if not numeric or (isinstance(value, float) and (math.isnan(value) or (kind is int and not value.is_integer()))):
            raise ConfigError(key, value, f"{what} in {self.range_text()} for policy {policy}")
        if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            raise ConfigError(key, value, f"{what} in {self.range_text()} for policy {policy}")
        try:
            return kind(value)
        except OverflowError:  # an integer beyond the float range
            raise ConfigError(key, value, f"{what} in {self.range_text()} for policy {policy}") from None


def check_policy_params(policy: str, specs_by_policy: Mapping[str, Mapping[str, ParamSpec]],
                        params: Mapping[str, Any]) -> dict[str, Any]:
    """`params` of `policy` checked against its specs in `specs_by_policy` (policy name -> parameter ->
    ParamSpec), with the defaults of those not given; ConfigError naming the policy or the key, the value
    and what is allowed. What the engine checks against its registry, and a console against the specs
    an engine published."""
    if policy not in specs_by_policy:
        raise ConfigError("policy", policy, "one of " + ", ".join(specs_by_policy))
    specs = specs_by_policy[policy]
    out = {k: spec.default for k, spec in specs.items()}
    for key, value in dict(params).items():
        if key not in specs:
            allowed = ", ".join(specs) or "none"
            raise ConfigError(f"policy_params.{key}", value, f"a parameter of policy {policy}: {allowed}")
        out[key] = specs[key].check(policy, key, value)
    return out


class Policy:
    """Base class: FCFS behaviour; subclasses override what they decide differently."""

    name: ClassVar[str] = "base"
    PARAMS: ClassVar[dict[str, ParamSpec]] = {}
    # The scheduler binds the block manager's look-up here (engine/block_manager.py cached_prefix_tokens).
    prefix_lookup: Callable[[Request], int] = staticmethod(lambda request: 0)

    def __init__(self, **params: Any):
        self.params = {k: spec.default for k, spec in self.PARAMS.items()}
        for key, value in params.items():
            if key not in self.PARAMS:
                allowed = ", ".join(self.PARAMS) or "none"
                raise ConfigError(f"policy_params.{key}", value, f"a parameter of policy {self.name}: {allowed}")
            self.params[key] = self.PARAMS[key].check(self.name, key, value)

    # -- ordering -------------------------------------------------------------------------------
    def order_waiting(self, waiting: Sequence[Request], now: float) -> list[Request]:
        """Admission order, best first. Default: arrival order (FCFS)."""
        return sorted(waiting, key=ADMISSION_SEQ)

    def pick_victim(self, running: Sequence[Request], now: float) -> Request:
        """The running request to preempt when KV blocks run out. Default: the latest admitted."""
        return max(running, key=ADMISSION_SEQ)

    def should_preempt(self, candidate: Request, running: Sequence[Request], now: float) -> Request | None:
        """A running request that `candidate` (waiting, unable to fit) may evict, or None."""
        return None

    def cached_tokens(self, request: Request) -> int:
        """Prompt tokens of waiting `request` the prefix cache holds now (a block multiple; 0 when off)."""
        return self.prefix_lookup(request)

    # -- accounting -----------------------------------------------------------------------------
    def on_prefix_hit(self, request: Request, num_cached_tokens: int) -> None:
        """Called when `request` is admitted with its first `num_cached_tokens` served from the cache
        (they are never reported to `on_tokens_computed`)."""

    def on_tokens_computed(self, request: Request, num_prompt_tokens: int, num_output_tokens: int) -> None:
        """Called after each iteration with the service a request just received."""

    def on_arrival(self, request: Request, waiting: Sequence[Request], running: Sequence[Request]) -> None:
        """Called when a request enters the waiting queue (fair scheduling lifts counters here)."""

    def take_over(self, previous: "Policy", waiting: Sequence[Request], running: Sequence[Request]) -> None:
        """Called on a live swap, before this policy replaces `previous` (state may be carried over)."""

    def snapshot(self) -> dict[str, Any]:
        """Policy state worth showing (e.g. per-tenant counters); JSON-serializable."""
        return {}


class WaitingKeys:
    """Memoized sort keys, and the sorted order kept up to date incrementally, for keys that stay
    fixed while a request waits.

    `compute(request) -> key` must depend only on what cannot change while a request waits
    (prompt, outputs so far, first-token time, arrival, class, priority, sampling) and should end
    with `admission_seq` so that keys are unique. A waiting request's state changes only by
    running, and it comes back to `waiting` only by being preempted, which increments its
    `num_preemptions`: each memo entry is stamped with that count, so a stale key is never used.
    With `static=True` (keys that never change, e.g. priority) the stamps are not even checked.

    Cost per call: a few C-level passes over `waiting` (stamps, membership), the Python-level
    `compute` only for requests that are new or came back, and the previous order patched (remove
    those that left, insort the new) instead of an O(n log n) sort through a Python key function.
    """

    def __init__(self, compute: Callable[[Request], Any], static: bool = False):
        self.compute = compute
        self.static = static
        self.stamps: dict[Request, int] = {}  # Request hashes by identity (eq=False)
        self.keys: dict[Request, Any] = {}
        self.changed: list[Request] = []  # requests whose key the last refresh() (re)computed
        self._order: list[Request] | None = None  # the last result, sorted by key
        self._members: set[Request] = set()

    def key(self, r: Request) -> Any:
        stamp = r.num_preemptions
        if self.stamps.get(r) != stamp:
            self.stamps[r] = stamp
            self.keys[r] = self.compute(r)
        return self.keys[r]

    def refresh(self, waiting: Sequence[Request], members: set[Request] | None = None) -> list[Request]:
        """Give every request of `waiting` a current key; return those whose key was (re)computed."""
        stamps, keys, compute = self.stamps, self.keys, self.compute
        if len(stamps) > 2 * len(waiting) + 256:
            live = members if members is not None else set(waiting)
            self.stamps = stamps = {r: v for r, v in stamps.items() if r in live}
            self.keys = keys = {r: v for r, v in keys.items() if r in live}
        changed = []
        if self.static:
            for r in (members if members is not None else set(waiting)) - keys.keys():
                stamps[r] = r.num_preemptions
                keys[r] = compute(r)
                changed.append(r)
        else:
            current = list(map(_NUM_PREEMPTIONS, waiting))
            known = list(map(stamps.get, waiting))
            if current != known:
                for r, stamp in compress(zip(waiting, current), map(ne, current, known)):
                    stamps[r] = stamp
                    keys[r] = compute(r)
                    changed.append(r)
        self.changed = changed
        return changed

    def sort(self, waiting: Sequence[Request]) -> list[Request]:
        """`waiting` sorted by key, as a new list."""
        members = set(waiting)
        recomputed = self.refresh(waiting, members)
        order, prev = self._order, self._members
        key = self.keys.__getitem__
        if order is not None:
            moved = prev.intersection(recomputed)  # stayed (or came back) with a new key
            insert = (members - prev) | moved
            drop = (prev - members) | moved
            if 4 * len(insert) > len(waiting):
                order = None
            else:
                if len(drop) > 8:
                    order = [r for r in order if r not in drop]
                else:
                    for r in drop:
                        order.remove(r)
                for r in sorted(insert, key=key):
                    bisect.insort(order, r, key=key)
        if order is None:
            order = sorted(waiting, key=key)
        self._order = order
        self._members = members
        return list(order)
