"""What one iteration computes: a list of (request, first position, number of new tokens)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from batchdeck.engine.request import Request


@dataclass(slots=True)
class ScheduledChunk:
    request: Request
    start: int  # first position computed in this step (num_computed_tokens when scheduled)
    num_tokens: int
    samples: bool  # the step brings the request level with its token list: sample one token after it
    is_decode: bool  # one new token of a request that already has output
    padding: bool = False  # static batching: a finished request's slot, computed and discarded
    num_draft: int = 0  # speculative decoding: positions planned for draft tokens (within num_tokens)
    draft: tuple[int, ...] = ()  # the drafted tokens, verified after the last token (the drafter fills them)
    draft_probs: Any = None  # [len(draft), vocab] tensor: the distributions drafts were sampled from (None: deterministic)


@dataclass
class StepPlan:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    evicted_for_blocks: bool = False  # a running request was preempted because KV blocks ran out

    @property
    def empty(self) -> bool:
        return not self.chunks

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def num_decode_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks if c.is_decode or c.padding)

    @property
    def num_prefill_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks if not (c.is_decode or c.padding))

    @property
    def num_prefill_chunks(self) -> int:
        return sum(1 for c in self.chunks if not (c.is_decode or c.padding))
