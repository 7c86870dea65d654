"""Static step buffers and CUDA-graph capture/replay of the whole model forward.

Every CUDA iteration writes its inputs (token ids, positions, slot mapping, sample rows, query
start locations, sequence lengths, block tables) into pinned host mirrors, copies them to static
device buffers, and runs the model on views of those buffers. An iteration's inputs are packed for
its bucket (t tokens, r rows, k sample entries: its own when it runs eagerly) and go up in one copy
of what it reads (a one-row decode step: 48 bytes, not a mirror sized for the largest budget); the
block tables keep their own buffer, uploaded for the rows whose table changed (see `StepBuffers`).
A captured graph reads its bucket's layout, so replaying it serves any iteration that fits the
bucket once the unused tail is padded (padded tokens: slot -1, id 0, position 0; padded rows: no
query tokens, seq_len 0; see engine/attention/triton_kernels.py).

Buckets, captured once at engine start within the live-config bounds:
- decode-only iterations (every row one token): row counts 1, 2, 4, ..., 64, then steps of a quarter
  of the power of two below (32 up to 256, 64 up to 512, ...), and max_rows: few graphs (each costs a
  capture at start), with padding that stays cheap (padded rows skip attention, and at small row
  counts the matmuls cost the weights' read whatever the rows);
- mixed iterations (prefill chunks, with or without decodes): token counts 32, 64, ... up to
  max_tokens (steps of about x1.5), each with room for min(max_rows, tokens) rows, keeping logits
  for one sample entry per row;
- verify iterations (speculative decoding, when enabled): the mixed shapes up to `verify_tokens`
  tokens, keeping logits at every token, since a speculating row samples at each verified position.
An iteration that fits no bucket runs eagerly on exact-size views of the same buffers.
"""
from __future__ import annotations

import gc
import time
import weakref
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from batchdeck.engine.attention.metadata import AttentionMetadata


