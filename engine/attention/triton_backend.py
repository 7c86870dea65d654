"""The CUDA attention backend: Triton kernels for the K/V write and paged attention.

`forward` launches depend only on tensor shapes (tokens T, rows R, block-table width) and on
whether the iteration is decode-only (`meta.max_query_len == 1`), never on host lists, so the
launches can be captured in CUDA graphs and replayed for any iteration that fits the buffers
(see engine/attention/triton_kernels.py for the padding conventions).

A decode-only iteration is one launch of the DECODE mode (one program per row and KV head). A
mixed iteration is two launches: DECODE for its one-token rows and TILES for its prefill chunks.
When rows x KV heads are too few to fill the GPU (small batches), the one-token rows run split-KV
instead: `decode_splits` programs per (row, KV head) each attend a slice of the keys, and a second
launch merges the slices' partial softmaxes (the split count depends only on the row count, so a
captured graph keeps it). The unsplit decode launch starts its rows longest first (the metadata's
`row_order`): the GPU then schedules the programs longest-processing-time first, and no long row's
programs are left running alone at the end. A launch of at most FEW_WAVES_DECODE_PROGRAMS programs
(rows x KV heads) takes a tile that fits one program per SM, larger ones a two-per-SM tile. Tile
sizes can be overridden for tuning with BATCHDECK_ATTN_DECODE="BLOCK_N,warps,stages"
(BATCHDECK_ATTN_DECODE_FEW for the launches of few programs, BATCHDECK_ATTN_DECODE_SPLIT for the
split-KV launch) and BATCHDECK_ATTN_PREFILL="BLOCK_M,BLOCK_N,warps,stages";
BATCHDECK_ATTN_MAX_SPLITS caps the split count (1: never split).
"""
from __future__ import annotations

import os

import torch

from batchdeck.engine.attention.decode_splits import MAX_DECODE_SPLITS, decode_splits
from batchdeck.engine.attention.metadata import AttentionMetadata
from batchdeck.engine.pdl import pdl_launch
from batchdeck.engine.attention.triton_kernels import (decode_split_combine_kernel, paged_attention_kernel,
                                                       paged_decode_split_kernel, write_kv_kernel)

LOG2E = 1.4426950408889634
# The TILES launch finds each tile's row among ROWS_P2 >= rows entries: one value up to 256 rows keeps
# every mixed bucket on one compiled variant (each new variant is a Triton compile at start-up).
MIN_ROWS_P2 = 256
# Unsplit decode launches of at most this many programs take the one-per-SM tile. On an H200, longest
# first, contexts 228-1280 (benchmarks/results/gpu_attention_decode_order_h200.json): 64 rows x 8 KV
# heads 55.2 us a layer with it against 67.9 with 64,2,3 (61.0 in row order); 128 x 8 a tie (100.2 and
# 99.9); 256 x 8 193.7 against 189.5 (198.2 in row order).
FEW_WAVES_DECODE_PROGRAMS = 1024


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _env_ints(name: str, default: tuple[int, ...]) -> tuple[int, ...]:
    raw = os.environ.get(name)
    if not raw:
        return default
    vals = tuple(int(x) for x in raw.split(","))
    if len(vals) != len(default):
        raise ValueError(f"{name}={raw!r}: expected {len(default)} comma-separated integers")
    return vals


