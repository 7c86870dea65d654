"""Greedy token choice on the GPU: the argmax of every logits row, in two Triton launches.

torch's argmax over llama-3.1-8b's 128,256-entry rows costs 26-37 us per decode step on an H200 up
to 64 rows (one row: 26 us; qwen3-0.6b's 151,936 entries: 8.5 us), a reduction shape torch
handles poorly. Here each row is cut into `argmax_splits(rows)` slices: program (row,
slice) keeps, per lane, the first maximum of its strided elements and writes the slice's maximum and
its first index; program (row) then picks the first slice holding the row's maximum. Same index as
torch (the first maximal element) for every row without NaN; a NaN counts as +inf (torch returns the
first NaN, so a row holding +inf before a NaN differs). Measured in
benchmarks/results/gpu_argmax_h200.json (`benchmarks/gpu_argmax_bench.py`).
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only install: only the pure split rule is used
    triton = None

ARGMAX_BLOCK = 2048  # elements per lane-step of one program (4 warps)
MAX_ARGMAX_SPLITS = 64
MIN_ARGMAX_SPLITS = 4
# On an H200, logits from DRAM (gpu_argmax_h200.json): 128,256 of them at 64 rows 15.5 us against torch's
# 37.6, at 1 row 2.9 against 26.1; at 256 rows torch's was faster (45.7 against 52.1), so it keeps those.
TRITON_ARGMAX_MAX_ROWS = 64
ARGMAX_PROGRAMS = 1024  # about this many (row, slice) programs: 1 row -> 64 slices, 64 rows -> 16, 256 -> 4


def argmax_splits(rows: int) -> int:
    """Slices per row: a power of two near ARGMAX_PROGRAMS / rows, within [4, 64]: enough programs to
    spread one row over the GPU, few enough at 64 rows that each still reads 8 Ki logits."""
    want = ARGMAX_PROGRAMS // max(1, rows)
    splits = MIN_ARGMAX_SPLITS
    while splits * 2 <= min(want, MAX_ARGMAX_SPLITS):
        splits *= 2
    return splits


if triton is not None:
    from batchdeck.engine.pdl import pdl_launch, pdl_prologue

    @triton.jit(do_not_specialize=["per_split"])
    def _argmax_slices_kernel(X, PART_MAX, PART_IDX, vocab, stride_x, per_split, SPLITS: tl.constexpr,
                              BLOCK: tl.constexpr, USE_PDL: tl.constexpr = False):
        pdl_prologue(USE_PDL)
        row = tl.program_id(0)
        piece = tl.program_id(1)
        lo = piece * per_split
        hi = tl.minimum(lo + per_split, vocab)
        lane = tl.arange(0, BLOCK)
        best = tl.full([BLOCK], float("-inf"), tl.float32)
        best_idx = lo + lane  # a lane that sees only -inf keeps its first index
        base = X + row.to(tl.int64) * stride_x
        for start in range(lo, hi, BLOCK):
            offs = start + lane
            x = tl.load(base + offs, mask=offs < hi, other=float("-inf")).to(tl.float32)
            x = tl.where(x == x, x, float("inf"))  # NaN counts as +inf
            take = x > best  # strictly: a lane keeps its first maximum
            best = tl.where(take, x, best)
            best_idx = tl.where(take, offs, best_idx)
        top = tl.max(best, axis=0)
        first = tl.min(tl.where(best == top, best_idx, 2147483647), axis=0)
        tl.store(PART_MAX + row * SPLITS + piece, top)
        tl.store(PART_IDX + row * SPLITS + piece, first)

    @triton.jit
    def _argmax_merge_kernel(PART_MAX, PART_IDX, OUT, SPLITS: tl.constexpr, USE_PDL: tl.constexpr = False):
        pdl_prologue(USE_PDL)
        row = tl.program_id(0)
        offs = tl.arange(0, SPLITS)
        tops = tl.load(PART_MAX + row * SPLITS + offs)
        firsts = tl.load(PART_IDX + row * SPLITS + offs)
        top = tl.max(tops, axis=0)
        tl.store(OUT + row, tl.min(tl.where(tops == top, firsts, 2147483647), axis=0).to(tl.int64))


def greedy_argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits.argmax(dim=-1) of a CUDA [rows, vocab] tensor, int64 [rows]: the Triton kernels up to
    TRITON_ARGMAX_MAX_ROWS rows, torch's argmax above (where it was as fast or faster)."""
    if logits.shape[0] > TRITON_ARGMAX_MAX_ROWS:
        return logits.argmax(dim=-1)
    return triton_argmax(logits)


def triton_argmax(logits: torch.Tensor) -> torch.Tensor:
    """The two Triton launches at any row count (what `greedy_argmax` runs up to its bound)."""
    rows, vocab = logits.shape
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows == 0:
        return out
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    splits = argmax_splits(rows)
    per_split = triton.cdiv(triton.cdiv(vocab, splits), ARGMAX_BLOCK) * ARGMAX_BLOCK
    part_max = torch.empty((rows, splits), dtype=torch.float32, device=logits.device)
    part_idx = torch.empty((rows, splits), dtype=torch.int32, device=logits.device)
    pdl = pdl_launch(logits.device)
    _argmax_slices_kernel[(rows, splits)](logits, part_max, part_idx, vocab, logits.stride(0), per_split,
                                          SPLITS=splits, BLOCK=ARGMAX_BLOCK, num_warps=4, **pdl)
    _argmax_merge_kernel[(rows,)](part_max, part_idx, out, SPLITS=splits, num_warps=1, **pdl)
    return out
