"""The OpenAI request bodies the server accepts (pydantic models, as FastAPI uses them).

Beyond OpenAI's fields: vLLM's `top_k`, `min_tokens`, `ignore_eos`, `stop_token_ids`, `priority`,
and batchdeck's `tenant` and `slo_class`. Unknown fields are ignored (as vLLM does); a field of the
wrong type or out of range is a 400 naming it. Fields OpenAI defines but the engine cannot honour
(`echo`, `best_of` > n, `suffix`, `logit_bias`, penalties, tools, a `response_format` other than
text, `stream_options` without `stream`) are refused with a 400 rather than silently dropped.
Log-probabilities are the model's (before temperature), of the sampled token and, when asked
(completions' `logprobs: N`, chat's `top_logprobs`), of the N most likely tokens.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_N = 128  # choices per prompt


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _Sampling(_Body):
    """The fields completions and chat share."""

    model: str | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    user: str | None = Field(None, max_length=256)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    # vLLM's extra sampling fields
    top_k: int = Field(0, ge=-1)  # 0 or -1: off
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    priority: int = 0
    # batchdeck's own
    tenant: str | None = Field(None, min_length=1, max_length=256)
    slo_class: Literal["realtime", "interactive", "batch"] = "interactive"

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def tenant_name(self) -> str:
        """`tenant`, else the OpenAI `user`, else "default"."""
        return self.tenant or self.user or "default"

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    prompt: Any = None  # a string, a list of strings, a list of token ids, or a list of such lists
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None


class ChatMessage(_Body):
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: Any = None
