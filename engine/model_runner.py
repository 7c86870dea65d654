"""Turns a StepPlan into one flattened forward of the HF model and samples where tokens are due.

Inputs are built with tensor ops from per-request slices (no per-token Python loops):
input_ids [1, T], position_ids [1, T], the attention metadata, and `logits_to_keep` = the last
position of every chunk that samples, so the LM head runs only there.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from itertools import chain

import torch

from engine.attention.metadata import AttentionMetadata, StepContext
from engine.block_manager import BlockManager
from engine.kv_cache import KVCache
from engine.sampler import Sampler
from engine.step_plan import ScheduledChunk, StepPlan


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [1, T]
    positions: torch.Tensor  # [1, T]
    metadata: AttentionMetadata
    sample_rows: torch.Tensor  # [S] flattened index of each sampling chunk's last token
    sampling_chunks: list[ScheduledChunk]


@dataclass
class StepTimings:
    prepare: float = 0.0
    forward: float = 0.0
    sample: float = 0.0


def order_rows(chunks: list[ScheduledChunk]) -> list[ScheduledChunk]:
    """Decode rows (one query token) first, as the attention backends expect."""
    return [c for c in chunks if c.num_tokens == 1] + [c for c in chunks if c.num_tokens != 1]


def build_inputs(chunks: list[ScheduledChunk], blocks: BlockManager, device: torch.device) -> StepInputs:
    rows = order_rows(chunks)
    starts = [c.start for c in rows]
    lens = [c.num_tokens for c in rows]
    tokens = list(chain.from_iterable(c.request.token_ids[c.start:c.start + c.num_tokens] for c in rows))
    tables = [blocks.table(c.request.request_id) for c in rows]
    width = max(len(t) for t in tables)
    padded = [t + [0] * (width - len(t)) for t in tables]

    starts_t = torch.tensor(starts, dtype=torch.int64)
    lens_t = torch.tensor(lens, dtype=torch.int64)
    cu = torch.zeros(len(rows) + 1, dtype=torch.int64)
    torch.cumsum(lens_t, 0, out=cu[1:])
    total = int(cu[-1])
    row_of_token = torch.repeat_interleave(torch.arange(len(rows)), lens_t)
    positions = torch.arange(total) - cu[:-1][row_of_token] + starts_t[row_of_token]
    block_tables = torch.tensor(padded, dtype=torch.int32)
    bs = blocks.block_size
    slots = block_tables[row_of_token, positions // bs].long() * bs + positions % bs
    seq_lens = starts_t + lens_t
    sampling = [i for i, c in enumerate(rows) if c.samples]
    sample_rows = cu[1:][sampling] - 1

    num_decodes = sum(1 for n in lens if n == 1)
    meta = AttentionMetadata(
        slot_mapping=slots.to(device, non_blocking=True),
        block_tables=block_tables.to(device, non_blocking=True),
        query_start_loc=cu.to(torch.int32).to(device, non_blocking=True),
        seq_lens=seq_lens.to(torch.int32).to(device, non_blocking=True),
        context_lens=starts_t.to(torch.int32).to(device, non_blocking=True),
        num_decodes=num_decodes,
        max_query_len=max(lens),
        max_seq_len=int(seq_lens.max()),
        block_size=bs,
        query_lens_host=lens,
        seq_lens_host=seq_lens.tolist(),
    )
    return StepInputs(
        input_ids=torch.tensor(tokens, dtype=torch.int64).view(1, -1).to(device, non_blocking=True),
        positions=positions.view(1, -1).to(device, non_blocking=True),
        metadata=meta,
        sample_rows=sample_rows.to(device, non_blocking=True),
        sampling_chunks=[rows[i] for i in sampling],
    )


class ModelRunner:
    def __init__(self, model: torch.nn.Module, kv_cache: KVCache, backend, sampler: Sampler,
                 device: torch.device):
        self.model = model
        self.kv_cache = kv_cache
        self.backend = backend
        self.sampler = sampler
        self.device = device

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def execute(self, plan: StepPlan, blocks: BlockManager) -> tuple[list[tuple[ScheduledChunk, int]], StepTimings]:
        """Run the plan; return (chunk, sampled token id) for every chunk that samples."""
        timings = StepTimings()
        t0 = time.perf_counter()
        inputs = build_inputs(plan.chunks, blocks, self.device)
        t1 = time.perf_counter()
        timings.prepare = t1 - t0
        step = StepContext(inputs.metadata, self.kv_cache, self.backend)
        if inputs.sampling_chunks:
            keep = inputs.sample_rows
        else:
            keep = torch.zeros(1, dtype=torch.int64, device=self.device)  # nothing samples: keep one row
        out = self.model(input_ids=inputs.input_ids, position_ids=inputs.positions, use_cache=False,
                         logits_to_keep=keep, batchdeck_step=step)
        logits = out.logits[0]
        t2 = time.perf_counter()
        timings.forward = t2 - t1
        chunks = inputs.sampling_chunks
        ids = self.sampler.sample(logits[: len(chunks)], [c.request.request_id for c in chunks],
                                  [c.request.sampling for c in chunks])
        timings.sample = time.perf_counter() - t2
        return list(zip(chunks, ids)), timings
