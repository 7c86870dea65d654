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
NEVER = 1 << 62  # a commit threshold no token count reaches


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


# A cache entry (a plain tuple: one is made for every full block registered, on the hot path):
# (block, tokens, parent, serial): the block holding the KV of `tokens`, computed after the prefix that
# `parent` (the serial of the previous block's entry; ROOT for a first block) stands for.
_Entry = tuple[int, tuple[int, ...], int, int]
BLOCK, TOKENS, PARENT, SERIAL = range(4)


@dataclass(slots=True, eq=False)
class PrefixMemo:
    """Per request (kept on `Request.prefix_memo`, dropped when it finishes).

    - `keys`/`tokens`: the chained keys and tokens of its leading full blocks, each computed once, when
      first needed (a look-up walks only as far as it hits, registration as far as the request has
      computed), and valid for good since a request's token list only grows;
    - `matched`/`serial`: the cached prefix found at the last look-up, valid while no entry was
      evicted since (`epoch`);
    - `registered`/`parent`/`commit_at`: how many of its full blocks it has registered since its
      admission, the serial of the last one (BROKEN after a collision), and the computed-token count at
      which `commit` has something to do again (so the per-chunk call is one comparison otherwise).
    """

    keys: list[int] = field(default_factory=list)
    tokens: list[tuple[int, ...]] = field(default_factory=list)
    epoch: int = -1
    matched: int = 0
    serial: int = ROOT
    registered: int = 0
    parent: int = ROOT
    commit_at: int = 0


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
        self._key_of: list[int | None] = [None] * num_blocks  # block -> the key of its entry
        self._serial = ROOT
        self._epoch = 0  # bumped whenever entries disappear (eviction, clear)
        self._committing: dict[str, PrefixMemo] = {}  # requests holding blocks that have a memo
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
    def usage(self) -> float:
        """The share of the pool held by requests (vLLM's kv_cache_usage_perc, 0..1): cached blocks
        nobody holds count as free."""
        return self.num_used / self.num_blocks

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
        """Blocks holding a cache entry, held or not (each entry is one block)."""
        return len(self._cache)

    def table(self, request_id: str) -> list[int]:
        return self.tables.get(request_id, [])

    # -- allocation -----------------------------------------------------------------------------
    def _evict(self, n: int) -> None:
        """Reclaim the `n` least recently released cached blocks into the free list, in one pass."""
        popitem, key_of, cache, free = self._evictable.popitem, self._key_of, self._cache, self._free
        for _ in range(n):
            b = popitem(False)[0]
            del cache[key_of[b]]
            key_of[b] = None
            free.append(b)
        self._epoch += 1
        self.prefix_cache_evictions += n

    def _release(self, blocks: list[int]) -> None:
        """Drop one reference to each block; the last block of a chain goes first, so that it is evicted first."""
        ref, key_of = self._ref, self._key_of
        for b in reversed(blocks):
            ref[b] -= 1
            if ref[b] == 0:
                if key_of[b] is not None:
                    self._evictable[b] = None
                else:
                    self._free.append(b)

    def extra_blocks_for(self, request_id: str, num_tokens: int) -> int:
        """Blocks still to allocate so that `request_id` can hold `num_tokens` tokens."""
        return max(0, blocks_needed(num_tokens, self.block_size) - len(self.table(request_id)))

    def can_hold(self, request_id: str, num_tokens: int, reserve: int = 0) -> bool:
        return self.extra_blocks_for(request_id, num_tokens) + reserve <= self.num_free

    def grow(self, request_id: str, num_tokens: int) -> bool:
        """Make `request_id` hold `num_tokens` tokens; False (and nothing changed) if blocks are short.
        Free blocks go first; cached blocks are reclaimed (least recently released first) only for
        the rest, all at once."""
        table = self.tables.get(request_id)
        extra = -(-num_tokens // self.block_size) - (len(table) if table is not None else 0)
        if extra <= 0:
            return True
        free = self._free
        short = extra - len(free)
        if short > 0:
            if short > len(self._evictable):
                return False
            self._evict(short)
        if table is None:
            table = self.tables[request_id] = []
        ref, popleft = self._ref, free.popleft
        for _ in range(extra):
            b = popleft()
            ref[b] = 1
            table.append(b)
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
        self._committing.pop(request_id, None)
        self._release(table)
        return len(table)

    # -- prefix cache ---------------------------------------------------------------------------
    @staticmethod
    def _hash_blocks(memo: PrefixMemo, ids: list[int], block_size: int, upto: int) -> None:
        """Extend the memo's chained keys (and block tokens) to its first `upto` full blocks."""
        keys, tokens = memo.keys, memo.tokens
        i = len(keys)
        prev = keys[-1] if i else ROOT
        start = i * block_size
        for _ in range(upto - i):
            toks = tuple(ids[start:start + block_size])
            prev = hash((prev, toks))
            keys.append(prev)
            tokens.append(toks)
            start += block_size

    def _match(self, request: "Request") -> PrefixMemo:
        """The request's memo with `matched` brought up to date: walk on from the last match, hashing a
        block only when the look-up gets to it (a miss ends the walk: a distinct prompt costs one hash
        and one dict miss, an empty cache none)."""
        memo = request.prefix_memo
        if memo is None:
            memo = request.prefix_memo = PrefixMemo()
        if memo.epoch != self._epoch:
            memo.epoch, memo.matched, memo.serial = self._epoch, 0, ROOT
        cache = self._cache
        if not cache:
            return memo
        bs = self.block_size
        ids = request.token_ids
        limit = (len(ids) - 1) // bs  # the last token is always computed
        i, parent = memo.matched, memo.serial
        keys, tokens = memo.keys, memo.tokens
        while i < limit:
            if i == len(keys):
                self._hash_blocks(memo, ids, bs, i + 1)
            e = cache.get(keys[i])
            if e is None or e[PARENT] != parent or e[TOKENS] != tokens[i]:
                break
            parent = e[SERIAL]
            i += 1
        memo.matched, memo.serial = i, parent
        return memo

    def cached_prefix_tokens(self, request: "Request") -> int:
        """Prompt tokens of a waiting request that the cache holds now (a multiple of block_size, below
        its token count); 0 with prefix caching off. Cost: one dict look-up per block found since the
        last call (plus the first miss), a walk from the first block after an eviction."""
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
        return [cache[keys[i]][BLOCK] for i in range(n)]

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
        memo = request.prefix_memo
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
            if not self.grow(rid, num_tokens):  # cannot fail: checked above
                raise AssertionError("KV accounting broken: admission check and allocation disagree")
        elif not self.grow(rid, num_tokens):
            return False
        if memo is not None:  # registration resumes after the reused blocks (their entries are the chain)
            n = len(hits)
            memo.registered, memo.commit_at = n, (n + 1) * self.block_size
            memo.parent = ROOT if not n else memo.serial if n == memo.matched else self._cache[memo.keys[n - 1]][SERIAL]
            self._committing[rid] = memo
        if self.prefix_caching:
            self.prefix_cache_queries += len(request.token_ids)
            self.prefix_cache_hits += num_cached_tokens
        return True

    def commit(self, request: "Request", num_computed_tokens: int) -> None:
        """Register the request's full blocks among its first `num_computed_tokens` (computed, verified)
        tokens in the cache. A block whose content is cached already stays private; a hash
        collision with other content ends registration for this request. Called for every chunk of
        every iteration: unless a block has filled since the last call, it is one comparison."""
        if not self.prefix_caching:
            return
        memo = request.prefix_memo
        if memo is not None and num_computed_tokens < memo.commit_at:
            return
        rid = request.request_id
        if memo is None:  # admitted while caching was off, or blocks given without admission
            memo = request.prefix_memo = PrefixMemo()
        if self._committing.get(rid) is not memo:
            memo.registered, memo.parent = 0, ROOT
            self._committing[rid] = memo
        bs = self.block_size
        full = num_computed_tokens // bs
        count, parent = memo.registered, memo.parent
        if full <= count or parent == BROKEN:
            memo.commit_at = NEVER if parent == BROKEN else (count + 1) * bs
            return
        keys, tokens = memo.keys, memo.tokens
        if len(keys) < full:
            self._hash_blocks(memo, request.token_ids, bs, full)
        table, cache, key_of = self.tables[rid], self._cache, self._key_of
        serial = self._serial
        for i in range(count, full):
            key, toks = keys[i], tokens[i]
            e = cache.get(key)
            if e is None:
                serial += 1
                b = table[i]
                cache[key] = (b, toks, parent, serial)
                key_of[b] = key
                parent = serial
            elif e[PARENT] != parent or e[TOKENS] != toks:
                parent = BROKEN
                break
            else:
                parent = e[SERIAL]
        self._serial = serial
        memo.registered, memo.parent = full, parent
        memo.commit_at = NEVER if parent == BROKEN else (full + 1) * bs

    def clear(self) -> int:
        """Drop every cache entry (held blocks stay with their requests, which register their full
        blocks again as they run); returns the number of cached blocks nobody held, now free."""
        dropped = len(self._evictable)
        self._free.extend(self._evictable)
        self._evictable.clear()
        self._cache.clear()
        self._key_of = [None] * self.num_blocks
        for memo in self._committing.values():
            memo.registered, memo.parent, memo.commit_at = 0, ROOT, 0
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
        with_entry = {b for b, key in enumerate(self._key_of) if key is not None}
        assert evictable <= with_entry and not (free & with_entry), "cached/free state and cache entries disagree"
        assert len(self._cache) == len(with_entry), "cache index broken"
        for key, e in self._cache.items():
            assert self._key_of[e[BLOCK]] == key, "cache index broken"
