"""The one small interface the scheduler calls for ordering decisions.

The scheduler (engine/scheduler.py) owns the mechanism: token budgets, KV blocks, preemption.
A policy only answers three questions:

- in which order should waiting requests be admitted (`order_waiting`),
- which running request should give up its KV blocks when the pool runs dry (`pick_victim`),
- and, optionally, whether a waiting request deserves to preempt a running one (`should_preempt`).

It is told about service as tokens are computed (`on_tokens_computed`), which is how fair
scheduling keeps its counters. Policies are swapped live: a new instance takes the queues as
they are, so a policy keeps no queue of its own.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Sequence

from engine.config import ConfigError
from engine.request import Request


@dataclass(frozen=True)
class ParamSpec:
    """One policy parameter: its type, default and allowed range (inclusive)."""

    default: Any
    kind: type = float
    low: float | None = None
    high: float | None = None
    help: str = ""

    def check(self, policy: str, name: str, value: Any) -> Any:
        key = f"policy_params.{name}"
        if self.kind is dict:
            if not isinstance(value, Mapping):
                raise ConfigError(key, value, f"an object ({self.help})")
            return dict(value)
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if self.kind is int and not (numeric and float(value).is_integer()):
            raise ConfigError(key, value, f"an integer in [{self.low}, {self.high}] for policy {policy}")
        if self.kind is float and not numeric:
            raise ConfigError(key, value, f"a number in [{self.low}, {self.high}] for policy {policy}")
        if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            raise ConfigError(key, value, f"a number in [{self.low}, {self.high}] for policy {policy}")
        return self.kind(value)


class Policy:
    """Base class: FCFS behaviour; subclasses override what they decide differently."""

    name: ClassVar[str] = "base"
    PARAMS: ClassVar[dict[str, ParamSpec]] = {}

    def __init__(self, **params: Any):
        self.params = {k: spec.default for k, spec in self.PARAMS.items()}
        self.params.update(params)

    # -- ordering -------------------------------------------------------------------------------
    def order_waiting(self, waiting: Sequence[Request], now: float) -> list[Request]:
        """Admission order, best first. Default: arrival order (FCFS)."""
        return sorted(waiting, key=lambda r: r.admission_seq)

    def pick_victim(self, running: Sequence[Request], now: float) -> Request:
        """The running request to preempt when KV blocks run out. Default: the latest admitted."""
        return max(running, key=lambda r: r.admission_seq)

    def should_preempt(self, candidate: Request, running: Sequence[Request], now: float) -> Request | None:
        """A running request that `candidate` (waiting, unable to fit) may evict, or None."""
        return None

    # -- accounting -----------------------------------------------------------------------------
    def on_tokens_computed(self, request: Request, num_prompt_tokens: int, num_output_tokens: int) -> None:
        """Called after each iteration with the service a request just received."""

    def on_arrival(self, request: Request, waiting: Sequence[Request], running: Sequence[Request]) -> None:
        """Called when a request enters the waiting queue (fair scheduling lifts counters here)."""

    def snapshot(self) -> dict[str, Any]:
        """Policy state worth showing (e.g. per-tenant counters); JSON-serializable."""
        return {}
