"""Strict priority: a lower number is served first (as in vLLM); requests without one have 0.

Optimizes: latency of important requests. Waiting requests are admitted by (priority, arrival
order). When the best waiting request finds the seats (`max_num_seqs`) or the KV blocks short, it
preempts running requests of strictly lower priority (larger number), the lowest priority and
latest admitted first, until it fits. The KV victim when blocks run out during an iteration is
chosen the same way.

Costs: requests of lower priority can starve for as long as higher-priority work keeps coming
(there is no aging), and each preemption recomputes the victim's tokens. Ordering is O(n log n)
per iteration; the preemption check is O(running) per iteration while the seats
or blocks are short. Parameters: `preempt` (default true): allow evicting lower-priority running
requests for a waiting one; with false, priority only orders admission.
"""
from __future__ import annotations

from operator import attrgetter
from typing import Any, Sequence

from batchdeck.engine.request import Request
from batchdeck.policies.base import ParamSpec, Policy, WaitingKeys

PRIORITY_SEQ = attrgetter("priority", "admission_seq")


class PriorityPolicy(Policy):
    name = "priority"
    PARAMS = {
        "preempt": ParamSpec(True, bool, help="evict lower-priority running requests for a waiting one"),
    }

    def __init__(self, **params: Any):
        super().__init__(**params)
        self.preempt: bool = self.params["preempt"]
        self._keys = WaitingKeys(PRIORITY_SEQ, static=True)  # (priority, admission_seq) never changes

    def order_waiting(self, waiting: Sequence[Request], now: float) -> list[Request]:
        return self._keys.sort(waiting)

    def pick_victim(self, running: Sequence[Request], now: float) -> Request:
        """Lowest priority (largest number), latest admitted among equals."""
        return max(running, key=PRIORITY_SEQ)

    def should_preempt(self, candidate: Request, running: Sequence[Request], now: float) -> Request | None:
        if not self.preempt or not running:
            return None
        victim = max(running, key=PRIORITY_SEQ)
        return victim if victim.priority > candidate.priority else None
