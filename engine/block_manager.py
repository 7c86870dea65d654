"""Paged KV block accounting with an automatic prefix cache. Pure bookkeeping, no tensors.

Every physical block is in exactly one state (invariant checked by `check`: free + cached + used == total):
- used: held by one or more requests (reference count > 0);
- cached (evictable): held by nobody but still holding the KV of a full block that a later request
  may reuse; such blocks are reclaimed least recently released first, and only when the pool has no
  free block left;
- free: held by nobody and holding nothing worth keeping.
`num_free` is what a request can still get: free + cached blocks.

Prefix cache (`prefix_caching`). A full block (block_size computed tokens) is registered under a key
chained over everything before it, h_0 = hash((0, tokens of block 0)), h_i = hash((h_{i-1}, tokens
of block i)), with CPython's tuple hash (an xxHash variant, 64 bits; for ints it does not depend on
PYTHONHASHSEED). The hash only finds candidates; a hit is exact: every entry keeps its block's
tokens and the serial number of the entry of the block before it, and a lookup walks from the first
block, accepting entry i only if its tokens equal the request's block i and its parent is the entry
accepted for block i-1. Serials are never reused, so an accepted chain stands for exactly one token
prefix: a hash collision costs a miss, never a wrong KV.

A request reuses the longest run of cached full blocks that ends before its last token (the last
token is always computed, for its logits), so its first computed position starts a block it owns
alone. Blocks reused from the cache are therefore never written, and only full, immutable blocks are
ever shared: no copy-on-write is needed. (Static batching's padding rows rewrite a finished
request's last computed position with the same token and context; that position lies past its
prompt, never in a reused block.)
"""
from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from batchdeck.engine.request import Request

ROOT = 0  # the parent serial (and parent hash) of a prompt's first block
BROKEN = -1  # a request whose chain met a hash collision registers no further blocks


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


@dataclass(slots=True, eq=False)
class _Entry:
    """A cached full block: its KV lives in `block`, computed after the prefix that `parent` stands for."""

    block: int
    key: int
    tokens: tuple[int, ...]
    parent: int  # serial of the previous block's entry (ROOT for a first block)
    serial: int


