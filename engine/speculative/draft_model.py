"""A draft model as the drafter: a smaller model with the target's vocabulary proposes k tokens.

The draft model keeps its own paged KV pool (same block size and block count as the target's, so
it never holds more than the target does for the same requests) and its own `ModelRunner` (on CUDA:
static buffers and CUDA graphs, like the target). Drafting for an iteration is batched: every
speculating request catches up on the tokens its draft KV lacks and samples its first draft in one
forward, then each further draft position is one decode forward of all rows.
Draft KV of rejected drafts is rolled back in `sync` (blocks freed where a block empties).

Greedy requests draft the argmax; sampled requests draft from the draft model's distribution under
the request's own temperature/top-k/top-p, and that distribution travels with the chunk
(`draft_probs`) for the rejection rule. Vocabularies may differ in padding: draft logits beyond the
target's vocabulary are dropped and a smaller draft vocabulary proposes none of the missing ids;
a request whose context holds an id beyond the draft's vocabulary is not drafted for.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from batchdeck.engine.block_manager import BlockManager
from batchdeck.engine.kv_cache import KVCache
from batchdeck.engine.model_runner import ModelRunner
from batchdeck.engine.models import LoadedModel
from batchdeck.engine.request import Request
from batchdeck.engine.sampler import Sampler
from batchdeck.engine.speculative.drafter import Drafter
from batchdeck.engine.step_plan import ScheduledChunk


@dataclass
class _DraftKV:
    """What the draft pool holds for a request: positions [0, computed); positions >= base hold `drafts`."""

    computed: int = 0
    base: int = 0
    drafts: list[int] = field(default_factory=list)
    checked: int = 0  # tokens [0, checked) were checked against the draft's vocabulary
    unrepresentable: bool = False  # the context holds an id the draft model has no embedding for


@dataclass
class _Row:
    """One request being drafted in this iteration."""

    chunk: ScheduledChunk
    kv: _DraftKV
    context_len: int  # the request's verified tokens
    want: int
    pos: int  # next position to feed
    drafts: list[int] = field(default_factory=list)
    probs: list[torch.Tensor] = field(default_factory=list)

    @property
    def request_id(self) -> str:
        return self.chunk.request.request_id

    @property
    def token_ids(self) -> "_RowTokens":
        return _RowTokens(self)


class _RowTokens:
    """A row's verified tokens followed by its drafts so far, indexable like the request's token list
    (the runner's input builders read `request.token_ids[i]` and `[start:stop]`)."""

    def __init__(self, row: _Row):
        self.row = row

    def __getitem__(self, index):
        ids, n, drafts = self.row.chunk.request.token_ids, self.row.context_len, self.row.drafts
        if isinstance(index, slice):
            start, stop = index.start or 0, index.stop
            return ids[start:min(stop, n)] + drafts[max(0, start - n):max(0, stop - n)]
        return ids[index] if index < n else drafts[index - n]


def draft_seed(seed: int) -> int:
    """A request's draft stream: seeded from its seed but independent of the target's stream."""
    return (seed * 0x9E3779B1 + 0x7F4A7C15) % (1 << 63)


class DraftModelDrafter(Drafter):
    def __init__(self, loaded: LoadedModel, kv_cache: KVCache, backend, device: torch.device,
                 target_vocab: int, *, max_rows: int, max_tokens_per_forward: int, cuda_graphs: bool = False,
                 seed: int = 0):
        self.blocks = BlockManager(kv_cache.num_blocks, kv_cache.block_size)
        self.target_vocab = target_vocab
        self.draft_vocab = loaded.model.get_input_embeddings().num_embeddings
        self.max_tokens_per_forward = max(1, max_tokens_per_forward)
        self.max_model_len = loaded.max_model_len
        self.runner = ModelRunner(loaded.model, kv_cache, backend, None, device, max_rows=max_rows,
                                  max_tokens=self.max_tokens_per_forward, max_model_len=self.max_model_len,
                                  cuda_graphs=cuda_graphs)
        self.sampler = Sampler(device, draft_seed(seed))  # generators only: drafts never share the target's noise
        self.kv: dict[str, _DraftKV] = {}

    # -- planning -------------------------------------------------------------------------------
    def plan(self, request: Request, room: int) -> int:
        if not self._representable(request):
            return 0
        # drafting position L + k - 2 must fit the draft model's context
        return max(0, min(room, self.max_model_len - len(request.token_ids)))

    def _representable(self, request: Request) -> bool:
        """Whether every token of the request has an embedding in the draft model (checked once each)."""
        if self.draft_vocab >= self.target_vocab:
            return True
        kv = self.kv.setdefault(request.request_id, _DraftKV())
        if not kv.unrepresentable:
            ids = request.token_ids
            kv.unrepresentable = any(t >= self.draft_vocab for t in ids[kv.checked:])
            kv.checked = len(ids)
        return not kv.unrepresentable

    def sync(self, request: Request) -> None:
        kv = self.kv.get(request.request_id)
        if kv is None:
            return
        if kv.computed > kv.base:  # drafts' KV: keep the prefix the target accepted
            ids = request.token_ids
            keep = 0
            for i, d in enumerate(kv.drafts[:kv.computed - kv.base]):
                if kv.base + i >= len(ids) or ids[kv.base + i] != d:
                    break
                keep += 1
            kv.computed = kv.base + keep
        kv.base, kv.drafts = kv.computed, []
        self.blocks.shrink(request.request_id, kv.computed)

    def release(self, request_id: str, finished: bool = True) -> None:
        self.kv.pop(request_id, None)
        self.blocks.free(request_id)
        if finished:
            self.sampler.forget(request_id)

    def check(self) -> None:
        self.blocks.check()
        for rid, kv in self.kv.items():
            assert len(self.blocks.table(rid)) * self.blocks.block_size >= kv.computed, f"draft KV of {rid} lost"

    # -- drafting -------------------------------------------------------------------------------
    @torch.inference_mode()
    def fill(self, chunks: list[ScheduledChunk]) -> None:
        rows: list[_Row] = []
        for c in chunks:
            r = c.request
            kv = self.kv.setdefault(r.request_id, _DraftKV())
            self.sync(r)
            length = len(r.token_ids)
            kv.computed = min(kv.computed, length - 1)  # the last token is fed again: its logits give draft 1
            # this pool has the target's size but shares no prefix blocks (the target's may, with prefix
            # caching), so a grow can fail when the target's pool is full of shared blocks: then this
            # request's step simply goes without drafts
            if not self._representable(r) or not self.blocks.grow(r.request_id, length + c.num_draft - 1):
                c.draft = ()
                continue
            rows.append(_Row(c, kv, length, c.num_draft, kv.computed))
        active = rows
        while active:
            self._forward(active)
            active = [row for row in active if len(row.drafts) < row.want]
        for row in rows:
            row.chunk.draft = tuple(row.drafts)
            sampled = not row.chunk.request.sampling.greedy
            row.chunk.draft_probs = torch.stack(row.probs) if sampled else None
            row.kv.computed, row.kv.base, row.kv.drafts = row.pos, row.context_len, row.drafts

    def _forward(self, active: list[_Row]) -> None:
        """Feed every active row what it lacks (within the per-forward token cap); rows that reach
        the end of their context sample their next draft."""
        chunks: list[ScheduledChunk] = []
        row_of: dict[int, _Row] = {}
        left = self.max_tokens_per_forward
        for row in active:
            end = row.context_len + len(row.drafts)
            n = min(end - row.pos, left)
            if n > 0:
                c = ScheduledChunk(row, row.pos, n, samples=row.pos + n == end, is_decode=n == 1)  # type: ignore[arg-type]
                chunks.append(c)
                row_of[id(c)] = row
                left -= n
        logits, sampling, _counts, _greedy = self.runner.logits(chunks, self.blocks)
        for c in chunks:
            row_of[id(c)].pos += c.num_tokens
        if not sampling:
            return
        logits = self._fit_vocab(logits)
        picked = [row_of[id(c)] for c in sampling]
        greedy = [i for i, row in enumerate(picked) if row.chunk.request.sampling.greedy]
        if greedy:
            for i, t in zip(greedy, logits[greedy].argmax(dim=-1).tolist()):
                picked[i].drafts.append(t)
        sampled = [i for i, row in enumerate(picked) if not row.chunk.request.sampling.greedy]
        if sampled:
            params = [picked[i].chunk.request.sampling for i in sampled]
            probs = Sampler._filtered_probs(logits[sampled].float(), params)
            # exponential race (argmax p / E, E ~ Exp(1)): a sample from p per row, one host read for all
            noise = torch.empty_like(probs)
            for j, i in enumerate(sampled):
                p = params[j]
                gen = self.sampler.generator_for(picked[i].request_id, None if p.seed is None else draft_seed(p.seed))
                noise[j].exponential_(generator=gen)
            for j, t in enumerate((probs / noise).argmax(dim=-1).tolist()):
                row = picked[sampled[j]]
                row.drafts.append(t)
                row.probs.append(probs[j])

    def _fit_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        v = logits.shape[-1]
        if v == self.target_vocab:
            return logits
        if v > self.target_vocab:
            return logits[:, :self.target_vocab]
        pad = logits.new_full((logits.shape[0], self.target_vocab - v), float("-inf"))
        return torch.cat([logits, pad], dim=1)

