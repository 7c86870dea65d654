"""SLO-aware scheduling: least slack first.

Optimizes: the share of requests that meet their service-level targets. Every request has an
`slo_class` (realtime, interactive, batch; requests without one are interactive) whose class has a
TTFT and a TPOT target. A request's next deadline is

    not started yet:  arrival + TTFT target                       (its first token)
    started:          first token time + TPOT target * outputs    (its next token, on the TPOT pace)

and its slack is deadline - now. Waiting requests are admitted least slack first (earliest
deadline first: slack and deadline order agree at a given `now`). With `demote_late` (default on),
a request that has not started and whose TTFT deadline has already passed cannot meet its SLO any
more, so it goes after every request that still can (in deadline order among themselves); this is
what keeps an overloaded server from missing everybody's deadline one after the other. The KV
victim is the running request with the most slack (latest admitted among equals). With `preempt`
(default on), the least-slack waiting request that finds the seats or the KV blocks short evicts
the running request with the most slack, if that one's deadline is more than `preempt_margin_s`
later than its own and the waiting one can still make its deadline.

With `prefill_token_s` > 0 a waiting request's admission deadline is moved earlier by the time its
prompt takes to compute: prefill_token_s per prompt token not served from the prefix cache (cached
tokens cost nothing), so a long cold prompt starts sooner than a warm one due at the same time.

Costs: fairness within a class and throughput: batch requests wait while tighter classes have
work, and with `demote_late` a request that missed its TTFT can wait long under sustained overload
(it still goes first once the load allows). Preemption recomputes the victim's tokens. Ordering is
O(n log n) on memoized deadlines per iteration; victim choice is O(running).

Parameters (seconds; defaults from engine/slo.py):
  realtime_ttft 0.5, realtime_tpot 0.05, interactive_ttft 2.0, interactive_tpot 0.15,
  batch_ttft 10.0, batch_tpot 1.0   class targets, each in [0.001, 86400]
  demote_late      true: a request past its TTFT deadline goes after those that can still make it
  preempt          true: a waiting request may evict the running request with the most slack
  preempt_margin_s 5.0 in [0, 86400]: how much later the victim's deadline must be
  prefill_token_s  0 in [0, 1]: seconds one computed prompt token takes (0: ignore prefill time;
                   > 0: orders by deadline - prefill time of the uncached prompt, one cache look-up
                   per waiting request and a full sort per iteration)
"""
from __future__ import annotations

import bisect
from typing import Any, Sequence

from batchdeck.engine.request import SLO_CLASSES, Request
from batchdeck.engine.slo import DEFAULT_SLO_TARGETS, SLOTarget
from batchdeck.policies.base import ParamSpec, Policy, WaitingKeys


def _target_params() -> dict[str, ParamSpec]:
    specs = {}
    for cls in SLO_CLASSES:
        t = DEFAULT_SLO_TARGETS[cls]
        specs[f"{cls}_ttft"] = ParamSpec(t.ttft, float, 0.001, 86400.0, f"TTFT target of class {cls} (s)")
        specs[f"{cls}_tpot"] = ParamSpec(t.tpot, float, 0.001, 86400.0, f"TPOT target of class {cls} (s/token)")
    return specs


class SLOPolicy(Policy):
    name = "slo"
    PARAMS = {
        **_target_params(),
        "demote_late": ParamSpec(True, bool, help="requests past their TTFT deadline go last"),
        "preempt": ParamSpec(True, bool, help="a waiting request may evict the running one with the most slack"),
        "preempt_margin_s": ParamSpec(5.0, float, 0.0, 86400.0, "victim deadline must be this much later (s)"),
        "prefill_token_s": ParamSpec(0.0, float, 0.0, 1.0, "seconds per computed prompt token (cached ones are free)"),
    }

    def __init__(self, **params: Any):
        super().__init__(**params)
        p = self.params
        self.targets = {cls: SLOTarget(ttft=p[f"{cls}_ttft"], tpot=p[f"{cls}_tpot"]) for cls in SLO_CLASSES}
        self.demote_late: bool = p["demote_late"]
        self.preempt: bool = p["preempt"]
        self.margin: float = p["preempt_margin_s"]
        self.prefill_token_s: float = p["prefill_token_s"]
        self._by_class = {cls: (t.ttft, t.tpot) for cls, t in self.targets.items()}
        self._default = self._by_class["interactive"]
        self._keys = WaitingKeys(lambda r: (self.deadline(r), r.admission_seq))

    def _deadline_of(self, r: Request) -> float:
        return self._keys.keys[r][0]

    def deadline(self, r: Request) -> float:
        """When `r`'s next token is due: its first by the TTFT target, later ones on the TPOT pace."""
        ttft, tpot = self._by_class.get(r.slo_class, self._default)
        out = r.output_token_ids
        if not out or r.first_token_time is None:
            return r.arrival_time + ttft
        return r.first_token_time + tpot * len(out)

    def slack(self, r: Request, now: float) -> float:
        return self.deadline(r) - now

    def _hopeless(self, r: Request, now: float) -> bool:
        """Not started and past its TTFT deadline: its SLO cannot be met any more."""
        return not r.output_token_ids and self.deadline(r) < now

    def start_by(self, r: Request) -> float:
        """The deadline less the time to compute what the cache does not hold of the prompt."""
        pending = len(r.token_ids) - r.num_computed_tokens
        return self.deadline(r) - self.prefill_token_s * max(0, pending - self.prefix_lookup(r))

    def order_waiting(self, waiting: Sequence[Request], now: float) -> list[Request]:
        if self.prefill_token_s:
            return self._order_by_start(waiting, now)
        ordered = self._keys.sort(waiting)  # earliest deadline (least slack) first
        if not self.demote_late or not ordered:
            return ordered
        late = bisect.bisect_left(ordered, now, key=self._deadline_of)  # deadlines before now: a prefix
        if late == 0:
            return ordered
        head = ordered[:late]
        hopeless = [r for r in head if not r.output_token_ids]
        if not hopeless:
            return ordered
        return [r for r in head if r.output_token_ids] + ordered[late:] + hopeless

    def _order_by_start(self, waiting: Sequence[Request], now: float) -> list[Request]:
        start_by = self.start_by
        ordered = sorted(waiting, key=lambda r: (start_by(r), r.admission_seq))
        if not self.demote_late:
            return ordered
        hopeless = [r for r in ordered if self._hopeless(r, now)]
        if not hopeless:
            return ordered
        gone = set(map(id, hopeless))
        return [r for r in ordered if id(r) not in gone] + hopeless

    def pick_victim(self, running: Sequence[Request], now: float) -> Request:
        """The running request with the most slack (latest admitted among equals)."""
        deadline = self.deadline
        return max(running, key=lambda r: (deadline(r), r.admission_seq))

    def should_preempt(self, candidate: Request, running: Sequence[Request], now: float) -> Request | None:
        if not self.preempt or not running:
            return None
        if self._hopeless(candidate, now):
            return None  # it cannot make its TTFT any more: evicting someone would not help it
        cand = self.deadline(candidate)
        victim = self.pick_victim(running, now)
        if self.deadline(victim) - cand > self.margin:
            return victim
        return None

    def snapshot(self) -> dict[str, Any]:
        return {"targets": {c: {"ttft": t.ttft, "tpot": t.tpot} for c, t in self.targets.items()}}
