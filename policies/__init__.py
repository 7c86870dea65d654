"""Scheduling policies, registered by name (a contract): fcfs, sjf, slo, fair, priority, cache-aware."""
from __future__ import annotations

import sys
from typing import Any, Mapping

from batchdeck.policies.base import ParamSpec, Policy, check_policy_params
from batchdeck.policies.cache_aware import CacheAwarePolicy
from batchdeck.policies.fair import FairPolicy
from batchdeck.policies.fcfs import FCFSPolicy
from batchdeck.policies.priority import PriorityPolicy
from batchdeck.policies.sjf import SJFPolicy
from batchdeck.policies.slo import SLOPolicy

POLICIES: dict[str, type[Policy]] = {
    cls.name: cls for cls in (FCFSPolicy, SJFPolicy, SLOPolicy, FairPolicy, PriorityPolicy, CacheAwarePolicy)
}
PARAM_SPECS: dict[str, Mapping[str, ParamSpec]] = {name: cls.PARAMS for name, cls in POLICIES.items()}


def policy_names() -> tuple[str, ...]:
    return tuple(POLICIES)


def validate_policy_params(name: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """Check `params` against the policy's ParamSpecs; return them with defaults filled in.

    Raises ConfigError naming the policy or the key (`policy_params.NAME`), the value and what is allowed.
    """
    return check_policy_params(name, PARAM_SPECS, params)


def describe_policies() -> dict[str, dict[str, Any]]:
    """Each policy's docstring summary and parameters (default, kind, range, help), for UIs and docs."""
    out = {}
    for name, cls in POLICIES.items():
        doc = sys.modules[cls.__module__].__doc__ or ""
        out[name] = {
            "summary": doc.strip().splitlines()[0] if doc.strip() else "",
            "params": {k: {"default": s.default, "kind": s.kind.__name__, "low": s.low, "high": s.high,
                           "choices": list(s.choices) if s.choices is not None else None, "help": s.help}
                       for k, s in cls.PARAMS.items()},
        }
    return out


def make_policy(name: str, params: Mapping[str, Any] | None = None) -> Policy:
    return POLICIES[name](**validate_policy_params(name, params or {}))


__all__ = ["POLICIES", "ParamSpec", "Policy", "describe_policies", "make_policy", "policy_names",
           "validate_policy_params"]
