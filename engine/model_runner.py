"""Turns a StepPlan into one flattened forward of the HF model and samples where tokens are due.

Inputs are built with tensor ops from per-request slices (no per-token Python loops):
input_ids [1, T], position_ids [1, T], the attention metadata, and `logits_to_keep` = the last
position of every chunk that samples, so the LM head runs only there.

On CUDA (when the runner is given its limits) the inputs go into the static buffers of
`engine/cuda_graphs.py` instead: one pinned host mirror filled with numpy, one upload (and one of the
block tables when a row's changed), and the
forward is a CUDA-graph replay of the smallest captured bucket that fits (eager on exact-size views
of the same buffers otherwise). The only host sync per iteration is reading the sampled ids.
`build_inputs` stays the CPU path and the reference for `fill_step`.

Overlapped iterations (async scheduling): `launch` enqueues an iteration and returns at once with
its sampled ids still on the device (a non-blocking copy to pinned host memory is under way);
`LaunchedStep.result()` waits for them. The next iteration can be launched before that: a token
the running iteration samples is a placeholder on the host, and the next iteration's input for it
is gathered on the device from the running iteration's sampled ids (`feed`), never read by the host.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from itertools import chain

import numpy as np
import torch

from batchdeck.engine.attention.metadata import AttentionMetadata, StepContext
from batchdeck.engine.cuda_graphs import CudaGraphRunner, GraphHit, StepBuffers
from batchdeck.engine.block_manager import BlockManager
from batchdeck.engine.greedy_argmax import greedy_argmax
from batchdeck.engine.kv_cache import KVCache
from batchdeck.engine.sampler import Sampler, TopLogprobs, host_to_device
from batchdeck.engine.speculative.verify import verify_chunks
from batchdeck.engine.step_plan import ScheduledChunk, StepPlan


# Speculating iterations (drafts verified, prefill chunks beside them) up to this many tokens replay
# CUDA graphs that keep logits at every token; larger ones run eagerly. Speculation pays at small
# batches, and each bucket's logits stay allocated ([tokens, vocab] per bucket).
VERIFY_GRAPH_TOKENS = 512


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [1, T]
    positions: torch.Tensor  # [1, T]
    metadata: AttentionMetadata
    sample_rows: torch.Tensor  # [S] flattened index of each sampling chunk's last token (all verified
    sampling_chunks: list[ScheduledChunk]  # positions of a speculating chunk)
    sample_counts: list[int] = field(default_factory=list)  # logits rows per sampling chunk
    rows: list[ScheduledChunk] = field(default_factory=list)  # every chunk, in row order


@dataclass
class StepTimings:
    prepare: float = 0.0
    forward: float = 0.0  # host time to run (CUDA: enqueue) the forward
    sample: float = 0.0  # host time to sample (CUDA: enqueue the sampling and the copy of the ids)
    graph: bool = False  # the forward was a CUDA-graph replay
    # profile_gpu: device time from the input upload to the sampled ids, and when both happened on the
    # device (ms since the runner's first profiled iteration: gaps between iterations are device idle time)
    gpu_ms: float | None = None
    gpu_start_ms: float | None = None
    gpu_end_ms: float | None = None
    gpu_start: object | None = None  # the CUDA timing event recorded before the upload


@dataclass
class LaunchedStep:
    """An iteration enqueued on the device: its sampling chunks (row order) and their sampled ids,
    on the device (`ids`, one per chunk) and, once `result()` read them, on the host (`tokens`)."""

    chunks: list[ScheduledChunk]
    timings: StepTimings
    ids: torch.Tensor | None = None  # None when the tokens were read at launch (speculation) or not sampled here
    tokens: list[list[int]] | None = None
    logprobs: dict[str, float] = field(default_factory=dict)  # request id -> the sampled token's log-probability
    top_logprobs: dict[str, TopLogprobs] = field(default_factory=dict)  # request id -> its most likely tokens
    host_ids: torch.Tensor | None = None  # the ids' non-blocking copy to the host
    done: object | None = None  # a CUDA event recorded after that copy
    gpu_events: tuple | None = None  # (start, end, epoch) CUDA timing events (profile_gpu)

    def index(self) -> dict[int, int]:
        """id(request) -> its row in `ids`: where the next iteration finds the token this one samples."""
        return {id(c.request): i for i, c in enumerate(self.chunks)}

    def result(self) -> list[tuple[ScheduledChunk, list[int]]]:
        """(chunk, new token ids) for every chunk that sampled; waits for the device the first time."""
        if self.tokens is None:  # the host's wait is timed by the engine (its record's sync_wait_time)
            if self.done is not None:
                self.done.synchronize()
            self.tokens = [[t] for t in self.host_ids.tolist()]
        if self.gpu_events is not None and self.timings.gpu_ms is None:
            start, end, epoch = self.gpu_events
            end.synchronize()
            t = self.timings
            t.gpu_ms = start.elapsed_time(end)
            t.gpu_start_ms, t.gpu_end_ms = epoch.elapsed_time(start), epoch.elapsed_time(end)
        return list(zip(self.chunks, self.tokens))


def feed_positions(rows: list[ScheduledChunk], index: dict[int, int]) -> tuple[list[int], list[int]]:
    """(flattened token positions, rows of the previous iteration's sampled ids) for the rows whose
    input includes a token that iteration samples (the placeholder ending the request's tokens)."""
    dst: list[int] = []
    src: list[int] = []
    offset = 0
    for c in rows:
        j = index.get(id(c.request))
        if j is not None:
            at = len(c.request.token_ids) - 1  # the placeholder's position
            if c.start <= at < c.start + c.num_tokens - len(c.draft):
                dst.append(offset + at - c.start)
                src.append(j)
        offset += c.num_tokens
    return dst, src


def feed(input_ids: torch.Tensor, prev_ids: torch.Tensor, dst: list[int], src: list[int]) -> None:
    """input_ids[dst] = prev_ids[src] on the device (`input_ids` flat); one copy when the rows line up."""
    k = len(dst)
    if not k:
        return
    if dst[-1] == k - 1 and src[-1] == k - 1 and dst == src == list(range(k)):
        input_ids[:k].copy_(prev_ids[:k])
        return
    dev = input_ids.device
    input_ids[host_to_device(dst, torch.int64, dev)] = prev_ids[host_to_device(src, torch.int64, dev)]


def warm_feed(device: torch.device) -> None:
    """Run `feed`'s indexed path once, at start-up. Its first call on CUDA (index kernels loaded,
    pinned host memory allocated) took 13-19 ms on an H200 host (`benchmarks/host_stalls.py
    --stacks`), which stalled the first overlapped iteration whose rows did not line up with the
    previous one's: in a replay, the requests that arrived meanwhile waited that long more."""
    feed(torch.zeros(2, dtype=torch.int64, device=device), torch.arange(2, dtype=torch.int64, device=device),
         [0, 1], [1, 0])


def order_rows(chunks: list[ScheduledChunk]) -> list[ScheduledChunk]:
    """Decode rows (one query token) first, as the attention backends expect."""
    return [c for c in chunks if c.num_tokens == 1] + [c for c in chunks if c.num_tokens != 1]


def chunk_tokens(c: ScheduledChunk) -> list[int]:
    """The tokens a chunk feeds: its slice of the request's tokens, then its drafts (if any)."""
    if c.draft:
        return c.request.token_ids[c.start:c.start + c.num_tokens - len(c.draft)] + list(c.draft)
    return c.request.token_ids[c.start:c.start + c.num_tokens]


def longest_first(seq_lens: np.ndarray) -> np.ndarray:
    """The rows by sequence length, longest first, ties in row order (the attention metadata's
    `row_order`: started first, the long rows' programs no longer finish last)."""
    return np.argsort(-np.asarray(seq_lens, dtype=np.int64), kind="stable")


def sample_entries(ends: np.ndarray, counts: list[int]) -> np.ndarray:
    """Flattened token indices whose logits are kept: the last `counts[i]` positions before `ends[i]`
    (one for a chunk that samples, k + 1 for a speculating chunk)."""
    if len(counts) == sum(counts):
        return ends - 1
    return np.concatenate([np.arange(end - k, end) for end, k in zip(ends.tolist(), counts)])


def paged_inputs(request_ids: list[str], starts: list[int], row_tokens: list[list[int]], blocks: BlockManager,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
    """input_ids [1, T], positions [1, T], attention metadata and the row boundaries (cu, on the host)
    for rows of new tokens `row_tokens[i]` at positions starting at `starts[i]` (decode rows first)."""
    lens = [len(t) for t in row_tokens]
    tables = [blocks.table(rid) for rid in request_ids]
    width = max(len(t) for t in tables)
    padded = [t + [0] * (width - len(t)) for t in tables]

    starts_t = torch.tensor(starts, dtype=torch.int64)
    lens_t = torch.tensor(lens, dtype=torch.int64)
    cu = torch.zeros(len(lens) + 1, dtype=torch.int64)
    torch.cumsum(lens_t, 0, out=cu[1:])
    total = int(cu[-1])
    row_of_token = torch.repeat_interleave(torch.arange(len(lens)), lens_t)
    positions = torch.arange(total) - cu[:-1][row_of_token] + starts_t[row_of_token]
    block_tables = torch.tensor(padded, dtype=torch.int32)
    bs = blocks.block_size
    slots = block_tables[row_of_token, positions // bs].long() * bs + positions % bs
    seq_lens = starts_t + lens_t
    meta = AttentionMetadata(
        slot_mapping=slots.to(device, non_blocking=True),
        block_tables=block_tables.to(device, non_blocking=True),
        query_start_loc=cu.to(torch.int32).to(device, non_blocking=True),
        seq_lens=seq_lens.to(torch.int32).to(device, non_blocking=True),
        context_lens=starts_t.to(torch.int32).to(device, non_blocking=True),
        num_decodes=sum(1 for n in lens if n == 1),
        max_query_len=max(lens),
        max_seq_len=int(seq_lens.max()),
        block_size=bs,
        query_lens_host=lens,
        seq_lens_host=seq_lens.tolist(),
        row_order=torch.from_numpy(longest_first(seq_lens.numpy())).to(torch.int32).to(device, non_blocking=True),
    )
    input_ids = torch.tensor(list(chain.from_iterable(row_tokens)), dtype=torch.int64).view(1, -1)
    return input_ids.to(device, non_blocking=True), positions.view(1, -1).to(device, non_blocking=True), meta, cu


def build_inputs(chunks: list[ScheduledChunk], blocks: BlockManager, device: torch.device) -> StepInputs:
    rows = order_rows(chunks)
    input_ids, positions, meta, cu = paged_inputs([c.request.request_id for c in rows], [c.start for c in rows],
                                                  [chunk_tokens(c) for c in rows], blocks, device)
    sampling = [i for i, c in enumerate(rows) if c.samples]
    sample_counts = [1 + len(rows[i].draft) for i in sampling]
    sample_rows = torch.from_numpy(sample_entries(cu[1:].numpy()[sampling], sample_counts))
    return StepInputs(
        input_ids=input_ids,
        positions=positions,
        metadata=meta,
        sample_rows=sample_rows.to(device, non_blocking=True),
        sampling_chunks=[rows[i] for i in sampling],
        sample_counts=sample_counts,
        rows=rows,
    )


class HostTables:
    """Keeps the host block-table mirror up to date row by row, writing only what changed.

    In steady decoding every row holds the same request as in the previous iteration and its table
    grew by at most one block, so a row costs a few comparisons instead of a full copy. A row is
    rewritten whole when its request, the table list object, or the table's last known entry changed
    (preemption or rollback).
    """

    def __init__(self, width: int, max_rows: int):
        self.width = width
        self.rid: list[str | None] = [None] * max_rows
        self.obj: list[list[int] | None] = [None] * max_rows
        self.n = [0] * max_rows

    def fill(self, bt: np.ndarray, rows: list[ScheduledChunk], blocks: BlockManager
             ) -> tuple[list[str], tuple[int, int] | None]:
        """(the rows' request ids, the rows [lo, hi) of `bt` written, None when none was)."""
        tables = blocks.tables
        rid_at, obj_at, n_at = self.rid, self.obj, self.n
        row_ids = []
        lo = hi = -1
        for i, c in enumerate(rows):
            rid = c.request.request_id
            row_ids.append(rid)
            tab = tables.get(rid)
            if tab is None:
                rid_at[i] = None
                continue
            n, m = len(tab), n_at[i]
            if rid_at[i] == rid and obj_at[i] is tab and m <= n and (m == 0 or bt[i, m - 1] == tab[m - 1]):
                if n == m:
                    continue
                bt[i, m:n] = tab[m:n]
            else:
                bt[i, :n] = tab
                rid_at[i] = rid
                obj_at[i] = tab
            n_at[i] = n
            if lo < 0:
                lo = i
            hi = i
        return row_ids, (None if lo < 0 else (lo, hi + 1))


@dataclass
class PreparedStep:
    num_tokens: int
    num_rows: int
    decode_only: bool
    sampling_chunks: list[ScheduledChunk]
    query_lens: list[int]
    seq_lens: list[int]
    num_decodes: int
    row_ids: list[str] = field(default_factory=list)
    sample_counts: list[int] = field(default_factory=list)  # logits rows per sampling chunk (k + 1 when speculating)
    rows: list[ScheduledChunk] = field(default_factory=list)  # every chunk, in row order
    graph: GraphHit | None = None  # the captured bucket it fits, or None: eager
    sampling_rows: list[int] = field(default_factory=list)  # the rows of `sampling_chunks`
    table_rows: tuple[int, int] | None = None  # the rows [lo, hi) whose block tables were written (to upload)

    @property
    def num_samples(self) -> int:
        return sum(self.sample_counts)


def fill_step(buf: StepBuffers, chunks: list[ScheduledChunk], blocks: BlockManager, tables: HostTables,
              graphs: CudaGraphRunner | None = None) -> PreparedStep:
    """Write one iteration's inputs into the host mirror `buf` (rows [0, R), tokens [0, T)), laid out
    for the captured bucket that fits it and padded to it (`graphs`; `PreparedStep.graph` is its
    lookup), else for its own token count.

    Same values as `build_inputs`; sample entries past the last one (up to R) are 0. A speculating
    chunk's drafted tokens follow its last token and every position it verifies is a sample entry,
    so an iteration with drafts may have more sample entries than rows (at most one per token).
    """
    rows = order_rows(chunks)
    r = len(rows)
    lens = [c.num_tokens for c in rows]
    starts = [c.start for c in rows]
    t = sum(lens)
    decode_only = t == r
    sampling = [i for i, c in enumerate(rows) if c.samples]
    counts = [1 + len(rows[i].draft) for i in sampling]
    s = sum(counts)
    hit = graphs.lookup(t, r, decode_only, s) if graphs is not None else None
    if hit is None:
        buf.layout(t, max(s, 1), r)
    else:
        buf.layout(hit.tokens, len(hit.logits), hit.rows)
    if decode_only:
        buf.ids[:t] = [c.request.token_ids[c.start] for c in rows]
    else:
        buf.ids[:t] = list(chain.from_iterable(chunk_tokens(c) for c in rows))
    starts_np = np.asarray(starts, dtype=np.int64)
    lens_np = np.asarray(lens, dtype=np.int64)
    cu = np.zeros(r + 1, dtype=np.int64)
    np.cumsum(lens_np, out=cu[1:])
    if decode_only:
        row_of_token = np.arange(r)
        positions = starts_np
    else:
        row_of_token = np.repeat(np.arange(r), lens_np)
        positions = np.arange(t) - (cu[:-1] - starts_np)[row_of_token]
    bt = buf.bt
    row_ids, table_rows = tables.fill(bt, rows, blocks)
    bs = blocks.block_size
    buf.pos[:t] = positions
    buf.slots[:t] = bt[row_of_token, positions // bs].astype(np.int64) * bs + positions % bs
    seq = starts_np + lens_np
    buf.qsl[:r + 1] = cu
    buf.seq[:r] = seq
    buf.ctx[:r] = starts_np
    buf.order[:r] = longest_first(seq)
    buf.sample[:s] = sample_entries(cu[1:][sampling], counts)
    buf.sample[s:r] = 0
    if hit is not None:
        buf.pad(t, r, hit.tokens, hit.rows, samples=s, kept=len(hit.logits))
    return PreparedStep(t, r, decode_only, [rows[i] for i in sampling], lens, seq.tolist(),
                        sum(1 for n in lens if n == 1), row_ids, counts, rows, hit, sampling, table_rows)


class ModelRunner:
    def __init__(self, model: torch.nn.Module, kv_cache: KVCache, backend, sampler: Sampler,
                 device: torch.device, *, max_rows: int | None = None, max_tokens: int | None = None,
                 max_model_len: int | None = None, cuda_graphs: bool = False, profile_gpu: bool = False,
                 spec_k_limit: int = 0):
        """On CUDA, `max_rows`/`max_tokens`/`max_model_len` size the static step buffers (the live-config
        bounds); with `cuda_graphs` (and a graph-safe backend) every bucket is captured here, at start,
        including, when `spec_k_limit` > 0, the buckets that verify up to that many drafts per row."""
        self.model = model
        self.kv_cache = kv_cache
        self.backend = backend
        self.sampler = sampler
        self.device = device
        self.profile_gpu = profile_gpu
        self._gpu_epoch = None  # the first profiled iteration's start event (profile_gpu)
        self.buffers: StepBuffers | None = None
        self.graphs: CudaGraphRunner | None = None
        self.tables: HostTables | None = None
        self.fused: dict[str, int] = {}
        if device.type == "cuda" and getattr(backend, "graph_safe", False):
            from batchdeck.engine.triton_fused import fuse_model

            self.fused = fuse_model(model)  # fewer kernels per layer (BATCHDECK_FUSED=0: stock modules)
        if device.type == "cuda" and max_rows and max_tokens and max_model_len:
            width = -(-max_model_len // kv_cache.block_size)
            self.buffers = StepBuffers(max_tokens, max_rows, width, device)
            # written by no iteration yet: its first fill writes every row over what graph capture left
            self.tables = HostTables(width, max_rows)
            self.max_model_len = max_model_len
            if cuda_graphs and getattr(backend, "graph_safe", False):
                verify_tokens = min(max_tokens, VERIFY_GRAPH_TOKENS) if spec_k_limit else 0
                self.graphs = CudaGraphRunner(self._graph_forward, self.buffers, kv_cache.block_size,
                                              max_model_len, max_rows, max_tokens, verify_tokens)
                try:
                    self.graphs.capture()
                except Exception as exc:  # noqa: BLE001 - a fused kernel that fails to build: stock modules
                    if not any(self.fused.values()):
                        raise
                    from batchdeck.engine.triton_fused import unfuse_model

                    unfuse_model(model)
                    self.fused = {"failed": repr(exc)[:500]}
                    self.graphs = CudaGraphRunner(self._graph_forward, self.buffers, kv_cache.block_size,
                                                  max_model_len, max_rows, max_tokens, verify_tokens)
                    self.graphs.capture()
        warm_feed(device)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- CUDA: static buffers, graphs -----------------------------------------------------------
    def _model_logits(self, ids, pos, meta, keep) -> torch.Tensor:
        step = StepContext(meta, self.kv_cache, self.backend)
        out = self.model(input_ids=ids, position_ids=pos, use_cache=False, logits_to_keep=keep, batchdeck_step=step)
        return out.logits[0]

    def _graph_forward(self, t: int, r: int, max_query_len: int, kept: int) -> torch.Tensor:
        """The captured function: a bucket of t tokens and r rows, logits at `kept` sample entries;
        a decode bucket keeps every row's logits in row order (no gather of the hidden states) and
        their argmax (a greedy batch's tokens, sampled without a launch after the replay)."""
        ids, pos, meta = self.buffers.views(
            t, r, kept, num_decodes=r if max_query_len == 1 else 0, max_query_len=max_query_len,
            max_seq_len=self.max_model_len, block_size=self.kv_cache.block_size,
            query_lens_host=[1] * r, seq_lens_host=[1] * r)
        if max_query_len != 1:
            return self._model_logits(ids, pos, meta, self.buffers.sample_rows(t, kept))
        logits = self._model_logits(ids, pos, meta, 0)  # 0: every row
        return logits, greedy_argmax(logits)

    def _logits_buffers(self, chunks: list[ScheduledChunk], blocks: BlockManager, timings: StepTimings,
                        prev: LaunchedStep | None):
        t0 = time.perf_counter()
        buf = self.buffers
        buf.wait_host_free()
        step = fill_step(buf, chunks, blocks, self.tables, self.graphs)
        dst, src = feed_positions(step.rows, prev.index()) if prev is not None and prev.ids is not None else ((), ())
        t, r = step.num_tokens, step.num_rows
        s = step.num_samples
        hit = step.graph
        greedy = None
        if self.profile_gpu:
            timings.gpu_start = self._gpu_event()
        buf.upload(step.table_rows)
        if dst:
            feed(buf.dev64, prev.ids, dst, src)  # input_ids are the first tokens of dev64
        t1 = time.perf_counter()
        timings.prepare = t1 - t0
        if hit is not None:
            hit.graph.replay()
            if not hit.every_row:
                logits = hit.logits[:s]
            elif s == r:
                logits, greedy = hit.logits[:s], hit.greedy_ids[:s]
            else:  # a decode graph keeps every row; a one-token chunk of a prompt samples nothing
                rows = host_to_device(step.sampling_rows, torch.int64, self.device)
                logits, greedy = hit.logits.index_select(0, rows), hit.greedy_ids.index_select(0, rows)
                self.graphs.stats.row_picks += 1
            timings.graph = True
            self.graphs.stats.replays += 1
        else:
            ids, pos, meta = buf.views(
                t, r, max(s, 1), num_decodes=step.num_decodes, max_query_len=max(step.query_lens),
                max_seq_len=max(step.seq_lens), block_size=blocks.block_size,
                query_lens_host=step.query_lens, seq_lens_host=step.seq_lens)
            logits = self._model_logits(ids, pos, meta, buf.sample_rows(t, max(s, 1)))[:s]
            if self.graphs is not None:
                self.graphs.stats.eager += 1
        timings.forward = time.perf_counter() - t1
        return logits, step.sampling_chunks, step.sample_counts, greedy

    def _logits_eager(self, chunks: list[ScheduledChunk], blocks: BlockManager, timings: StepTimings,
                      prev: LaunchedStep | None):
        t0 = time.perf_counter()
        inputs = build_inputs(chunks, blocks, self.device)
        if prev is not None and prev.ids is not None:
            dst, src = feed_positions(inputs.rows, prev.index())
            feed(inputs.input_ids.view(-1), prev.ids, dst, src)
        t1 = time.perf_counter()
        timings.prepare = t1 - t0
        if self.profile_gpu and self.device.type == "cuda":
            timings.gpu_start = self._gpu_event()
        step = StepContext(inputs.metadata, self.kv_cache, self.backend)
        if inputs.sampling_chunks:
            keep = inputs.sample_rows
        else:
            keep = torch.zeros(1, dtype=torch.int64, device=self.device)  # nothing samples: keep one row
        out = self.model(input_ids=inputs.input_ids, position_ids=inputs.positions, use_cache=False,
                         logits_to_keep=keep, batchdeck_step=step)
        timings.forward = time.perf_counter() - t1
        return out.logits[0][:sum(inputs.sample_counts)], inputs.sampling_chunks, inputs.sample_counts, None

    @torch.inference_mode()
    def logits(self, chunks: list[ScheduledChunk], blocks: BlockManager, timings: StepTimings | None = None,
               prev: LaunchedStep | None = None) -> tuple[torch.Tensor, list[ScheduledChunk], list[int], torch.Tensor | None]:
        """One forward over `chunks`: (logits at every sample entry [sum(counts), V], the sampling
        chunks in row order, logits rows per sampling chunk: 1, or k + 1 for a speculating chunk,
        the argmax of every logits row when the replayed graph computed it, else None).
        `prev`: the iteration still running, whose sampled ids feed the placeholders among the inputs."""
        timings = timings or StepTimings()
        buf = self.buffers
        if buf is not None and sum(c.num_tokens for c in chunks) <= buf.max_tokens and len(chunks) <= buf.max_rows:
            return self._logits_buffers(chunks, blocks, timings, prev)
        return self._logits_eager(chunks, blocks, timings, prev)

    @torch.inference_mode()
    def launch(self, plan: StepPlan, blocks: BlockManager, prev: LaunchedStep | None = None) -> LaunchedStep:
        """Enqueue the plan's forward and sampling; return without waiting for the sampled ids (a
        speculating iteration's verification reads them at once). `prev`: the iteration launched
        before this one, if its sampled ids were not read yet: its placeholders are fed from them."""
        timings = StepTimings()
        logits, chunks, counts, greedy = self.logits(plan.chunks, blocks, timings, prev)
        t2 = time.perf_counter()
        step = LaunchedStep(chunks, timings)
        if len(logits) > len(chunks):
            step.tokens, step.logprobs, step.top_logprobs = verify_chunks(self.sampler, logits, chunks, counts)
            self._gpu_span(step)
        else:
            ids, step.logprobs, step.top_logprobs = self.sampler.sample_ids(
                logits, [c.request.request_id for c in chunks], [c.request.sampling for c in chunks], greedy)
            step.ids = ids
            self._gpu_span(step)
            if self.device.type == "cuda":
                step.host_ids = ids.to("cpu", non_blocking=True)  # into pinned memory
                step.done = torch.cuda.Event()
                step.done.record()
            else:
                step.host_ids = ids
        timings.sample = time.perf_counter() - t2
        return step

    def _gpu_event(self):
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        if self._gpu_epoch is None:
            self._gpu_epoch = event
        return event

    def _gpu_span(self, step: LaunchedStep) -> None:
        """profile_gpu: close the iteration's device span (opened before its upload)."""
        start = step.timings.gpu_start
        if start is not None:
            step.gpu_events = (start, self._gpu_event(), self._gpu_epoch)
            step.timings.gpu_start = None

