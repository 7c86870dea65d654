"""Per-tenant fairness with the Virtual Token Counter (VTC; Sheng et al., "Fairness in Serving
Large Language Models", OSDI'24).

Optimizes: fair sharing of service between tenants (requests without a tenant belong to
`default`). Every tenant has a counter of the service it received, in weighted tokens:
`input_weight` per prompt token computed (times `cached_weight` per prompt token served from the
prefix cache, which costs no prefill compute) plus `output_weight` per output token generated, divided
by the tenant's weight (`tenant_weights`, default 1: a tenant of weight 2 is entitled to twice the
service). The least-served backlogged tenant is served first: waiting requests are ordered by
their tenant's counter, first come, first served within a tenant, and admitting a request
provisionally charges its tenant with the request's prompt (and first output token), so one
iteration's admissions interleave tenants as VTC's pick-the-minimum loop does (the provisional
charge counts the prompt's cached prefix as of when the request joined the queue at `cached_weight`). When a tenant
becomes newly active (a request arrives while it has nothing waiting or running), its counter is
lifted to the minimum counter of the active tenants (to the counter of the last tenant served
when none is active), so idling does not bank credit. The policy only orders; it never holds
capacity back (work-conserving), and its KV victim is the latest admitted request of the
most-served tenant among the running ones.

Costs: throughput and latency of heavy tenants, which wait while lighter ones have work; requests
are not ordered by size or deadline. Recomputation after a preemption is not charged: a preempted
request's prompt counts as computed before its first preemption, its new output tokens count as
they come. Per iteration: per-tenant FCFS queues patched with the arrivals and departures since the
last call, then one sort of n floats to merge them; O(1) per computed chunk; O(n) per arrival
(finding the active tenants).

Live swap: counters live in the policy instance. Changing only this policy's parameters carries
the counters over (`take_over`); switching from another policy starts every counter at zero.

Parameters:
  input_weight    cost of one prompt token, default 1.0, in [0, 1000]
  output_weight   cost of one output token, default 2.0, in [0, 1000]
  tenant_weights  {tenant: weight} share weights, each in [0.001, 1000]; unlisted tenants weigh 1
  cached_weight   cost of a prompt token served from the prefix cache, as a share of input_weight,
                  default 0.1, in [0, 1] (it takes KV memory and attention reads, not prefill compute)
"""
from __future__ import annotations

import bisect
from itertools import accumulate
from operator import attrgetter
from typing import Any, Sequence

from batchdeck.engine.request import Request
from batchdeck.policies.base import ADMISSION_SEQ, ParamSpec, Policy

PROMPT = attrgetter("prompt_token_ids")
TENANT = attrgetter("tenant")


