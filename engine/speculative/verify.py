"""Verification of an iteration's speculating chunks against the target model's logits.

A speculating chunk (a decode step with k drafted tokens) has k + 1 rows of logits; every other
sampling chunk has one. Greedy requests accept exactly the matching prefix; sampled requests use the
rejection rule in `rejection.py` with the request's own generator when it has a seed, against the
distributions the drafts were sampled from (`chunk.draft_probs`; None for deterministic drafts).
"""
from __future__ import annotations

import torch

from batchdeck.engine.sampler import Sampler, TopLogprobs
from batchdeck.engine.speculative.rejection import verify_greedy, verify_sampled
from batchdeck.engine.step_plan import ScheduledChunk


def verify_chunks(sampler: Sampler, logits: torch.Tensor, chunks: list[ScheduledChunk], counts: list[int]
                  ) -> tuple[list[list[int]], dict[str, float], dict[str, TopLogprobs]]:
    """(new tokens for each sampling chunk, in order; the log-probabilities of this call's plainly
    sampled tokens, request id -> value, and their top alternatives, for the rows that asked: a
    speculated row has none); `counts[i]` logits rows belong to chunk i."""
    starts = [0]
    for k in counts:
        starts.append(starts[-1] + k)
    greedy_ids = logits.argmax(dim=-1).tolist()  # one host read for every greedy decision
    out: list[list[int] | None] = [None] * len(chunks)
    plain = [i for i, (c, k) in enumerate(zip(chunks, counts)) if k == 1 and not c.request.sampling.greedy]
    logprobs: dict[str, float] = {}
    tops: dict[str, TopLogprobs] = {}
    if plain:  # ordinary sampled rows go through the batched sampler in one call
        rows = logits[[starts[i] for i in plain]]
        ids, logprobs, tops = sampler.sample_ids(rows, [chunks[i].request.request_id for i in plain],
                                           [chunks[i].request.sampling for i in plain])
        for i, t in zip(plain, ids.tolist()):
            out[i] = [t]
    for i, (c, k) in enumerate(zip(chunks, counts)):
        if out[i] is not None:
            continue
        p = c.request.sampling
        if p.greedy:
            out[i] = verify_greedy(greedy_ids[starts[i]:starts[i] + k], list(c.draft)) if k > 1 \
                else [greedy_ids[starts[i]]]
        else:
            probs = Sampler._filtered_probs(logits[starts[i]:starts[i] + k].float(), [p] * k)
            out[i] = verify_sampled(probs, list(c.draft), c.draft_probs, sampler.generator_for(c.request.request_id, p.seed))
    return out, logprobs, tops  # type: ignore[return-value]
