"""How many KV slices a one-token row's attention is cut into (split-KV decode): pure, so the cost
model (engine/sim/cost_model.py) prices the Triton backend's rule without importing Triton."""
from __future__ import annotations

MAX_DECODE_SPLITS = 32


def decode_splits(rows: int, kv_heads: int, num_sms: int, max_splits: int = MAX_DECODE_SPLITS) -> int:
    """KV slices per (row, KV head) for one-token rows: a power of two that brings the programs to
    about two per SM, 1 (no split) when rows x KV heads alone fill the GPU."""
    if rows <= 0 or kv_heads <= 0:
        return 1
    want = (2 * num_sms) // (rows * kv_heads)
    splits = 1
    while splits * 2 <= min(want, max_splits):
        splits *= 2
    return splits