def decode_buckets(max_rows: int) -> list[int]:
    sizes, n = set(), 1
    while n <= min(64, max_rows):
        sizes.add(n)
        n *= 2
    n = 64
    while n <= max_rows:
        sizes.add(n)
        n += max(32, (1 << (n.bit_length() - 1)) // 4)
    sizes.add(max_rows)
    return sorted(sizes)


def token_buckets(max_tokens: int, smallest: int = 32) -> list[int]:
    sizes, n = set(), smallest
    while n < max_tokens:
        sizes.add(n)
        if n >= 512:
            sizes.add(min(max_tokens, n * 3 // 2))
        n *= 2
    sizes.add(max_tokens)
    return sorted(s for s in sizes if s <= max_tokens)


def pick(buckets: list[int], n: int) -> int | None:
    for b in buckets:
        if b >= n:
            return b
    return None


class StepBuffers:
    """Host (pinned) and device buffers for one iteration's inputs, sized for the largest one.

    The iteration's own inputs, laid out for its bucket (`layout`: t tokens, r rows, k sample entries)
    and uploaded in one copy:
        int64: input_ids [t] | positions [t] | slot_mapping [t] | sample_rows [k]
        int32: query_start_loc [r + 1] | seq_lens [r] | context_lens [r] | row_order [r]
    The block tables [R, MB] (int32) keep a buffer of their own, updated row by row (`HostTables`) and
    uploaded for the rows whose table was written since the last upload (in steady decoding a row's once
    per block_size tokens).
    """

    def __init__(self, max_tokens: int, max_rows: int, max_blocks: int, device: torch.device):
        self.max_tokens, self.max_rows, self.max_blocks = max_tokens, max_rows, max_blocks
        self.device = device
        t, r, mb = max_tokens, max_rows, max_blocks
        n64 = 3 * t + max(t, r)  # at most one sample entry per token (speculating rows have several)
        nbytes = self._offsets(t, max(t, r), r)[1]
        pin = device.type == "cuda"
        self.host = torch.zeros(nbytes, dtype=torch.uint8, pin_memory=pin)
        self.host_bt = torch.zeros(r * mb, dtype=torch.int32, pin_memory=pin)
        self._hbytes = self.host.numpy()
        self.bt = self.host_bt.numpy().reshape(r, mb)
        self.dev = torch.zeros(nbytes, dtype=torch.uint8, device=device)
        self.dev64 = self.dev[:8 * n64].view(torch.int64)  # input_ids are its first tokens
        self.dev_bt = torch.zeros(r * mb, dtype=torch.int32, device=device)
        self._copied = torch.cuda.Event() if device.type == "cuda" else None
        self.layout(t, max(t, r), r)

    @staticmethod
    def _offsets(t: int, k: int, r: int) -> tuple[int, int]:
        """(byte offset of the int32 part, bytes to upload) of the layout for t tokens, k samples, r rows."""
        off = 8 * (3 * t + k)
        return off, off + 4 * (4 * r + 1)

    def layout(self, t: int, k: int, r: int) -> None:
        """Point the host views (`ids`, `pos`, `slots`, `sample`, `qsl`, `seq`, `ctx`, `order`) at the layout
        of an iteration of t tokens, k sample entries and r rows (`views` gives the device the same)."""
        off, end = self._offsets(t, k, r)
        h64, h32 = self._hbytes[:off].view(np.int64), self._hbytes[off:end].view(np.int32)
        self._upload_bytes = end
        self.ids, self.pos, self.slots, self.sample = h64[:t], h64[t:2 * t], h64[2 * t:3 * t], h64[3 * t:]
        self.qsl, self.seq, self.ctx = h32[:r + 1], h32[r + 1:2 * r + 1], h32[2 * r + 1:3 * r + 1]
        self.order = h32[3 * r + 1:]

    def wait_host_free(self) -> None:
        """The previous upload read the pinned mirror asynchronously: wait until it is done."""
        if self._copied is not None:
            self._copied.synchronize()

    def upload(self, table_rows: tuple[int, int] | None) -> None:
        """Copy the current layout's inputs and the block tables of the rows [lo, hi) in `table_rows`
        (those written since the last upload; None: none was)."""
        n = self._upload_bytes
        self.dev[:n].copy_(self.host[:n], non_blocking=True)
        if table_rows is not None:
            a, b = table_rows[0] * self.max_blocks, table_rows[1] * self.max_blocks
            self.dev_bt[a:b].copy_(self.host_bt[a:b], non_blocking=True)
        if self._copied is not None:
            self._copied.record()

    def pad(self, t: int, r: int, tb: int, rb: int, samples: int = 0, kept: int | None = None) -> None:
        """Make tokens [t, tb) and rows [r, rb) inert (see the module docstring); sample entries
        from max(r, samples) up to the bucket's `kept` (default rb) point at token 0."""
        if tb > t:
            self.ids[t:tb] = 0
            self.pos[t:tb] = 0
            self.slots[t:tb] = -1
        if rb > r:
            self.qsl[r + 1:rb + 1] = self.qsl[r]
            self.seq[r:rb] = 0
            self.ctx[r:rb] = 0
            self.order[r:rb] = np.arange(r, rb)  # after the real rows: their programs exit at once
        kept = rb if kept is None else kept
        if kept > max(r, samples):
            self.sample[max(r, samples):kept] = 0

    def sample_rows(self, t: int, k: int) -> torch.Tensor:
        """The k sample entries on the device, in the layout of t tokens (a speculating iteration may
        need more than its rows)."""
        return self.dev64[3 * t:3 * t + k]

    def views(self, t: int, r: int, k: int, *, num_decodes: int, max_query_len: int, max_seq_len: int,
              block_size: int, query_lens_host: list[int], seq_lens_host: list[int]):
        """(input_ids [1, t], positions [1, t], metadata over r rows) on the device, in the layout of
        t tokens, k sample entries and r rows; the sample entries are `sample_rows(t, k)`."""
        off, end = self._offsets(t, k, r)
        d64, d32 = self.dev64, self.dev[off:end].view(torch.int32)
        meta = AttentionMetadata(
            slot_mapping=d64[2 * t:3 * t],
            block_tables=self.dev_bt.view(self.max_rows, self.max_blocks)[:r],
            query_start_loc=d32[:r + 1],
            seq_lens=d32[r + 1:2 * r + 1],
            context_lens=d32[2 * r + 1:3 * r + 1],
            row_order=d32[3 * r + 1:4 * r + 1],
            num_decodes=num_decodes, max_query_len=max_query_len, max_seq_len=max_seq_len,
            block_size=block_size, query_lens_host=query_lens_host, seq_lens_host=seq_lens_host,
        )
        return d64[:t].view(1, t), d64[t:2 * t].view(1, t), meta


def _capture(graph: torch.cuda.CUDAGraph, pool, stream: torch.cuda.Stream, fn):
    """Capture fn() on `stream` into `graph` (allocations from the shared `pool`); returns fn()'s output.

    What `torch.cuda.graph` does, less its per-capture device sync and `empty_cache` (the warm-up
    ran on this same stream, so the capture is ordered after it; freeing and re-allocating the warm-ups'
    cached memory before each of dozens of captures only costs time)."""
    with torch.cuda.stream(stream):
        graph.capture_begin(pool=pool)
        try:
            out = fn()
        finally:
            graph.capture_end()
    return out


class GraphHit(NamedTuple):
    """A captured bucket an iteration fits: replay `graph`, then read `logits` [kept, V]."""

    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor
    tokens: int  # the bucket's tokens (the layout its inputs take) and rows
    rows: int
    every_row: bool  # a decode bucket: logits of every row in row order, not of the sample entries
    greedy_ids: torch.Tensor | None = None  # the argmax of every row of `logits`, computed in the graph


@dataclass
class GraphStats:
    captured: list[tuple[str, int, int]] = field(default_factory=list)  # (kind, tokens, rows)
    capture_seconds: float = 0.0
    # (kind, tokens, host seconds of the warm-up forward, host seconds of the capture), in capture order
    per_bucket: list[tuple[str, int, float, float]] = field(default_factory=list)
    # (kind, tokens, seconds of the bucket's first replay, synced), in capture order: taken at start-up
    # by `replay_each`, so no iteration pays a graph's first launch
    first_replays: list[tuple[str, int, float]] = field(default_factory=list)
    replays: int = 0
    eager: int = 0
    row_picks: int = 0  # decode-graph replays where some row sampled nothing (its logits were left out)


class CudaGraphRunner:
    """Captures `forward(t, r, max_query_len, kept) -> logits [kept, V]` (or (logits, their argmax per
    row)) per bucket and replays it."""

    def __init__(self, forward, buffers: StepBuffers, block_size: int, max_model_len: int,
                 max_rows: int, max_tokens: int, verify_tokens: int = 0):
        # A weak reference: the runner owns this object, and a cycle would leave dropped engines (and
        # their KV pools) to the cyclic collector.
        self._forward = weakref.WeakMethod(forward) if hasattr(forward, "__self__") else (lambda: forward)
        self.buffers = buffers
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.decode_sizes = decode_buckets(min(max_rows, max_tokens))
        self.token_sizes = token_buckets(max_tokens)
        self.verify_sizes = token_buckets(verify_tokens) if verify_tokens else []
        self.max_rows = max_rows
        self.graphs: dict[tuple[str, int], GraphHit] = {}  # (kind, tokens) -> the captured bucket
        self.stats = GraphStats()

    def rows_for(self, tokens: int) -> int:
        return min(self.max_rows, tokens)

    def lookup(self, t: int, r: int, decode_only: bool, samples: int | None = None) -> GraphHit | None:
        """The smallest bucket that fits t tokens, r rows and `samples` sample entries (default r), or None."""
        samples = r if samples is None else samples
        if decode_only:
            b = pick(self.decode_sizes, r)
            hit = self.graphs.get(("decode", b)) if b is not None else None
            if hit is not None:
                return hit
        if samples <= r:
            for tb in self.token_sizes:
                if tb >= t and self.rows_for(tb) >= r and ("mixed", tb) in self.graphs:
                    return self.graphs[("mixed", tb)]
        for tb in self.verify_sizes:
            if tb >= t and self.rows_for(tb) >= r and ("verify", tb) in self.graphs:
                return self.graphs[("verify", tb)]
        return None

    def _dummy(self, tb: int, rb: int, kept: int) -> bool:
        """Fill the host mirror with a valid iteration of tb tokens over rb rows (no K/V writes)."""
        buf = self.buffers
        buf.wait_host_free()  # the previous bucket's upload may still be reading the pinned mirror
        buf.layout(tb, kept, rb)
        qlens = np.full(rb, tb // rb, dtype=np.int64)
        qlens[: tb % rb] += 1
        if qlens.max() > self.max_model_len:
            return False
        buf.qsl[0] = 0
        buf.qsl[1:rb + 1] = np.cumsum(qlens)
        buf.seq[:rb] = qlens
        buf.ctx[:rb] = 0
        buf.order[:rb] = np.arange(rb)  # not stale bytes of another layout: the decode launch reads rows by it
        buf.bt[:rb] = 0
        buf.ids[:tb] = 0
        buf.pos[:tb] = 0
        buf.slots[:tb] = -1
        buf.sample[:kept] = np.cumsum(qlens) - 1 if kept == rb else np.arange(kept)
        buf.upload((0, rb))
        return True

    @torch.inference_mode()
    def replay_each(self) -> list[tuple[str, int, float]]:
        """Replay every captured graph once on dummy inputs (no K/V writes), each synced, in capture
        order; returns (kind, tokens, seconds) per graph. A graph's first launch costs more than a later
        one (0.1-0.6 ms, median 0.46, on an H200: `benchmarks/gpu_graph_first_replay.py`), so capture
        calls this once and no iteration pays it on its bucket's first use. Only before the engine's
        first iteration: it overwrites the step inputs and the block tables of rows the host mirror
        (`HostTables`) counts as already on the device."""
        times = []
        for (kind, tokens), hit in self.graphs.items():  # in capture order
            self._dummy(hit.tokens, hit.rows, len(hit.logits))  # the layout it was captured in
            torch.cuda.synchronize()
            t = time.perf_counter()
            hit.graph.replay()
            torch.cuda.synchronize()
            times.append((kind, tokens, time.perf_counter() - t))
        return times

    @torch.inference_mode()
    def capture(self, log=None) -> None:
        # A CUDA graph (e.g. of an engine dropped earlier in this process) destroyed by the cyclic
        # garbage collector in the middle of a capture invalidates the capture: collect now, and
        # keep the collector off until every bucket is captured.
        gc.collect()
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            self._capture_all(log)
        finally:
            if gc_was_enabled:
                gc.enable()

    def _capture_all(self, log) -> None:
        t0 = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        plans = [("mixed", tb, self.rows_for(tb)) for tb in self.token_sizes]
        plans += [("verify", tb, self.rows_for(tb)) for tb in self.verify_sizes]
        plans += [("decode", b, b) for b in self.decode_sizes]
        plans.sort(key=lambda p: (-p[1], p[0]))  # largest first: later graphs reuse the pool
        stream = torch.cuda.Stream()
        for kind, tb, rb in plans:
            decode = kind == "decode"
            kept = tb if kind == "verify" else rb
            if not self._dummy(tb, rb, kept):
                continue
            mql = 1 if decode else tb
            t_warm = time.perf_counter()
            stream.wait_stream(torch.cuda.current_stream())
            forward = self._forward()
            with torch.cuda.stream(stream):
                forward(tb, rb, mql, kept)  # compiles kernels, warms allocator and cuBLAS
            torch.cuda.current_stream().wait_stream(stream)
            t_capture = time.perf_counter()
            graph = torch.cuda.CUDAGraph()
            out = _capture(graph, pool, stream, lambda: forward(tb, rb, mql, kept))
            logits, greedy = out if isinstance(out, tuple) else (out, None)
            self.graphs[(kind, tb)] = GraphHit(graph, logits, tb, rb, decode, greedy)
            self.stats.captured.append((kind, tb, rb))
            self.stats.per_bucket.append((kind, tb, t_capture - t_warm, time.perf_counter() - t_capture))
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # what the warm-ups left cached
        self.stats.capture_seconds = time.perf_counter() - t0
        self.stats.first_replays = self.replay_each()
        if log is not None:
            replays = sum(s for _, _, s in self.stats.first_replays)
            log(f"captured {len(self.graphs)} CUDA graphs in {self.stats.capture_seconds:.1f}s "
                f"(and replayed each once in {replays:.2f}s)")
