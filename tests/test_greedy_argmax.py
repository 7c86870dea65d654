"""The decode graphs' greedy argmax (engine/greedy_argmax.py): its slice rule on any machine, and on a
CUDA machine the same index as torch's argmax (the first maximal element) for every row shape the
engine meets, ties and all -inf rows included."""
from __future__ import annotations

import pytest
import torch

from batchdeck.engine.greedy_argmax import MAX_ARGMAX_SPLITS, MIN_ARGMAX_SPLITS, argmax_splits


def test_slices_per_row_follow_the_row_count():
    assert [argmax_splits(r) for r in (0, 1, 8, 16, 64, 128, 256, 1024)] == [64, 64, 64, 64, 16, 8, 4, 4]
    for rows in range(1, 600):
        n = argmax_splits(rows)
        assert MIN_ARGMAX_SPLITS <= n <= MAX_ARGMAX_SPLITS and n & (n - 1) == 0


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("vocab", [128256, 151936, 1000, 2049])
@pytest.mark.parametrize("rows", [1, 7, 64, 300])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_matches_torch_argmax(vocab, rows, dtype):
    from batchdeck.engine.greedy_argmax import greedy_argmax, triton_argmax

    gen = torch.Generator(device="cuda").manual_seed(vocab + rows)
    x = torch.randn(rows, vocab, device="cuda", generator=gen).to(dtype)
    # ties: the row's maximum written again later (and earlier) in the row; torch keeps the first
    top = x.max(dim=-1).values + 1
    for i in range(0, rows, 3):
        for j in sorted({vocab - 1, vocab // 2, (7 * i) % vocab}):
            x[i, j] = top[i]
    if rows > 1:
        x[1] = float("-inf")  # all -inf: index 0, as torch
    want = x.argmax(dim=-1)
    for got in (greedy_argmax(x), triton_argmax(x)):  # the kernels also above the engine's row bound
        assert got.dtype == torch.int64 and got.shape == (rows,)
        assert torch.equal(got, want)


@pytest.mark.cuda
@cuda
def test_no_rows_and_a_strided_view():
    from batchdeck.engine.greedy_argmax import triton_argmax

    assert triton_argmax(torch.empty(0, 5000, device="cuda")).shape == (0,)
    x = torch.randn(9, 40000, device="cuda", dtype=torch.bfloat16)[:, :30001]
    assert torch.equal(triton_argmax(x), x.argmax(dim=-1))