class TritonBackend:
    name = "triton"
    graph_safe = True  # launches depend on shapes only: CUDA graphs may capture them

    def __init__(self) -> None:
        # BLOCK_N, warps, stages. Unsplit decode: two warps, three stages, on an H200 the fastest tile for
        # llama-3.1-8b at 64 rows (8% over 64,4,2) and within 0.1% of the fastest for qwen3-0.6b at 256
        # (benchmarks/results/gpu_attention_*_h200.json). Split-KV decode (a few rows) keeps 64,4,2: 64,2,3
        # showed no gain there (qwen3-0.6b's batch-1 step 1.006 ms against 0.993, batch 8 1.375 against
        # 1.382, one run each: gpu_decode_sweep_*_split_tile*.json).
        self.decode_cfg = _env_ints("BATCHDECK_ATTN_DECODE", (64, 2, 3))
        # Few programs: 128 keys, four warps, three stages (192 KiB of shared memory in bf16: one program
        # per SM), fastest at 64 rows of both shapes.
        self.few_waves_cfg = _env_ints("BATCHDECK_ATTN_DECODE_FEW", (128, 4, 3))
        self.few_waves_programs = FEW_WAVES_DECODE_PROGRAMS
        self.split_cfg = _env_ints("BATCHDECK_ATTN_DECODE_SPLIT", (64, 4, 2))
        # BLOCK_M, BLOCK_N, warps, stages: 64,32,4,2 the fastest of 16 tiles for both shapes' offline prefill
        # iteration on an H200 (llama-3.1-8b 220 us a layer, against 246 for the previous 64,64,4,3).
        self.prefill_cfg = _env_ints("BATCHDECK_ATTN_PREFILL", (64, 32, 4, 2))
        self.shrink_fp32_tiles = True  # float32 tiles are twice the bytes: keep shared memory in bounds
        cap = _env_ints("BATCHDECK_ATTN_MAX_SPLITS", (MAX_DECODE_SPLITS,))[0]
        self.max_splits = min(MAX_DECODE_SPLITS, max(1, cap))
        self.num_sms: int | None = None  # of the device attention runs on (read at the first call)

    def write_kv(self, key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
        t, kvh, d = key.shape
        if t == 0:
            return
        if key.stride(-1) != 1:
            key = key.contiguous()
        if value.stride(-1) != 1:
            value = value.contiguous()
        # The pool is [num_blocks, block_size, KVH, D], contiguous: slot stride = KVH * D.
        pdl = pdl_launch(key.device)
        write_kv_kernel[(t,)](
            key, value, k_cache, v_cache, slot_mapping,
            key.stride(0), key.stride(1), value.stride(0), value.stride(1), k_cache.stride(1), k_cache.stride(2),
            KVH=kvh, D=d, BLOCK_H=_pow2(kvh), BLOCK_D=_pow2(max(d, 16)), **pdl,
        )

    def forward(self, query, key, value, k_cache, v_cache, meta: AttentionMetadata, scaling: float,
                sliding_window: int | None) -> torch.Tensor:
        if query.stride(-1) != 1:
            query = query.contiguous()
        self.write_kv(key, value, k_cache, v_cache, meta.slot_mapping)
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
        self.attend(query, k_cache, v_cache, out, meta.block_tables, meta.query_start_loc, meta.seq_lens,
                    scaling, sliding_window, decode_only=meta.max_query_len == 1, row_order=meta.row_order)
        return out

    def attend(self, query, k_cache, v_cache, out, block_tables, query_start_loc, seq_lens, scaling: float,
               sliding_window: int | None, decode_only: bool, row_order: torch.Tensor | None = None) -> None:
        """Attention of `query` over the paged cache into `out`. `row_order` (int32 [rows], optional): the
        rows longest first, the order the unsplit decode launch starts them in (None: row order)."""
        t, num_heads, d = query.shape
        rows = block_tables.shape[0]
        if t == 0 or rows == 0:
            return
        kvh = k_cache.shape[2]
        group = num_heads // kvh
        gp = _pow2(group)
        block_d = _pow2(max(d, 16))
        ieee = query.dtype == torch.float32
        use_window = sliding_window is not None and sliding_window > 0
        pdl = pdl_launch(query.device)
        common = dict(
            G=group, GP=gp, D=d, BLOCK_D=block_d, BS=k_cache.shape[1], USE_WINDOW=use_window, IEEE=ieee,
            **pdl,
        )
        args = (query, k_cache, v_cache, out, block_tables, query_start_loc, seq_lens,
                row_order if row_order is not None else seq_lens,  # (a pointer only read when ordered)
                float(scaling) * LOG2E, int(sliding_window or 0), rows, kvh,
                query.stride(0), query.stride(1), out.stride(0), out.stride(1),
                k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0))
        # Decode rows (and one-token chunks): one program per (row, kv head), or per slice of its keys.
        if self.num_sms is None:
            self.num_sms = (torch.cuda.get_device_properties(query.device).multi_processor_count
                            if query.is_cuda else 128)
        splits = decode_splits(rows, kvh, self.num_sms, self.max_splits)
        if splits > 1:
            block_n, warps, stages = self.split_cfg
        elif rows * kvh <= self.few_waves_programs:
            block_n, warps, stages = self.few_waves_cfg
        else:
            block_n, warps, stages = self.decode_cfg
        if ieee and self.shrink_fp32_tiles:
            block_n, stages = min(block_n, 32), min(stages, 2)
        if splits > 1:
            self._decode_split(query, k_cache, v_cache, out, block_tables, query_start_loc, seq_lens, scaling,
                               sliding_window, splits, block_n, warps, stages, common)
        else:
            paged_attention_kernel[(rows * kvh,)](
                *args, BLOCK_Q=1, BLOCK_M=max(16, gp), BLOCK_N=block_n, ROWS_P2=1, DECODE=True,
                USE_ORDER=row_order is not None,
                num_warps=warps, num_stages=stages, **common,
            )
        if decode_only:
            return
        block_m, block_n, warps, stages = self.prefill_cfg
        if ieee and self.shrink_fp32_tiles:
            block_m, block_n, stages = min(block_m, 32), min(block_n, 32), min(stages, 2)
        block_m = max(block_m, gp, 16)
        block_q = block_m // gp
        grid = (t // block_q + rows, kvh)
        paged_attention_kernel[grid](
            *args, BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=block_n, ROWS_P2=max(_pow2(rows), MIN_ROWS_P2),
            DECODE=False, USE_ORDER=False,
            num_warps=warps, num_stages=stages, **common,
        )

    @staticmethod
    def _decode_split(query, k_cache, v_cache, out, block_tables, query_start_loc, seq_lens, scaling: float,
                      sliding_window: int | None, splits: int, block_n: int, warps: int, stages: int,
                      common: dict) -> None:
        rows = block_tables.shape[0]
        num_heads, d = query.shape[1], query.shape[2]
        kvh = k_cache.shape[2]
        m_part = torch.empty((rows, num_heads, splits), dtype=torch.float32, device=query.device)
        l_part = torch.empty_like(m_part)
        acc_part = torch.empty((rows, num_heads, splits, d), dtype=torch.float32, device=query.device)
        paged_decode_split_kernel[(rows, kvh, splits)](
            query, k_cache, v_cache, m_part, l_part, acc_part, block_tables, query_start_loc, seq_lens,
            float(scaling) * LOG2E, int(sliding_window or 0), splits,
            query.stride(0), query.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            block_tables.stride(0), m_part.stride(0), m_part.stride(1),
            G=common["G"], GP=common["GP"], D=d, BLOCK_D=common["BLOCK_D"], BS=common["BS"],
            BLOCK_M=max(16, common["GP"]), BLOCK_N=block_n, USE_WINDOW=common["USE_WINDOW"],
            IEEE=common["IEEE"], num_warps=warps, num_stages=stages, **pdl_launch(query.device),
        )
        decode_split_combine_kernel[(rows, num_heads)](
            out, m_part, l_part, acc_part, query_start_loc, splits, out.stride(0), out.stride(1),
            m_part.stride(0), m_part.stride(1), D=d, BLOCK_D=common["BLOCK_D"], MAX_SPLITS=MAX_DECODE_SPLITS,
            **pdl_launch(query.device),
        )
