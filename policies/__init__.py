"""Scheduling policies, registered by name (a contract): fcfs, sjf, slo, fair, priority."""
from __future__ import annotations

from typing import Any, Mapping

from engine.config import ConfigError
from policies.base import ParamSpec, Policy
from policies.fcfs import FCFSPolicy

POLICIES: dict[str, type[Policy]] = {cls.name: cls for cls in (FCFSPolicy,)}


def policy_names() -> tuple[str, ...]:
    return tuple(POLICIES)


def validate_policy_params(name: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """Check `params` against the policy's ParamSpecs; return them with defaults filled in."""
    if name not in POLICIES:
        raise ConfigError("policy", name, "one of " + ", ".join(POLICIES))
    specs = POLICIES[name].PARAMS
    out = {k: spec.default for k, spec in specs.items()}
    for key, value in dict(params).items():
        if key not in specs:
            allowed = ", ".join(specs) or "none"
            raise ConfigError(f"policy_params.{key}", value, f"a parameter of policy {name}: {allowed}")
        out[key] = specs[key].check(name, key, value)
    return out


def make_policy(name: str, params: Mapping[str, Any] | None = None) -> Policy:
    return POLICIES[name](**validate_policy_params(name, params or {}))


__all__ = ["POLICIES", "ParamSpec", "Policy", "make_policy", "policy_names", "validate_policy_params"]