class FairPolicy(Policy):
    name = "fair"
    PARAMS = {
        "input_weight": ParamSpec(1.0, float, 0.0, 1000.0, "cost of a prompt token"),
        "output_weight": ParamSpec(2.0, float, 0.0, 1000.0, "cost of an output token"),
        "tenant_weights": ParamSpec({}, dict, 0.001, 1000.0, "{tenant: share weight}, default weight 1"),
        "cached_weight": ParamSpec(0.1, float, 0.0, 1.0, "cost of a cached prompt token, share of input_weight"),
    }

    def __init__(self, **params: Any):
        super().__init__(**params)
        self.input_weight: float = self.params["input_weight"]
        self.output_weight: float = self.params["output_weight"]
        self.tenant_weights: dict[str, float] = dict(self.params["tenant_weights"])
        self.cached_weight: float = self.params["cached_weight"]
        self.counters: dict[str, float] = {}
        self._last_served = 0.0  # counter of the tenant served last (the floor when nobody is active)
        self._queues: dict[str, list[Request]] = {}  # waiting requests per tenant, FCFS
        self._costs: dict[str, list[float]] = {}  # their provisional costs, in the same order
        self._members: set[Request] = set()  # what `waiting` held at the last order_waiting

    def weight(self, tenant: str) -> float:
        return self.tenant_weights.get(tenant, 1.0)

    def counter(self, tenant: str) -> float:
        return self.counters.get(tenant, 0.0)

    # -- ordering -------------------------------------------------------------------------------
    def _cost(self, r: Request) -> float:
        """Provisional charge for admitting `r`: its prompt (its cached prefix at `cached_weight`) and
        its first output token."""
        cached = self.prefix_lookup(r) if not r.num_preemptions else 0
        prompt = len(r.prompt_token_ids) - min(cached, len(r.prompt_token_ids)) * (1.0 - self.cached_weight)
        return (self.input_weight * prompt + self.output_weight) / self.weight(r.tenant)

    def _sync(self, waiting: Sequence[Request]) -> None:
        """Bring the per-tenant FCFS queues (and their provisional costs) in line with `waiting`.

        A request's tenant, admission order and cost never change, so only arrivals and departures
        since the last call are applied (a full rebuild when many changed).
        """
        members = set(waiting)
        prev = self._members
        gone, new = prev - members, members - prev
        queues, costs = self._queues, self._costs
        if 2 * (len(gone) + len(new)) > len(members):
            queues.clear()
            costs.clear()
            for r in sorted(waiting, key=ADMISSION_SEQ):
                q = queues.get(r.tenant)
                if q is None:
                    queues[r.tenant], costs[r.tenant] = [r], [self._cost(r)]
                else:
                    q.append(r)
                    costs[r.tenant].append(self._cost(r))
        else:
            for r in gone:
                q = queues[r.tenant]
                i = q.index(r)
                del q[i]
                del costs[r.tenant][i]
                if not q:
                    del queues[r.tenant], costs[r.tenant]
            for r in sorted(new, key=ADMISSION_SEQ):
                q = queues.get(r.tenant)
                if q is None:
                    queues[r.tenant], costs[r.tenant] = [r], [self._cost(r)]
                else:
                    i = bisect.bisect(q, r.admission_seq, key=ADMISSION_SEQ)
                    q.insert(i, r)
                    costs[r.tenant].insert(i, self._cost(r))
        self._members = members

    def order_waiting(self, waiting: Sequence[Request], now: float) -> list[Request]:
        self._sync(waiting)
        queues = self._queues
        if len(queues) <= 1:
            return list(next(iter(queues.values()), []))
        # A tenant's k-th request (FCFS) starts at the tenant's counter plus the provisional costs of
        # the k before it; merging by start is VTC's "serve the minimum, charge it" loop, unrolled.
        starts: list[float] = []
        reqs: list[Request] = []
        counters, costs = self.counters, self._costs
        for tenant in sorted(queues, key=lambda t: queues[t][0].admission_seq):
            starts.extend(accumulate(costs[tenant][:-1], initial=counters.get(tenant, 0.0)))
            reqs.extend(queues[tenant])
        idx = sorted(range(len(reqs)), key=starts.__getitem__)  # stable: ties go to the older head
        return list(map(reqs.__getitem__, idx))

    def pick_victim(self, running: Sequence[Request], now: float) -> Request:
        """The latest admitted request of the most-served tenant."""
        counters = self.counters
        return max(running, key=lambda r: (counters.get(r.tenant, 0.0), r.admission_seq))

    # -- accounting -----------------------------------------------------------------------------
    def on_tokens_computed(self, request: Request, num_prompt_tokens: int, num_output_tokens: int) -> None:
        if num_prompt_tokens and not request.num_preemptions:  # recomputation is not charged
            charge = self.input_weight * num_prompt_tokens + self.output_weight * num_output_tokens
        elif num_output_tokens:
            charge = self.output_weight * num_output_tokens
        else:
            return
        t = request.tenant
        w = self.tenant_weights.get(t)
        value = self.counters.get(t, 0.0) + (charge if w is None else charge / w)
        self.counters[t] = value
        self._last_served = value

    def on_prefix_hit(self, request: Request, num_cached_tokens: int) -> None:
        if request.num_preemptions or not self.cached_weight:
            return  # a readmission's cached prompt was charged before its preemption
        charge = self.input_weight * self.cached_weight * min(num_cached_tokens, request.num_prompt_tokens)
        t = request.tenant
        value = self.counters.get(t, 0.0) + charge / self.weight(t)
        self.counters[t] = value
        self._last_served = value

    def on_arrival(self, request: Request, waiting: Sequence[Request], running: Sequence[Request]) -> None:
        t = request.tenant
        if t in map(TENANT, waiting) or t in map(TENANT, running):
            return  # already active: its counter stands
        active = set(map(TENANT, waiting))
        active.update(map(TENANT, running))
        counters = self.counters
        floor = min((counters.get(a, 0.0) for a in active), default=self._last_served)
        counters[t] = max(counters.get(t, 0.0), floor)

    def take_over(self, previous: Policy, waiting: Sequence[Request], running: Sequence[Request]) -> None:
        if isinstance(previous, FairPolicy):
            self.counters = dict(previous.counters)
            self._last_served = previous._last_served

    def snapshot(self) -> dict[str, Any]:
        counters = dict(self.counters)  # a copy: the engine thread may be charging meanwhile
        return {"counters": {t: round(v, 3) for t, v in sorted(counters.items())},
                "tenant_weights": dict(self.tenant_weights)}
