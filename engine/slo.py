"""Per-class service-level targets (time to first token, time per output token)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SLOTarget:
    ttft: float  # seconds
    tpot: float  # seconds per output token after the first


DEFAULT_SLO_TARGETS: dict[str, SLOTarget] = {
    "realtime": SLOTarget(ttft=0.5, tpot=0.05),
    "interactive": SLOTarget(ttft=2.0, tpot=0.15),
    "batch": SLOTarget(ttft=10.0, tpot=1.0),
}


def slo_met(targets: dict[str, SLOTarget], slo_class: str, ttft: float | None, tpot: float | None) -> bool:
    target = targets.get(slo_class, targets["interactive"])
    if ttft is None or ttft > target.ttft:
        return False
    return tpot is None or tpot <= target.tpot
