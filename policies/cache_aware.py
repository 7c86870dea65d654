"""Cache-aware: longest cached prefix first (SGLang's longest-prefix-match), with aging.

Optimizes: prefill work and time to first token when requests share prefixes (multi-turn chat,
shared system prompts, few-shot templates). Waiting requests are admitted in order of how much of
their prompt the prefix cache holds now: `metric=tokens` (SGLang's lpm) ranks by cached tokens,
`metric=share` by the cached share of the prompt. A warm request is admitted while its blocks are
still cached, before other admissions evict them, and each admission computes the fewest new
tokens, so more requests fit each iteration's token budget; ties (nothing cached, say) go first
come, first served. With prefix caching off every request has 0 cached tokens and this is FCFS.

Costs: fairness to cache-cold requests. A request with nothing cached waits behind every warm
one, and a stream of warm follow-ups could hold it back forever; the guard is aging, as in `sjf`:
a request that has waited `aging_s` seconds (since arrival) goes ahead of every younger one, first
come, first served among the aged. Per iteration: one cache look-up per waiting request (a dict
probe per block newly cached since its last look-up; a walk of its cached prefix after an
eviction) and an O(n log n) sort, since cached lengths change with the cache and cannot be
memoized as fixed keys. The KV victim is the latest admitted request (its blocks stay cached, so
its readmission is cheap while they last).

Parameters:
  metric   tokens (default: most cached tokens first) | share (largest cached share of the prompt first)
  aging_s  seconds of waiting after which a request goes ahead of every younger one (the starvation
           bound), default 10, in [0, 86400]; 0 makes the policy FCFS
"""
from __future__ import annotations

from typing import Any, Sequence

from batchdeck.engine.request import Request
from batchdeck.policies.base import ADMISSION_SEQ, ParamSpec, Policy


class CacheAwarePolicy(Policy):
    name = "cache-aware"
    PARAMS = {
        "metric": ParamSpec("tokens", str, choices=("tokens", "share"),
                            help="rank by cached tokens (tokens) or cached share of the prompt (share)"),
        "aging_s": ParamSpec(10.0, float, 0.0, 86400.0, "waiting time after which a request goes first (FCFS)"),
    }

    def __init__(self, **params: Any):
        super().__init__(**params)
        self.aging_s: float = self.params["aging_s"]
        self.share: bool = self.params["metric"] == "share"

    def warmth(self, r: Request) -> float:
        """How much of `r` the cache holds now, by the policy's metric."""
        cached = self.prefix_lookup(r)
        return cached / len(r.token_ids) if self.share else cached

    def order_waiting(self, waiting: Sequence[Request], now: float) -> list[Request]:
        cutoff = now - self.aging_s
        aged = [r for r in waiting if r.arrival_time <= cutoff]
        warmth = self.warmth
        if not aged:
            return sorted(waiting, key=lambda r: (-warmth(r), r.admission_seq))
        aged.sort(key=ADMISSION_SEQ)
        rest = [r for r in waiting if r.arrival_time > cutoff]
        rest.sort(key=lambda r: (-warmth(r), r.admission_seq))
        return aged + rest

    def snapshot(self) -> dict[str, Any]:
        return {"metric": self.params["metric"], "aging_s": self.aging_s}
