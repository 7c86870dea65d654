"""Pure-torch paged attention: correct on CPU and CUDA, and the oracle for faster kernels.

Decode rows (one query each) are computed together over keys gathered through their block
tables; prefill rows (chunks with prior cached context) one by one. Math runs in float32.
"""
from __future__ import annotations

import torch

from batchdeck.engine.attention.metadata import AttentionMetadata


def write_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Scatter new K/V rows into the flat view of the pool at `slot_mapping`."""
    kvh, d = k_cache.shape[-2:]
    k_cache.view(-1, kvh, d).index_copy_(0, slot_mapping, key.to(k_cache.dtype))
    v_cache.view(-1, kvh, d).index_copy_(0, slot_mapping, value.to(v_cache.dtype))


def gather_kv(cache: torch.Tensor, block_tables: torch.Tensor, max_len: int) -> torch.Tensor:
    """[R, max_len, KVH, D] keys (or values) of each row, read through its block table."""
    num_blocks = -(-max_len // cache.shape[1])
    blocks = cache[block_tables[:, :num_blocks].long()]  # [R, nb, bs, KVH, D]
    r, nb, bs, kvh, d = blocks.shape
    return blocks.reshape(r, nb * bs, kvh, d)[:, :max_len]


def _allowed(q_pos: torch.Tensor, kv_pos: torch.Tensor, seq_len: torch.Tensor,
             sliding_window: int | None) -> torch.Tensor:
    allowed = (kv_pos <= q_pos) & (kv_pos < seq_len)
    if sliding_window is not None:
        allowed &= kv_pos > q_pos - sliding_window
    return allowed


class TorchReferenceBackend:
    name = "torch"

    def forward(self, query, key, value, k_cache, v_cache, meta: AttentionMetadata, scaling: float,
                sliding_window: int | None) -> torch.Tensor:
        write_kv(key, value, k_cache, v_cache, meta.slot_mapping)
        num_heads, kvh = query.shape[1], k_cache.shape[2]
        group = num_heads // kvh
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
        nd = meta.num_decodes
        if nd:
            max_len = max(meta.seq_lens_host[:nd])
            k = gather_kv(k_cache, meta.block_tables[:nd], max_len).float()  # [nd, L, KVH, D]
            v = gather_kv(v_cache, meta.block_tables[:nd], max_len).float()
            q = query[:nd].float().view(nd, kvh, group, -1)  # [nd, KVH, G, D]
            scores = torch.einsum("rhgd,rlhd->rhgl", q, k) * scaling
            seq_len = meta.seq_lens[:nd].long().view(nd, 1, 1, 1)
            kv_pos = torch.arange(max_len, device=query.device).view(1, 1, 1, max_len)
            allowed = _allowed(seq_len - 1, kv_pos, seq_len, sliding_window)
            probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
            out[:nd] = torch.einsum("rhgl,rlhd->rhgd", probs, v).reshape(nd, num_heads, -1).to(out.dtype)
        s = nd  # decode rows come first, one query each; host lengths avoid a device sync
        for row in range(nd, meta.num_rows):
            e = s + meta.query_lens_host[row]
            seq_len = meta.seq_lens_host[row]
            k = gather_kv(k_cache, meta.block_tables[row:row + 1], seq_len)[0].float()  # [L, KVH, D]
            v = gather_kv(v_cache, meta.block_tables[row:row + 1], seq_len)[0].float()
            q = query[s:e].float().view(e - s, kvh, group, -1)
            scores = torch.einsum("qhgd,lhd->hgql", q, k) * scaling
            q_pos = torch.arange(seq_len - (e - s), seq_len, device=query.device).view(-1, 1)
            kv_pos = torch.arange(seq_len, device=query.device).view(1, -1)
            allowed = _allowed(q_pos, kv_pos, torch.tensor(seq_len, device=query.device), sliding_window)
            probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
            out[s:e] = torch.einsum("hgql,lhd->qhgd", probs, v).reshape(e - s, num_heads, -1).to(out.dtype)
            s = e
        return out
