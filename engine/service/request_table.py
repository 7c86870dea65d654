"""The request table the console shows (the `requests` telemetry topic): running then waiting
requests, one row each, built in the engine thread a few times a second (not per iteration)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from batchdeck.engine.llm_engine import LLMEngine
    from batchdeck.engine.request import Request


def request_state(r: "Request", running: bool) -> str:
    """prefill | decode for a running request; preempted | waiting for a waiting one."""
    if running:
        return "prefill" if r.is_prefilling else "decode"
    return "preempted" if r.num_preemptions else "waiting"


def request_rows(engine: "LLMEngine", limit: int = 200) -> list[dict[str, Any]]:
    """Running then waiting requests (at most `limit`)."""
    rows: list[dict[str, Any]] = []
    for running, queue in ((True, engine.scheduler.running), (False, engine.scheduler.waiting)):
        for r in queue[: max(0, limit - len(rows))]:
            rows.append({
                "request_id": r.request_id, "tenant": r.tenant, "slo_class": r.slo_class,
                "priority": r.priority, "state": request_state(r, running), "prompt_tokens": r.num_prompt_tokens,
                "output_tokens": r.num_output_tokens, "max_tokens": r.sampling.max_tokens,
                "ttft": None if r.first_token_time is None else r.first_token_time - r.arrival_time,
                "arrival": r.arrival_time, "num_preemptions": r.num_preemptions,
                "num_cached_tokens": r.num_cached_tokens,
            })
    return rows


def requests_counts(message: dict[str, Any]) -> dict[str, Any]:
    """A `requests` record as /metrics reads it: its counts and time, without the table and policy state."""
    return {k: v for k, v in message.items() if k not in ("requests", "policy")}


def requests_message(engine: "LLMEngine", limit: int = 200) -> dict[str, Any]:
    """The `requests` record: counts of every running / waiting / preempted request, the table (at
    most `limit` rows) and the policy's own state (e.g. virtual times)."""
    sched = engine.scheduler
    return {"time": engine.clock(), "iteration": engine.iteration,
            "num_running": len(sched.running), "num_waiting": len(sched.waiting),
            "num_preempted": sum(1 for r in sched.waiting if r.num_preemptions),
            "kv_cache_usage": engine.blocks.usage,
            "requests": request_rows(engine, limit),
            "policy": {"name": engine.live.policy, "state": sched.policy.snapshot()}}
