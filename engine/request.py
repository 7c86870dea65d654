"""Requests and their sampling parameters.

A request is a token list that the engine catches up: `num_computed_tokens` grows until it equals
`num_tokens`, and each time it does, one new token is sampled and appended. A prefill chunk is a
step of n > 1 tokens, a decode step is n = 1, a preempted request restarts from 0 (its streamed
output stays valid and is recomputed, not re-sent).

With overlapped iterations (async scheduling) a token sampled by an iteration still running on the
device is already counted: `token_ids` ends with a `PLACEHOLDER` for it (at most two: the iteration
being booked and the one launched after it), which `append_token` replaces with the sampled value.
So `token_ids` is prompt + output + placeholders; `num_tokens` counts them (what the scheduler
plans against), `num_known_tokens` does not.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

SLO_CLASSES = ("realtime", "interactive", "batch")
MAX_TOP_LOGPROBS = 20  # alternatives per token (OpenAI's bound)
INT32_MAX = 2**31 - 1  # token counts, token ids, top_k and priorities travel as int32 on the device
GREEDY_BELOW = 1e-5  # a temperature below this samples greedily (as vLLM's _SAMPLING_EPS): dividing the
# logits by it in float32 would overflow, and 1e-39 rounds to 0 (a NaN distribution)
MAX_TEMPERATURE = 100.0  # far past uniform sampling; a bound so that inf (and 1e400) are refused by name
MAX_ID_CHARS = 256  # request ids and tenant names
PLACEHOLDER = -1  # a token sampled on the device and not read yet (never fed to the model: see model_runner)


class RequestError(ValueError):
    """A request that cannot be served as given; the message names the field and the allowed values."""


class QueueFullError(RequestError):
    """The waiting queue holds `max_waiting` requests: try again later (HTTP answers 503, or 400 when
    one HTTP request alone needs more than `max_waiting` places)."""

    def __init__(self, waiting: int, max_waiting: int):
        super().__init__(f"the waiting queue is full: {waiting} requests wait and max_waiting is {max_waiting}; "
                         "try again later")
        self.max_waiting = max_waiting


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
    top_logprobs: int = 0  # and this many most likely tokens with theirs (RequestOutput.top_logprobs)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    def validate(self) -> None:
        """Raise RequestError naming the first field out of range (NaN and infinities never pass)."""
        check_int("max_tokens", self.max_tokens, 1, INT32_MAX)
        if not _is_number(self.temperature) or not 0 <= self.temperature <= MAX_TEMPERATURE:
            raise RequestError(f"temperature must be a number in [0, {MAX_TEMPERATURE:g}] (0 = greedy), "
                               f"got {show_value(self.temperature)}")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise RequestError(f"top_p must be a number in (0, 1], got {show_value(self.top_p)}")
        if self.seed is not None:
            check_int("seed", self.seed, 0, 2**63 - 1)
        check_int("min_tokens", self.min_tokens, 0, self.max_tokens, note=f" (max_tokens is {self.max_tokens})")
        check_int("top_k", self.top_k, 0, INT32_MAX, note=" (0 = off)")
        for i, token in enumerate(self.stop_token_ids):
            check_int(f"stop_token_ids[{i}]", token, 0, INT32_MAX)
        check_int("top_logprobs", self.top_logprobs, 0, MAX_TOP_LOGPROBS)
        if self.top_logprobs and not self.logprobs:
            raise RequestError(f"top_logprobs = {self.top_logprobs} needs logprobs on")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def show_value(value: Any) -> str:
    """A value for an error message, short even when the value is not (a 400-digit integer, a long id)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**20:
        return f"an integer of {len(str(abs(value))) if abs(value) < 10**4000 else 'over 4000'} digits"
    text = repr(value)
    return text if len(text) <= 60 else text[:40] + f"... ({len(text)} characters)"


def check_int(name: str, value: Any, low: int, high: int, *, note: str = "") -> int:
    """`value` if it is an integer in [low, high]; RequestError naming `name` and the range otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise RequestError(f"{name} must be an integer in [{low}, {high}]{note}, got {show_value(value)}")
    return value


def check_text(name: str, value: Any, *, max_chars: int | None = None, nonempty: bool = False) -> str:
    """`value` if it is a string that UTF-8 can carry (no lone surrogate), within `max_chars`."""
    if not isinstance(value, str) or (nonempty and not value):
        raise RequestError(f"{name} must be a {'non-empty ' if nonempty else ''}string, got {show_value(value)}")
    if max_chars is not None and len(value) > max_chars:
        raise RequestError(f"{name} has {len(value)} characters; at most {max_chars} are allowed")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RequestError(f"{name} contains a lone surrogate {value[exc.start]!r} at character {exc.start}: "
                           "text must be valid Unicode") from None
    return value


def check_request_fields(request_id: Any, tenant: Any, priority: Any, slo_class: Any) -> None:
    """The identity fields every entry point shares (generate lines, MQTT submit, presets, HTTP)."""
    check_text("id", request_id, max_chars=MAX_ID_CHARS, nonempty=True)
    check_text("tenant", tenant, max_chars=MAX_ID_CHARS, nonempty=True)
    check_int("priority", priority, -INT32_MAX - 1, INT32_MAX)
    if slo_class not in SLO_CLASSES:
        raise RequestError(f"slo_class {show_value(slo_class)} is not one of " + ", ".join(SLO_CLASSES))


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
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at its first admission
    prefix_memo: Any = field(default=None, repr=False)  # the block manager's chained block keys (block_manager.PrefixMemo)

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
    def num_known_tokens(self) -> int:
        """Prompt and output tokens whose values the host has (placeholders excluded)."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def reaches_length_limit(self, num_tokens: int, max_model_len: int) -> bool:
        """Whether `num_tokens` tokens (prompt included) reach `max_tokens` or `max_model_len`. The
        scheduler asks with the tokens in flight counted (no iteration after the last one), the stop
        check with the tokens the host has (`num_known_tokens`)."""
        return num_tokens - len(self.prompt_token_ids) >= self.sampling.max_tokens or num_tokens >= max_model_len

    @property
    def num_placeholders(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids) - len(self.output_token_ids)

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

    @property
    def ttft(self) -> float | None:
        """Time to first token (seconds); None before the first token."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def tpot(self) -> float | None:
        """Time per output token, as vLLM reads it: (e2e - TTFT) / (output tokens - 1); None until
        the request finished, or with fewer than two output tokens."""
        if self.finish_time is None or self.first_token_time is None or self.num_output_tokens < 2:
            return None
        return (self.finish_time - self.first_token_time) / (self.num_output_tokens - 1)

    def add_placeholder(self) -> None:
        """A token of this request is being sampled on the device (its value comes with `append_token`)."""
        self.token_ids.append(PLACEHOLDER)

    def append_token(self, token_id: int, now: float) -> None:
        """Append a sampled token: it takes the place of the oldest placeholder, if there is one."""
        known = self.num_known_tokens
        if known < len(self.token_ids):
            self.token_ids[known] = token_id
        else:
            self.token_ids.append(token_id)
        self.output_token_ids.append(token_id)
        self.token_times.append(now)

    def drop_placeholders(self) -> None:
        """Forget tokens still in flight (the request finished: their values are discarded)."""
        del self.token_ids[self.num_known_tokens:]
