"""Per-iteration attention metadata: everything a paged-attention kernel needs, passed explicitly.

Rows (requests) are ordered decodes first: rows [0, num_decodes) have exactly one query token.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from batchdeck.engine.kv_cache import KVCache


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: where each new token's K/V goes in the flat pool
    block_tables: torch.Tensor  # [R, max_blocks] int32, padded with 0
    query_start_loc: torch.Tensor  # [R + 1] int32, cumulative query lengths (cu_seqlens_q)
    seq_lens: torch.Tensor  # [R] int32: cached context + new tokens
    context_lens: torch.Tensor  # [R] int32: tokens already in the cache before this step
    num_decodes: int  # rows [0, num_decodes) have one query token
    max_query_len: int
    max_seq_len: int
    block_size: int
    # Host copies (plain lists) for backends that loop over prefill rows.
    query_lens_host: list[int]
    seq_lens_host: list[int]
    # [R] int32: the rows by sequence length, longest first (ties in row order); the decode launch
    # starts their programs in this order. None: row order.
    row_order: torch.Tensor | None = None

    @property
    def num_rows(self) -> int:
        return len(self.query_lens_host)


@dataclass
class StepContext:
    """What the registered attention function receives through the model's forward kwargs."""

    metadata: AttentionMetadata
    kv_cache: KVCache
    backend: "object"  # an AttentionBackend (typed loosely to avoid an import cycle)
