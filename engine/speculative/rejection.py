"""Verification of drafted tokens by the standard speculative-sampling rule.

Draft token i is accepted with probability min(1, p_target(d_i) / p_draft(d_i)); at the first
rejection a token is sampled from normalize(max(0, p_target − p_draft)) and drafting stops; when
all k are accepted a bonus token is sampled from the target at position k. This keeps the
target's output distribution exactly. Greedy requests accept exactly the matching prefix.
A drafter with deterministic proposals (n-gram lookup) has p_draft = one-hot(d_i).
"""
from __future__ import annotations

import torch


def verify_sampled(target_probs: torch.Tensor, draft_tokens: list[int], draft_probs: torch.Tensor | None,
                   generator: torch.Generator | None = None) -> list[int]:
    """target_probs [k+1, V], draft_probs [k, V] (None: deterministic drafts). Returns accepted
    drafts followed by one corrected or bonus token."""
    k = len(draft_tokens)
    dev = target_probs.device
    if k == 0:
        return [int(torch.multinomial(target_probs[0], 1, generator=generator))]
    idx = torch.tensor(draft_tokens, device=dev)
    p = target_probs[:k].gather(1, idx.unsqueeze(1)).squeeze(1)
    if draft_probs is None:
        q = torch.ones_like(p)
        draft = torch.zeros_like(target_probs[:k]).scatter_(1, idx.unsqueeze(1), 1.0)
    else:
        q = draft_probs.gather(1, idx.unsqueeze(1)).squeeze(1)
        draft = draft_probs
    u = torch.rand(k, device=dev, generator=generator)
    accept = (u * q < p).tolist()  # u < p / q without dividing by zero
    out: list[int] = []
    for i, ok in enumerate(accept):
        if not ok:
            residual = (target_probs[i] - draft[i]).clamp_min(0)
            total = residual.sum()
            residual = target_probs[i] if float(total) <= 0 else residual / total
            out.append(int(torch.multinomial(residual, 1, generator=generator)))
            return out
        out.append(draft_tokens[i])
    out.append(int(torch.multinomial(target_probs[k], 1, generator=generator)))
    return out


def verify_greedy(target_argmax: list[int], draft_tokens: list[int]) -> list[int]:
    """target_argmax has k+1 entries: accept the matching prefix, then the target's own token."""
    out: list[int] = []
    for i, d in enumerate(draft_tokens):
        if target_argmax[i] != d:
            break
        out.append(d)
    out.append(target_argmax[len(out)])
    return out
