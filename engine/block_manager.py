"""Paged KV block accounting: which physical blocks each request holds. Pure bookkeeping, no tensors.

Invariant (checked by `check`): free + used == total, and no block is held twice.
"""
from __future__ import annotations

from collections import deque


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self.tables: dict[str, list[int]] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def table(self, request_id: str) -> list[int]:
        return self.tables.get(request_id, [])

    def extra_blocks_for(self, request_id: str, num_tokens: int) -> int:
        """Blocks still to allocate so that `request_id` can hold `num_tokens` tokens."""
        return max(0, blocks_needed(num_tokens, self.block_size) - len(self.table(request_id)))

    def can_hold(self, request_id: str, num_tokens: int, reserve: int = 0) -> bool:
        return self.extra_blocks_for(request_id, num_tokens) + reserve <= len(self._free)

    def grow(self, request_id: str, num_tokens: int) -> bool:
        """Make `request_id` hold `num_tokens` tokens; False (and nothing changed) if blocks are short."""
        extra = self.extra_blocks_for(request_id, num_tokens)
        if extra > len(self._free):
            return False
        if extra:
            table = self.tables.setdefault(request_id, [])
            table.extend(self._free.popleft() for _ in range(extra))
        return True

    def shrink(self, request_id: str, num_tokens: int) -> None:
        """Release trailing blocks beyond what `num_tokens` tokens need (speculative rollback).

        The request gets a new table list: a mirror that caches rows by list identity (the CUDA
        path's HostTables) must rewrite the row, since a regrow may put other blocks where freed ones were.
        """
        table = self.tables.get(request_id)
        if not table:
            return
        keep = blocks_needed(num_tokens, self.block_size)
        if len(table) > keep:
            self._free.extend(reversed(table[keep:]))
            self.tables[request_id] = table[:keep]

    def free(self, request_id: str) -> int:
        table = self.tables.pop(request_id, [])
        self._free.extend(table)
        return len(table)

    def check(self) -> None:
        held = [b for t in self.tables.values() for b in t]
        assert len(held) == len(set(held)), "a KV block is held twice"
        assert len(held) + len(self._free) == self.num_blocks, (
            f"KV accounting broken: used {len(held)} + free {len(self._free)} != total {self.num_blocks}"
        )
        assert not set(held) & set(self._free), "a KV block is both free and held"
