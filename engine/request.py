"""Requests and their sampling parameters.

A request is a token list that the engine catches up: `num_computed_tokens` grows until it equals
`num_tokens`, and each time it does, one new token is sampled and appended. A prefill chunk is a
step of n > 1 tokens, a decode step is n = 1, a preempted request restarts from 0 (its streamed
output stays valid and is recomputed, not re-sent).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

SLO_CLASSES = ("realtime", "interactive", "batch")


class RequestError(ValueError):
    """A request that cannot be served as given; the message names the field and the allowed values."""


class QueueFullError(RequestError):
    """The waiting queue holds `max_waiting` requests: try again later (HTTP answers 503)."""


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0  # EOS and stop tokens do not end the request before this many output tokens
    logprobs: bool = False  # report each sampled token's log-probability (RequestOutput.logprobs)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def validate(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise RequestError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if self.temperature < 0:
            raise RequestError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise RequestError(f"seed must be an integer in [0, 2**63 - 1], got {self.seed!r}")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            raise RequestError(f"min_tokens must be an integer in [0, max_tokens = {self.max_tokens}], "
                               f"got {self.min_tokens!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise RequestError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    arrival_time: float = 0.0
    tenant: str = "default"
    priority: int = 0
    slo_class: str = "interactive"

    # Progress (owned by the engine).
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    spec_proposed: int = 0  # speculative decoding: drafted tokens verified, and how many were accepted
    spec_accepted: int = 0
    spec_steps: int = 0  # decode steps that verified drafts (mean accepted length = accepted / steps)
    admission_seq: int = -1  # order in which the engine accepted the request (FCFS tie-break)

    # Timing (engine clock, seconds since engine start) and iteration indices.
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    first_token_iteration: int | None = None
    finish_time: float | None = None
    finish_iteration: int | None = None
    token_times: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.token_ids: list[int] = list(self.prompt_token_ids)
        self.token_ids.extend(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_pending_tokens(self) -> int:
        """Tokens still to compute before the next sample."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_prefilling(self) -> bool:
        return self.num_pending_tokens > 1

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def append_token(self, token_id: int, now: float) -> None:
        self.output_token_ids.append(token_id)
        self.token_ids.append(token_id)
        self.token_times.append(now)
