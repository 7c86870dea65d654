"""The Triton paged-attention backend against the torch reference (the oracle), on random shapes.

Runs on a CUDA machine; skipped without one. Each case draws a fresh random iteration: decode rows
and prefill chunks with prior cached context, random block tables over a shuffled pool, GQA
ratios, head dims 64/128 (and small ones), block sizes 1..32, the rows' longest-first order as the
runner passes it. The K/V write must match exactly, attention within bf16 tolerance (float32:
tight). The padded variant (extra tokens with slot -1, extra rows with no tokens, as CUDA graphs
replay them) must give the same results. Odd seeds run the decode rows unsplit (a few rows would
otherwise take split-KV).
"""
from __future__ import annotations

import random

import pytest
import torch

from batchdeck.engine.attention.metadata import AttentionMetadata
from batchdeck.engine.model_runner import longest_first

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

HEADS = [(8, 8), (16, 8), (32, 8), (14, 2), (12, 4), (4, 1)]


def make_case(seed: int, device, dtype, num_heads: int, kvh: int, d: int, bs: int, *, max_ctx: int = 300,
              max_chunk: int = 160, pad_tokens: int = 0, pad_rows: int = 0, sliding_window: int | None = None):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    n_dec, n_pre = rng.randint(0, 6), rng.randint(0, 4)
    if n_dec + n_pre == 0:
        n_dec = 1
    rows = [(rng.randint(0, max_ctx), 1) for _ in range(n_dec)]
    rows += [(rng.choice([0, rng.randint(1, max_ctx)]), rng.randint(2, max_chunk)) for _ in range(n_pre)]
    seqs = [c + q for c, q in rows]
    nblocks = [-(-s // bs) for s in seqs]
    num_blocks = sum(nblocks) + 7
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables, at = [], 0
    for n in nblocks:
        tables.append(perm[at:at + n])
        at += n
    width = max(nblocks) + rng.randint(0, 3)
    bt = torch.zeros(len(rows) + pad_rows, width, dtype=torch.int32)
    for i, t in enumerate(tables):
        bt[i, :len(t)] = torch.tensor(t, dtype=torch.int32)
    slots = []
    for (c, q), t in zip(rows, tables):
        slots += [t[p // bs] * bs + p % bs for p in range(c, c + q)]
    t_real = len(slots)
    slots += [-1] * pad_tokens
    qlens = [q for _, q in rows]
    cu = [0]
    for q in qlens:
        cu.append(cu[-1] + q)
    cu += [cu[-1]] * pad_rows

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).to(device)

    t_all = t_real + pad_tokens
    cache_shape = (num_blocks, bs, kvh, d)
    case = dict(
        query=rand(t_all, num_heads, d), key=rand(t_all, kvh, d), value=rand(t_all, kvh, d),
        k_cache=rand(*cache_shape), v_cache=rand(*cache_shape),
    )
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        block_tables=bt.to(device),
        query_start_loc=torch.tensor(cu, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seqs + [0] * pad_rows, dtype=torch.int32, device=device),
        context_lens=torch.tensor([c for c, _ in rows] + [0] * pad_rows, dtype=torch.int32, device=device),
        num_decodes=n_dec, max_query_len=max(qlens), max_seq_len=max(seqs), block_size=bs,
        query_lens_host=qlens + [0] * pad_rows, seq_lens_host=seqs + [0] * pad_rows,
        row_order=torch.tensor(longest_first(seqs + [0] * pad_rows), dtype=torch.int32, device=device),
    )
    ref_meta = AttentionMetadata(
        slot_mapping=meta.slot_mapping[:t_real], block_tables=meta.block_tables[:len(rows)],
        query_start_loc=meta.query_start_loc[:len(rows) + 1], seq_lens=meta.seq_lens[:len(rows)],
        context_lens=meta.context_lens[:len(rows)], num_decodes=n_dec, max_query_len=max(qlens),
        max_seq_len=max(seqs), block_size=bs, query_lens_host=qlens, seq_lens_host=seqs,
    )
    return case, meta, ref_meta, t_real, sliding_window


def run_case(case, meta, ref_meta, t_real, sliding_window, scaling, max_splits: int | None = None):
    from batchdeck.engine.attention.torch_backend import TorchReferenceBackend
    from batchdeck.engine.attention.triton_backend import TritonBackend

    kc_ref, vc_ref = case["k_cache"].clone(), case["v_cache"].clone()
    ref = TorchReferenceBackend().forward(case["query"][:t_real], case["key"][:t_real], case["value"][:t_real],
                                          kc_ref, vc_ref, ref_meta, scaling, sliding_window)
    kc, vc = case["k_cache"].clone(), case["v_cache"].clone()
    backend = TritonBackend()
    if max_splits is not None:
        backend.max_splits = max_splits
    out = backend.forward(case["query"], case["key"], case["value"], kc, vc, meta, scaling, sliding_window)
    if out.is_cuda:
        torch.cuda.synchronize()
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref), "K/V write differs from the reference"
    got, want = out[:t_real].double(), ref.double()
    assert torch.isfinite(got).all(), "non-finite attention output"
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def _check(seed, dtype, heads, d, bs, tol, **kw):
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    case = make_case(seed, device, dtype, heads[0], heads[1], d, bs, **kw)
    err = run_case(*case, scaling=d ** -0.5, max_splits=1 if seed % 2 else None)
    assert err < tol, f"relative error {err:.2e} >= {tol} (seed {seed}, {dtype}, heads {heads}, d {d}, bs {bs}, {kw})"
    return err


@pytest.mark.parametrize("seed", range(24))
def test_bf16_random_shapes(seed):
    rng = random.Random(1000 + seed)
    _check(seed, torch.bfloat16, rng.choice(HEADS), rng.choice([64, 128]), rng.choice([1, 4, 8, 16, 32]), 2e-2)


@pytest.mark.parametrize("seed", range(6))
def test_float32_tight(seed):
    rng = random.Random(2000 + seed)
    _check(seed, torch.float32, rng.choice(HEADS), rng.choice([16, 32, 64, 128]), rng.choice([2, 16]), 1e-5)


@pytest.mark.parametrize("seed", range(8))
def test_padded_rows_and_tokens_as_graphs_replay_them(seed):
    rng = random.Random(3000 + seed)
    _check(seed, torch.bfloat16, rng.choice(HEADS), 128, 16, 2e-2, pad_tokens=rng.randint(1, 40),
           pad_rows=rng.randint(1, 9))


@pytest.mark.parametrize("seed", range(4))
def test_sliding_window(seed):
    rng = random.Random(4000 + seed)
    _check(seed, torch.bfloat16, rng.choice(HEADS), 64, 16, 2e-2, sliding_window=rng.randint(1, 100))


def test_long_context_decode_batch():
    """Many decode rows over long contexts (the shape of benchmark decode iterations)."""
    _check(7, torch.bfloat16, (16, 8), 128, 16, 2e-2, max_ctx=3000, max_chunk=2)


def test_decode_splits_fill_the_gpu_only_for_few_rows():
    from batchdeck.engine.attention.triton_backend import MAX_DECODE_SPLITS, decode_splits

    assert decode_splits(1, 8, 132) == 32 and decode_splits(8, 8, 132) == 4
    assert decode_splits(64, 8, 132) == 1 and decode_splits(1, 8, 132, max_splits=1) == 1
    for rows in range(1, 300):
        s = decode_splits(rows, 8, 132)
        assert s & (s - 1) == 0 and 1 <= s <= MAX_DECODE_SPLITS
        assert s == 1 or rows * 8 * s <= 2 * 132


@pytest.mark.parametrize("max_splits", [1, 2, 32])
@pytest.mark.parametrize("seed", range(4))
def test_decode_rows_split_or_not_match_the_reference(seed, max_splits, monkeypatch):
    """One to a few decode rows over long contexts (split-KV decode), and the unsplit kernel."""
    monkeypatch.setenv("BATCHDECK_ATTN_MAX_SPLITS", str(max_splits))
    rng = random.Random(5000 + seed)
    _check(seed, torch.bfloat16, rng.choice(HEADS), 128, 16, 2e-2, max_ctx=4000, max_chunk=2)
    _check(seed, torch.float32, rng.choice(HEADS), 64, 16, 1e-5, max_ctx=1500, max_chunk=2,
           sliding_window=rng.choice([None, 200]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_row_order_changes_the_launch_order_only(dtype):
    """The unsplit decode launch over 64 rows of spread contexts: started longest first, in row order,
    in a shuffled order or without an order, every row's output is the same to the bit (each
    program's arithmetic is the same), and matches the reference."""
    from batchdeck.engine.attention.triton_backend import TritonBackend

    device = torch.device("cuda")
    rows = 64
    rng = random.Random(5)
    gen = torch.Generator().manual_seed(5)
    seqs = [rng.randint(100, 1300) for _ in range(rows)]
    width = max(-(-s // 16) for s in seqs)
    pool = rows * width
    bt = torch.randperm(pool, generator=gen).to(torch.int32).view(rows, width).to(device)
    k = torch.randn(pool, 16, 8, 128, generator=gen).to(dtype).to(device)
    v = torch.randn(pool, 16, 8, 128, generator=gen).to(dtype).to(device)
    q = torch.randn(rows, 32, 128, generator=gen).to(dtype).to(device)
    qsl = torch.arange(rows + 1, dtype=torch.int32, device=device)
    seq = torch.tensor(seqs, dtype=torch.int32, device=device)
    backend = TritonBackend()
    backend.max_splits = 1
    outs = []
    for order in (longest_first(seqs), list(range(rows)), torch.randperm(rows, generator=gen).tolist(), None):
        out = torch.empty_like(q)
        row_order = None if order is None else torch.tensor(list(order), dtype=torch.int32, device=device)
        backend.attend(q, k, v, out, bt, qsl, seq, 128 ** -0.5, None, True, row_order=row_order)
        outs.append(out)
    torch.cuda.synchronize()
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    from batchdeck.engine.attention.torch_backend import TorchReferenceBackend

    last = seq.long() - 1  # the reference writes each row's newest K/V: write back what is there
    slots = bt.long().gather(1, (last // 16).view(-1, 1)).view(-1) * 16 + last % 16
    ref_meta = AttentionMetadata(
        slot_mapping=slots, block_tables=bt, query_start_loc=qsl, seq_lens=seq, context_lens=seq - 1,
        num_decodes=rows, max_query_len=1, max_seq_len=max(seqs), block_size=16, query_lens_host=[1] * rows,
        seq_lens_host=seqs)
    ref = TorchReferenceBackend().forward(q, k.view(-1, 8, 128)[slots], v.view(-1, 8, 128)[slots], k.clone(),
                                          v.clone(), ref_meta, 128 ** -0.5, None)
    err = ((outs[0].double() - ref.double()).norm() / ref.double().norm()).item()
    assert err < (2e-2 if dtype == torch.bfloat16 else 1e-5)
