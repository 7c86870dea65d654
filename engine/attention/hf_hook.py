"""The attention function registered with transformers' `AttentionInterface`.

HF modules call it with q/k/v after RoPE as [1, heads, T, head_dim] (the whole iteration packed
into batch 1) and pass our `StepContext` through the forward kwargs as `batchdeck_step`.

`transformers.AttentionInterface` lives in `transformers.modeling_utils`, whose import brings
transformers' loading, distributed and kernel-integration stacks (seconds): it is imported when a
model is loaded (`register`), not when the engine's modules are.
"""
from __future__ import annotations

import torch

ATTN_IMPLEMENTATION = "batchdeck_paged"


def paged_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                            value: torch.Tensor, attention_mask, scaling: float | None = None,
                            dropout: float = 0.0, sliding_window: int | None = None, **kwargs):
    step = kwargs.get("batchdeck_step")
    if step is None:
        raise RuntimeError("batchdeck paged attention called without a step context (batchdeck_step kwarg)")
    layer = module.layer_idx
    out = step.backend.forward(
        query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
        step.kv_cache.keys[layer], step.kv_cache.values[layer], step.metadata,
        scaling if scaling is not None else module.scaling, sliding_window,
    )
    return out.unsqueeze(0), None


def register() -> str:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)
    return ATTN_IMPLEMENTATION
