"""Shortest (predicted) job first, with aging.

Optimizes: mean latency and throughput of short requests. Waiting requests are admitted in the
order of their predicted remaining work, so a burst of short jobs overtakes long ones queued
before it; when KV blocks run out, the running request with the most predicted work left is
preempted (it loses the least relative progress and is the one SJF would have served last).

Costs: fairness. Long jobs wait behind every shorter one; without a guard they could starve.
The guard is aging: a request that has waited `aging_s` seconds (since arrival) goes ahead of
every request that has not, and such aged requests are served first come, first served among
themselves. So no request waits in SJF order longer than `aging_s`; after that it queues as under
FCFS. The prediction is only as good as its inputs: the default uses `max_tokens`, an upper bound
that clients often set loosely. Ordering is O(n log n) on memoized keys per iteration.

Parameters:
  predictor       name of the remaining-work predictor (default "tokens"):
                    tokens  prefill_weight * (tokens still to prefill) + (max_tokens - output so far)
                    output  max_tokens - output so far
                    prompt  tokens still to prefill
                  More can be plugged in with `register_predictor(name, fn)` where
                  `fn(request, params) -> float` (params: this policy's parameters).
  prefill_weight  how much one prompt token counts relative to one output token in `tokens`
                  (prefill runs many tokens per iteration, decode one), default 1.0, in [0, 1000].
  aging_s         seconds of waiting after which a request is served ahead of every younger one
                  (the starvation bound), default 30, in [0, 86400]; 0 makes the policy FCFS.
"""
from __future__ import annotations

from operator import attrgetter
from typing import Any, Callable, Mapping, Sequence

from batchdeck.engine.request import Request
from batchdeck.policies.base import ADMISSION_SEQ, ParamSpec, Policy, WaitingKeys

Predictor = Callable[[Request, Mapping[str, Any]], float]

ARRIVAL = attrgetter("arrival_time")


def tokens_to_prefill(r: Request) -> int:
    """Tokens to compute before `r` decodes again: its prompt, or after a preemption prompt + output."""
    pending = len(r.token_ids) - r.num_computed_tokens
    return pending - 1 if r.output_token_ids and pending > 0 else pending


def predict_tokens(r: Request, params: Mapping[str, Any]) -> float:
    """prefill_weight * tokens still to prefill + outputs still to generate (by max_tokens)."""
    return params["prefill_weight"] * tokens_to_prefill(r) + max(0, r.sampling.max_tokens - len(r.output_token_ids))


def predict_output(r: Request, params: Mapping[str, Any]) -> float:
    """Outputs still to generate (by max_tokens)."""
    return max(0, r.sampling.max_tokens - len(r.output_token_ids))


def predict_prompt(r: Request, params: Mapping[str, Any]) -> float:
    """Tokens still to prefill."""
    return tokens_to_prefill(r)


PREDICTORS: dict[str, Predictor] = {"tokens": predict_tokens, "output": predict_output, "prompt": predict_prompt}


def register_predictor(name: str, fn: Predictor) -> None:
    """Make `fn(request, params) -> predicted remaining work` selectable as `predictor=name`."""
    PREDICTORS[name] = fn


class SJFPolicy(Policy):
    name = "sjf"
    PARAMS = {
        "predictor": ParamSpec("tokens", str, choices=PREDICTORS,
                               help="remaining-work predictor: " + ", ".join(PREDICTORS)),
        "prefill_weight": ParamSpec(1.0, float, 0.0, 1000.0, "weight of a prompt token vs an output token"),
        "aging_s": ParamSpec(30.0, float, 0.0, 86400.0, "waiting time after which a request goes first (FCFS)"),
    }

    def __init__(self, **params: Any):
        super().__init__(**params)
        self.predictor: Predictor = PREDICTORS[self.params["predictor"]]
        self.aging_s: float = self.params["aging_s"]
        params_view = self.params
        predictor = self.predictor
        # Waiting key: (predicted work, admission order); fixed while the request waits.
        self._keys = WaitingKeys(lambda r: (predictor(r, params_view), r.admission_seq))
        self._oldest = float("inf")  # a lower bound of the oldest arrival among waiting requests

    def predict(self, r: Request) -> float:
        return self.predictor(r, self.params)

    def order_waiting(self, waiting: Sequence[Request], now: float) -> list[Request]:
        ordered = self._keys.sort(waiting)
        if not ordered:
            return ordered
        cutoff = now - self.aging_s
        # Skip the O(n) scan for aged requests while a lower bound of the oldest arrival says none.
        for r in self._keys.changed:
            if r.arrival_time < self._oldest:
                self._oldest = r.arrival_time
        if self._oldest > cutoff:
            return ordered
        self._oldest = min(map(ARRIVAL, waiting))
        if self._oldest > cutoff:
            return ordered  # nobody has aged yet: pure SJF
        aged = sorted((r for r in waiting if r.arrival_time <= cutoff), key=ADMISSION_SEQ)
        aged_ids = {id(r) for r in aged}
        return aged + [r for r in ordered if id(r) not in aged_ids]

    def pick_victim(self, running: Sequence[Request], now: float) -> Request:
        """The request with the most predicted work left (latest admitted among equals)."""
        predict, params = self.predictor, self.params
        return max(running, key=lambda r: (predict(r, params), r.admission_seq))

    def snapshot(self) -> dict[str, Any]:
        return {"predictor": self.params["predictor"], "aging_s": self.aging_s}
