"""The dashboard's speculative-decoding line, from the metrics window's `speculation` block
(engine/metrics.py: drafted tokens proposed and accepted, acceptance rate, tokens per iteration)."""
from __future__ import annotations

from typing import Any, Mapping


def summary(spec: Mapping[str, Any], spec_k: int | None) -> str:
    """One line for the dashboard: 'accepted 72% · 1.43 tok/it', or 'spec off · 1.00 tok/it' while
    spec_k is 0 and the window holds no drafts; '-' for a figure without data. Rich markup: the
    figures are bold. Short enough for the throughput plot's border at 120 columns."""
    rate, per_it = spec.get("acceptance_rate"), spec.get("tokens_per_iteration")
    per_it_text = "-" if per_it is None else f"{per_it:.2f}"
    if rate is None and spec_k == 0:
        head = "spec off"
    else:
        head = f"accepted [b]{'-' if rate is None else f'{rate * 100:.0f}%'}[/]"
    return f"{head} · [b]{per_it_text}[/] tok/it"
