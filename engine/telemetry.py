"""Telemetry records the engine emits: one per iteration, one per finished request, and events.

Field names are a contract (the console, MQTT topics, recordings and reports read them).
Records are plain dataclasses; `to_dict()` gives the JSON form.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol


@dataclass(slots=True)
class IterationRecord:
    iteration: int
    time: float  # seconds since engine start, at the end of the step
    step_time: float  # seconds, schedule + prepare + forward + sample (+ bookkeeping)
    schedule_time: float
    prepare_time: float
    forward_time: float
    sample_time: float
    num_prefill_tokens: int
    num_decode_tokens: int
    num_prefill_chunks: int
    num_requests_running: int
    num_requests_waiting: int
    num_preemptions: int  # this iteration
    kv_blocks_used: int
    kv_blocks_total: int
    kv_cache_usage: float  # 0..1
    config_version: int
    num_padding_tokens: int = 0  # static batching: finished slots computed as padding
    num_finished: int = 0  # requests that finished in this iteration
    num_generated_tokens: int = 0  # tokens sampled in this iteration
    spec_proposed: int = 0
    spec_accepted: int = 0
    draft_time: float = 0.0  # speculative decoding: time the drafter took (a draft model's forwards)
    ttfts: list[float] = field(default_factory=list)  # TTFT of each request whose first token came now
    tenant_tokens: dict[str, int] = field(default_factory=dict)  # tokens computed per tenant this iteration
    itls: list[float] = field(default_factory=list)  # inter-token latency: for each request that got tokens now
    # (and had some before), now - the time of its previous tokens (a speculative step's tokens arrive together)
    # Prefix cache: tokens of the requests admitted in this iteration that were looked up in the cache,
    # and of those, how many were served from it (not computed; num_prefill_tokens counts the computed).
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    # KV pool: kv_blocks_used (held) + kv_blocks_evictable (cached, held by nobody) + kv_blocks_free == total;
    # kv_blocks_cached counts the blocks holding a cache entry, held or not.
    kv_blocks_cached: int = 0
    kv_blocks_evictable: int = 0
    kv_blocks_free: int = 0
    # Overlapped iterations (async scheduling): whether the next iteration was launched before this one was
    # booked. Then schedule/prepare/forward/sample_time are this iteration's own host times to plan and
    # enqueue it (done while the previous iteration ran on the device), sync_wait_time is how long the host
    # waited for this iteration's sampled ids (the tail of its own device time), and step_time is its launch
    # plus its booking (the wait included); `time` is when it was booked.
    overlapped: bool = False
    sync_wait_time: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(slots=True)
class RequestRecord:
    request_id: str
    tenant: str
    slo_class: str
    priority: int
    prompt_tokens: int
    output_tokens: int
    arrival: float  # seconds since engine start
    queue_time: float  # arrival -> first scheduled
    ttft: float | None
    tpot: float | None  # time per output token: (e2e - ttft) / (output tokens - 1); None for one token
    itl_p50: float | None  # this request's inter-token latencies: gaps between consecutive output tokens
    itl_p99: float | None
    itl_max: float | None
    e2e_latency: float
    finish_reason: str
    num_preemptions: int
    slo_met: bool
    first_token_iteration: int | None
    finish_iteration: int | None
    finish: float = 0.0
    spec_proposed: int = 0
    spec_accepted: int = 0
    spec_steps: int = 0  # decode steps that verified drafts
    spec_acceptance_rate: float | None = None  # spec_accepted / spec_proposed (None: nothing proposed)
    spec_mean_accepted: float | None = None  # accepted drafts per verification step (None: no step)
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at its first admission
    max_tokens: int = 0  # the request's max_tokens (0 in recordings made before it was recorded)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(slots=True)
class Event:
    """`kind` is one of config_change, preemption, request_rejected, error, pause, resume,
    prefix_cache_cleared."""

    kind: str
    time: float
    iteration: int
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**self.data, "kind": self.kind, "time": self.time, "iteration": self.iteration}


Record = IterationRecord | RequestRecord | Event


class TelemetrySink(Protocol):
    """Where the engine hands its records; must never block (see engine/bus.py)."""

    def __call__(self, topic: str, record: Record) -> None: ...


def null_sink(topic: str, record: Record) -> None:
    return None


@dataclass
class ListSink:
    """Keeps everything in lists; for tests and headless reports."""

    iterations: list[IterationRecord] = field(default_factory=list)
    requests: list[RequestRecord] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    other: list[tuple[str, Any]] = field(default_factory=list)  # gpu samples, request snapshots

    def __call__(self, topic: str, record: Record) -> None:
        target = {"iteration": self.iterations, "request": self.requests, "event": self.events}.get(topic)
        if target is None:
            self.other.append((topic, record))
        else:
            target.append(record)


SinkFn = Callable[[str, Record], None]