@dataclass(slots=True, eq=False)
class PrefixMemo:
    """Per request (kept on `Request.prefix_memo`): the chained keys and tokens of its full blocks, which
    stay valid as its token list only grows, and the cached prefix found at the last look-up (valid
    while no entry was evicted since: `epoch`)."""

    keys: list[int] = field(default_factory=list)
    tokens: list[tuple[int, ...]] = field(default_factory=list)
    epoch: int = -1
    matched: int = 0  # leading full blocks found cached
    serial: int = ROOT  # serial of the last of them


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = False):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.tables: dict[str, list[int]] = {}
        self._ref = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced; oldest first
        self._cache: dict[int, _Entry] = {}  # chained key -> entry
        self._entry_of: dict[int, _Entry] = {}  # block -> its entry
        self._serial = ROOT
        self._epoch = 0  # bumped whenever an entry disappears (eviction, clear)
        self._progress: dict[str, list[int]] = {}  # request -> [full blocks registered, serial of the last]
        # Counters (tokens), for metrics: look-ups at admission, and how many of those tokens were cached.
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        self.prefix_cache_evictions = 0  # cached blocks reclaimed for room

    # -- counts ---------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks a request can still get: free ones plus cached ones nobody holds."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free) - len(self._evictable)

    @property
    def num_evictable(self) -> int:
        """Cached blocks nobody holds (reused on a hit, reclaimed when the pool needs room)."""
        return len(self._evictable)

    @property
    def num_empty(self) -> int:
        """Blocks held by nobody and caching nothing."""
        return len(self._free)

    @property
    def num_cached(self) -> int:
        """Blocks holding a cache entry, held or not."""
        return len(self._entry_of)

    def table(self, request_id: str) -> list[int]:
        return self.tables.get(request_id, [])

    # -- allocation -----------------------------------------------------------------------------
    def _take(self) -> int:
        if self._free:
            b = self._free.popleft()
        else:
            b, _ = self._evictable.popitem(last=False)
            e = self._entry_of.pop(b)
            del self._cache[e.key]
            self._epoch += 1
            self.prefix_cache_evictions += 1
        self._ref[b] = 1
        return b

    def _release(self, blocks: list[int]) -> None:
        """Drop one reference to each block; the last block of a chain goes first, so that it is evicted first."""
        ref, entry_of = self._ref, self._entry_of
        for b in reversed(blocks):
            ref[b] -= 1
            if ref[b] == 0:
                if b in entry_of:
                    self._evictable[b] = None
                else:
                    self._free.append(b)

    def extra_blocks_for(self, request_id: str, num_tokens: int) -> int:
        """Blocks still to allocate so that `request_id` can hold `num_tokens` tokens."""
        return max(0, blocks_needed(num_tokens, self.block_size) - len(self.table(request_id)))

    def can_hold(self, request_id: str, num_tokens: int, reserve: int = 0) -> bool:
        return self.extra_blocks_for(request_id, num_tokens) + reserve <= self.num_free

    def grow(self, request_id: str, num_tokens: int) -> bool:
        """Make `request_id` hold `num_tokens` tokens; False (and nothing changed) if blocks are short."""
        extra = self.extra_blocks_for(request_id, num_tokens)
        if extra > len(self._free) + len(self._evictable):
            return False
        if extra:
            table = self.tables.setdefault(request_id, [])
            take = self._take
            table.extend(take() for _ in range(extra))
        return True

    def shrink(self, request_id: str, num_tokens: int) -> None:
        """Release trailing blocks beyond what `num_tokens` tokens need (speculative rollback).

        The request gets a new table list: a mirror that caches rows by list identity (the CUDA
        path's HostTables) must rewrite the row, since a regrow may put other blocks where freed ones were.
        Trailing blocks hold draft positions past the verified tokens, so none of them is cached.
        """
        table = self.tables.get(request_id)
        if not table:
            return
        keep = blocks_needed(num_tokens, self.block_size)
        if len(table) > keep:
            self._release(table[keep:])
            self.tables[request_id] = table[:keep]

    def free(self, request_id: str) -> int:
        """Release every block of the request (finish, abort, preemption); cached ones stay cached."""
        table = self.tables.pop(request_id, [])
        self._progress.pop(request_id, None)
        self._release(table)
        return len(table)

    # -- prefix cache ---------------------------------------------------------------------------
    def _memo(self, request: "Request", num_blocks: int) -> PrefixMemo:
        """The request's memo with keys for (at least) its first `num_blocks` full blocks."""
        memo = request.prefix_memo
        if memo is None:
            memo = request.prefix_memo = PrefixMemo()
        keys = memo.keys
        if len(keys) < num_blocks:
            ids, bs, tokens = request.token_ids, self.block_size, memo.tokens
            prev = keys[-1] if keys else ROOT
            for i in range(len(keys), num_blocks):
                toks = tuple(ids[i * bs:(i + 1) * bs])
                prev = hash((prev, toks))
                keys.append(prev)
                tokens.append(toks)
        return memo

    def _match(self, request: "Request") -> PrefixMemo:
        limit = (len(request.token_ids) - 1) // self.block_size  # the last token is always computed
        memo = self._memo(request, limit)
        if memo.epoch != self._epoch:
            memo.epoch, memo.matched, memo.serial = self._epoch, 0, ROOT
        i, parent = memo.matched, memo.serial
        cache, keys, tokens = self._cache, memo.keys, memo.tokens
        while i < limit:
            e = cache.get(keys[i])
            if e is None or e.parent != parent or e.tokens != tokens[i]:
                break
            parent = e.serial
            i += 1
        memo.matched, memo.serial = i, parent
        return memo

    def cached_prefix_tokens(self, request: "Request") -> int:
        """Prompt tokens of a waiting request that the cache holds now (a multiple of block_size, below
        its token count); 0 with prefix caching off. Cost: one dict look-up per block found since the
        last call, a full walk after an eviction."""
        if not self.prefix_caching:
            return 0
        return self._match(request).matched * self.block_size

    def _hit_blocks(self, request: "Request", num_cached_tokens: int) -> list[int]:
        n = num_cached_tokens // self.block_size
        memo = self._match(request)
        if num_cached_tokens % self.block_size or n > memo.matched:
            raise ValueError(f"{num_cached_tokens} cached tokens asked for request {request.request_id}, "
                             f"the cache holds {memo.matched * self.block_size}")
        cache, keys = self._cache, memo.keys
        return [cache[keys[i]].block for i in range(n)]

    def can_admit(self, request: "Request", num_cached_tokens: int, num_tokens: int) -> bool:
        """Whether `admit` would succeed now."""
        if not num_cached_tokens:
            return self.can_hold(request.request_id, num_tokens)
        hits = self._hit_blocks(request, num_cached_tokens)
        idle = sum(1 for b in hits if self._ref[b] == 0)  # reusing them takes them out of the reclaimable
        return blocks_needed(num_tokens, self.block_size) - len(hits) + idle <= self.num_free

    def admit(self, request: "Request", num_cached_tokens: int, num_tokens: int) -> bool:
        """Give a waiting request (holding no blocks) the cached blocks of its first `num_cached_tokens`
        tokens (from `cached_prefix_tokens`) and fresh blocks up to `num_tokens`; False (nothing
        changed) if blocks are short. Counts the look-up in the prefix-cache counters on success."""
        rid = request.request_id
        if rid in self.tables:
            raise ValueError(f"request {rid} already holds KV blocks")
        hits = self._hit_blocks(request, num_cached_tokens) if num_cached_tokens else []
        if hits:
            idle = sum(1 for b in hits if self._ref[b] == 0)
            if blocks_needed(num_tokens, self.block_size) - len(hits) + idle > self.num_free:
                return False
            ref, evictable = self._ref, self._evictable
            for b in hits:
                if ref[b] == 0:
                    del evictable[b]
                ref[b] += 1
            self.tables[rid] = list(hits)
            memo = request.prefix_memo
            self._progress[rid] = [len(hits), memo.serial if len(hits) == memo.matched else
                                   self._cache[memo.keys[len(hits) - 1]].serial]
            if not self.grow(rid, num_tokens):  # cannot fail: checked above
                raise AssertionError("KV accounting broken: admission check and allocation disagree")
        elif not self.grow(rid, num_tokens):
            return False
        if self.prefix_caching:
            self.prefix_cache_queries += len(request.token_ids)
            self.prefix_cache_hits += num_cached_tokens
        return True

    def commit(self, request: "Request", num_computed_tokens: int) -> None:
        """Register the request's full blocks among its first `num_computed_tokens` (computed, verified)
        tokens in the cache. A block whose content is cached already stays private; a hash
        collision with other content ends registration for this request."""
        if not self.prefix_caching:
            return
        full = num_computed_tokens // self.block_size
        rid = request.request_id
        prog = self._progress.get(rid)
        if prog is None:
            prog = self._progress[rid] = [0, ROOT]
        count, parent = prog
        if full <= count or parent == BROKEN:
            return
        memo = self._memo(request, full)
        table, cache, entry_of = self.tables[rid], self._cache, self._entry_of
        for i in range(count, full):
            key, toks = memo.keys[i], memo.tokens[i]
            e = cache.get(key)
            if e is None:
                self._serial += 1
                e = _Entry(table[i], key, toks, parent, self._serial)
                cache[key] = entry_of[table[i]] = e
            elif e.parent != parent or e.tokens != toks:
                parent = BROKEN
                break
            parent = e.serial
        prog[0], prog[1] = full, parent

    def clear(self) -> int:
        """Drop every cache entry (held blocks stay with their requests, which register their full
        blocks again as they run); returns the number of cached blocks nobody held, now free."""
        dropped = len(self._evictable)
        self._free.extend(self._evictable)
        self._evictable.clear()
        self._cache.clear()
        self._entry_of.clear()
        self._progress.clear()
        self._epoch += 1
        return dropped

    def set_prefix_caching(self, enabled: bool) -> None:
        """Turn the cache on or off; off drops it."""
        if not enabled:
            self.clear()
        self.prefix_caching = enabled

    def prefix_cache_stats(self) -> dict[str, Any]:
        """Counters and block states, for metrics (vLLM: prefix_cache_queries/hits, in tokens)."""
        return {"enabled": self.prefix_caching, "queries": self.prefix_cache_queries,
                "hits": self.prefix_cache_hits, "evictions": self.prefix_cache_evictions,
                "blocks_cached": self.num_cached, "blocks_evictable": self.num_evictable,
                "blocks_free": self.num_empty, "blocks_used": self.num_used, "blocks_total": self.num_blocks}

    # -- invariants -----------------------------------------------------------------------------
    def check(self) -> None:
        held: dict[int, int] = {}
        for t in self.tables.values():
            assert len(t) == len(set(t)), "a request holds a KV block twice"
            for b in t:
                held[b] = held.get(b, 0) + 1
        free, evictable = set(self._free), set(self._evictable)
        assert len(free) == len(self._free), "a KV block is free twice"
        assert len(held) + len(free) + len(evictable) == self.num_blocks, (
            f"KV accounting broken: used {len(held)} + cached {len(evictable)} + free {len(free)} "
            f"!= total {self.num_blocks}"
        )
        assert not (held.keys() & free) and not (held.keys() & evictable) and not (free & evictable), \
            "a KV block is in two states"
        for b in range(self.num_blocks):
            assert self._ref[b] == held.get(b, 0), f"KV block {b}: ref count {self._ref[b]}, held {held.get(b, 0)}"
        assert evictable <= self._entry_of.keys() and not (free & self._entry_of.keys()), \
            "cached/free state and cache entries disagree"
        assert len(self._cache) == len(self._entry_of), "cache index broken"
        for key, e in self._cache.items():
            assert e.key == key and self._entry_of.get(e.block) is e, "cache index broken"
