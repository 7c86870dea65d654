"""The drafter interface: how the scheduler and the engine talk to a speculative proposer.

Drafting is split in two so that a model drafter can run one batched forward per draft position:
while planning, the scheduler asks `plan(request, room)` how many draft positions to reserve (token
budget and KV blocks are accounted for them); after planning, the engine calls `fill(chunks)` once
with every chunk that reserved positions, and the drafter sets `chunk.draft` (at most the reserved
number; fewer is allowed) and, for sampled proposals, `chunk.draft_probs`.
"""
from __future__ import annotations

from typing import Callable

from batchdeck.engine.request import Request
from batchdeck.engine.step_plan import ScheduledChunk

ProposeFn = Callable[[list[int], int], list[int]]


class Drafter:
    """Base class; drafters without per-request state keep the default hooks."""

    def plan(self, request: Request, room: int) -> int:
        """Draft positions to reserve for `request`'s next decode step (0 <= result <= room)."""
        raise NotImplementedError

    def fill(self, chunks: list[ScheduledChunk]) -> None:
        """Set `draft` (and `draft_probs`) of every chunk that reserved draft positions."""
        raise NotImplementedError

    def sync(self, request: Request) -> None:
        """`request`'s drafts were verified: drop whatever state the rejected ones left behind."""

    def release(self, request_id: str, finished: bool = True) -> None:
        """The request finished (forget it) or was preempted (its state may go; a sampling stream
        must go on where it was, or resumed drafting would repeat the noise it already used)."""

    def check(self) -> None:
        """Assert internal invariants (tests run the engine with check_invariants)."""


class LookupDrafter(Drafter):
    """Proposals computed from the request's own tokens by `propose(token_ids, k)` (no model), e.g.
    n-gram prompt lookup. Proposed while planning, so exactly the proposed length is reserved."""

    def __init__(self, propose: ProposeFn):
        self.propose = propose
        self._proposals: dict[int, tuple[int, ...]] = {}  # id(request) -> tokens, between plan and fill

    def plan(self, request: Request, room: int) -> int:
        draft = tuple(self.propose(request.token_ids, room))[:room] if room > 0 else ()
        if draft:
            self._proposals[id(request)] = draft
        else:
            self._proposals.pop(id(request), None)
        return len(draft)

    def fill(self, chunks: list[ScheduledChunk]) -> None:
        for c in chunks:
            c.draft = self._proposals.pop(id(c.request), ())[:c.num_draft]
        self._proposals.clear()  # proposals of requests preempted after planning
