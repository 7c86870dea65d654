"""Triton kernels for the paged KV cache: the K/V write at the slot mapping, and paged attention.

Graph-safe by construction: every launch depends only on tensor shapes (the token and row counts
of the padded buffers) and reads lengths from device buffers, so a captured launch serves any
iteration that fits its buffers. Padding conventions (what `engine/cuda_graphs.py` writes):

- padded tokens have slot -1 (the write skips them) and belong to no row;
- padded rows have zero query tokens (`query_start_loc` stays flat) and seq_len 0.

Attention is one kernel with two modes:

- DECODE (one program per (row, kv head), in a flat grid with the KV heads fastest): rows whose query
  length is 1 (decodes, and one-token prefill chunks, which are the same computation); other rows exit
  at once. With a row order (the rows by sequence length, longest first) the GPU starts the longest
  rows' programs first, so the short ones fill in behind them instead of a long one finishing last.
- TILES (one program per (query tile of a row, kv head)): rows with more than one query token.
  Tile t of the flattened iteration belongs to the largest row i with
  `query_start_loc[i] // BLOCK_Q + i <= t` (that map is strictly increasing, so tiles of
  different rows never collide and `T // BLOCK_Q + R` programs cover every tile).

Each program packs BLOCK_Q query tokens x the G query heads sharing one KV head into the M rows of
its tiles (GQA: K/V are read once per group), walks the keys up to the tile's last causal position
in BLOCK_N steps through the block table, and keeps an online softmax in float32.
"""
from __future__ import annotations

import triton
import triton.language as tl

from batchdeck.engine.pdl import pdl_prologue


@triton.jit
def write_kv_kernel(key, value, k_cache, v_cache, slot_mapping,
                    stride_kt, stride_kh, stride_vt, stride_vh, stride_cs, stride_ch,
                    KVH: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                    USE_PDL: tl.constexpr = False):
    pdl_prologue(USE_PDL)
    t = tl.program_id(0)
    slot = tl.load(slot_mapping + t + tl.zeros([1, 1], dtype=tl.int32)).to(tl.int64)  # [1, 1]: broadcasts
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < KVH) & (d < D) & (slot >= 0)
    t64 = t.to(tl.int64)
    k = tl.load(key + t64 * stride_kt + h * stride_kh + d, mask=mask)
    v = tl.load(value + t64 * stride_vt + h * stride_vh + d, mask=mask)
    dst = slot * stride_cs + h * stride_ch + d
    tl.store(k_cache + dst, k.to(k_cache.dtype.element_ty), mask=mask)
    tl.store(v_cache + dst, v.to(v_cache.dtype.element_ty), mask=mask)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        out = tl.dot(a, b, input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out


@triton.jit
def _attend_tile(q, q_pos, m_i, l_i, acc, offs_n, n_valid, bt_row, k_head, v_head, scale_log2, sliding_window,
                 stride_cb, stride_cs, offs_d, d_valid,
                 BS: tl.constexpr, MASKED: tl.constexpr, USE_WINDOW: tl.constexpr, IEEE: tl.constexpr,
                 KROW: tl.constexpr):
    """One BLOCK_N tile of keys (positions offs_n) into the online softmax. MASKED: mask keys past
    n_valid, past each query's causal position and outside the window; unmasked tiles are keys every
    query sees. KROW: K is loaded [BLOCK_N, D] (each key's D values contiguous) and transposed for the
    dot, which the prefill tiles run faster on; else it is loaded [D, BLOCK_N]."""
    blk = tl.load(bt_row + offs_n // BS, mask=n_valid, other=0).to(tl.int64)
    slot_off = blk * stride_cb + (offs_n % BS) * stride_cs
    if KROW:
        k = tl.load(k_head + slot_off[:, None] + offs_d[None, :],
                    mask=n_valid[:, None] & d_valid[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
        s = _dot(q, tl.trans(k), IEEE) * scale_log2
    else:
        k = tl.load(k_head + slot_off[None, :] + offs_d[:, None],
                    mask=n_valid[None, :] & d_valid[:, None], other=0.0)  # [BLOCK_D, BLOCK_N]
        s = _dot(q, k, IEEE) * scale_log2
    if MASKED:
        allowed = n_valid[None, :] & (offs_n[None, :] <= q_pos[:, None])
        if USE_WINDOW:
            allowed = allowed & (offs_n[None, :] > q_pos[:, None] - sliding_window)
        s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = tl.load(v_head + slot_off[:, None] + offs_d[None, :],
                mask=n_valid[:, None] & d_valid[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
    return m_new, l_i, acc


@triton.jit
def _attend_keys(q, q_pos, m_i, l_i, acc, lo, full, hi, bt_row, k_head, v_head, scale_log2, sliding_window,
                 stride_cb, stride_cs, offs_d, d_valid,
                 BS: tl.constexpr, BLOCK_N: tl.constexpr, USE_WINDOW: tl.constexpr, IEEE: tl.constexpr,
                 KROW: tl.constexpr):
    """Walk keys [lo, hi) of one row through its block table in BLOCK_N tiles, with an online softmax
    (log2 domain) over the M query rows of q whose positions are q_pos ([BLOCK_M]); returns the
    updated running max, sum and unnormalized output. Keys [lo, full) (whole tiles that every query
    sees) skip the masking; `full` = lo masks every tile. The inner loop of every attention kernel."""
    ones = tl.full([BLOCK_N], 1, tl.int1)
    for start_n in range(lo, full, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        m_i, l_i, acc = _attend_tile(q, q_pos, m_i, l_i, acc, offs_n, ones, bt_row, k_head, v_head, scale_log2,
                                     sliding_window, stride_cb, stride_cs, offs_d, d_valid, BS=BS, MASKED=False,
                                     USE_WINDOW=USE_WINDOW, IEEE=IEEE, KROW=KROW)
    for start_n in range(full, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        m_i, l_i, acc = _attend_tile(q, q_pos, m_i, l_i, acc, offs_n, offs_n < hi, bt_row, k_head, v_head,
                                     scale_log2, sliding_window, stride_cb, stride_cs, offs_d, d_valid, BS=BS,
                                     MASKED=True, USE_WINDOW=USE_WINDOW, IEEE=IEEE, KROW=KROW)
    return m_i, l_i, acc


@triton.jit(do_not_specialize=["num_rows"])
def paged_attention_kernel(
    Q, K, V, O, block_tables, query_start_loc, seq_lens,
    row_order,  # DECODE with USE_ORDER: the rows, longest first (the order the programs take them in)
    scale_log2,  # softmax scale * log2(e)
    sliding_window,  # keys with position <= q_pos - sliding_window are masked (only if USE_WINDOW)
    num_rows, num_kv_heads,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cb, stride_cs, stride_ch,  # cache strides: block, slot within block, kv head (K and V alike)
    stride_bt,  # block table row stride
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BS: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROWS_P2: tl.constexpr,
    DECODE: tl.constexpr, USE_ORDER: tl.constexpr, USE_WINDOW: tl.constexpr, IEEE: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    pdl_prologue(USE_PDL)
    pid = tl.program_id(0)
    if DECODE:  # one flat grid, KV heads fastest: rows are started in row_order (longest first)
        kvh = pid % num_kv_heads
        rank = pid // num_kv_heads
        if USE_ORDER:
            row = tl.load(row_order + rank)
        else:
            row = rank
        local = 0
    else:
        kvh = tl.program_id(1)
        offs_r = tl.arange(0, ROWS_P2)
        starts = tl.load(query_start_loc + offs_r, mask=offs_r < num_rows, other=0)
        first_tile = starts // BLOCK_Q + offs_r
        hit = (first_tile <= pid) & (offs_r < num_rows)
        row = tl.sum(hit.to(tl.int32), axis=0) - 1
        local = pid - (tl.load(query_start_loc + row) // BLOCK_Q + row)
    q_start = tl.load(query_start_loc + row)
    qlen = tl.load(query_start_loc + row + 1) - q_start
    if DECODE:
        if qlen != 1:
            return
    else:
        if qlen <= 1:
            return
        if local * BLOCK_Q >= qlen:
            return
    seq_len = tl.load(seq_lens + row)
    ctx = seq_len - qlen

    offs_m = tl.arange(0, BLOCK_M)
    tok = offs_m // GP
    hg = offs_m % GP
    q_idx = local * BLOCK_Q + tok
    m_valid = (tok < BLOCK_Q) & (hg < G) & (q_idx < qlen)
    head = kvh * G + hg
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < D
    q_rows = (q_start + q_idx).to(tl.int64)
    q = tl.load(Q + q_rows[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=m_valid[:, None] & d_valid[None, :], other=0.0)
    q_pos = ctx + q_idx

    tile_last = ctx + local * BLOCK_Q + BLOCK_Q  # one past the last causal key any query here may see
    kv_end = tl.minimum(seq_len, tile_last)
    kv_start = 0
    if USE_WINDOW:
        first_q = ctx + local * BLOCK_Q
        kv_start = tl.maximum(first_q - sliding_window + 1, 0)
        kv_start = (kv_start // BLOCK_N) * BLOCK_N

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    bt_row = block_tables + row.to(tl.int64) * stride_bt
    k_head = K + kvh * stride_ch
    v_head = V + kvh * stride_ch
    if DECODE:  # one query per row: every tile takes the masked path (the unmasked one is for prefill tiles)
        m_i, l_i, acc = _attend_keys(q, q_pos, m_i, l_i, acc, kv_start, kv_start, kv_end, bt_row, k_head, v_head,
                                     scale_log2, sliding_window, stride_cb, stride_cs, offs_d, d_valid,
                                     BS=BS, BLOCK_N=BLOCK_N, USE_WINDOW=USE_WINDOW, IEEE=IEEE, KROW=False)
    else:
        # Keys before the tile's first query position are seen by every query of the tile: whole tiles
        # of them skip the causal mask (a window masks its own start: then every tile is masked).
        full = kv_start
        if not USE_WINDOW:
            full = ((ctx + local * BLOCK_Q) // BLOCK_N) * BLOCK_N
        m_i, l_i, acc = _attend_keys(q, q_pos, m_i, l_i, acc, kv_start, full, kv_end, bt_row, k_head, v_head,
                                     scale_log2, sliding_window, stride_cb, stride_cs, offs_d, d_valid,
                                     BS=BS, BLOCK_N=BLOCK_N, USE_WINDOW=USE_WINDOW, IEEE=IEEE, KROW=True)
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(O + q_rows[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=m_valid[:, None] & d_valid[None, :])


@triton.jit(do_not_specialize=["num_splits", "stride_pr", "stride_ph"])
def paged_decode_split_kernel(
    Q, K, V, M_part, L_part, Acc_part, block_tables, query_start_loc, seq_lens,
    scale_log2, sliding_window, num_splits,
    stride_qt, stride_qh,
    stride_cb, stride_cs, stride_ch,
    stride_bt,
    stride_pr, stride_ph,  # partials: [rows, H, num_splits] (M, L), [rows, H, num_splits, D] (Acc)
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_WINDOW: tl.constexpr, IEEE: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    """Split-KV decode, phase 1: program (row, kv head, split) attends one slice of the row's keys.

    The keys of a one-token row ([window start,] seq_len) are cut into num_splits slices of whole BLOCK_N
    tiles; each program writes its slice's running max (log2 domain), softmax sum and unnormalized
    output for the G query heads of its KV head. Rows whose query length is not 1 exit, as do slices
    past the row's keys (their sum stays 0: `decode_split_combine_kernel` ignores them).
    """
    pdl_prologue(USE_PDL)
    row = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    q_start = tl.load(query_start_loc + row)
    qlen = tl.load(query_start_loc + row + 1) - q_start
    if qlen != 1:
        return
    seq_len = tl.load(seq_lens + row)
    q_pos = seq_len - 1
    kv_start = 0
    if USE_WINDOW:
        kv_start = tl.maximum(q_pos - sliding_window + 1, 0)
        kv_start = (kv_start // BLOCK_N) * BLOCK_N
    tiles = tl.cdiv(seq_len - kv_start, BLOCK_N)
    per_split = tl.cdiv(tiles, num_splits)
    lo = kv_start + split * per_split * BLOCK_N
    hi = tl.minimum(lo + per_split * BLOCK_N, seq_len)

    offs_m = tl.arange(0, BLOCK_M)
    hg = offs_m
    m_valid = hg < G
    head = kvh * G + hg
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < D
    q = tl.load(Q + q_start.to(tl.int64) * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=m_valid[:, None] & d_valid[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    bt_row = block_tables + row.to(tl.int64) * stride_bt
    k_head = K + kvh * stride_ch
    v_head = V + kvh * stride_ch
    q_pos_m = tl.full([BLOCK_M], 0, tl.int32) + q_pos
    m_i, l_i, acc = _attend_keys(q, q_pos_m, m_i, l_i, acc, lo, lo, hi, bt_row, k_head, v_head, scale_log2,
                                 sliding_window, stride_cb, stride_cs, offs_d, d_valid,
                                 BS=BS, BLOCK_N=BLOCK_N, USE_WINDOW=USE_WINDOW, IEEE=IEEE, KROW=False)
    part = row.to(tl.int64) * stride_pr + head * stride_ph + split
    tl.store(M_part + part, m_i, mask=m_valid)
    tl.store(L_part + part, l_i, mask=m_valid)
    tl.store(Acc_part + part[:, None] * D + offs_d[None, :], acc, mask=m_valid[:, None] & d_valid[None, :])


@triton.jit(do_not_specialize=["num_splits", "stride_pr", "stride_ph"])
def decode_split_combine_kernel(
    O, M_part, L_part, Acc_part, query_start_loc, num_splits,
    stride_ot, stride_oh, stride_pr, stride_ph,
    D: tl.constexpr, BLOCK_D: tl.constexpr, MAX_SPLITS: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    """Split-KV decode, phase 2: program (row, query head) merges its num_splits partial softmaxes
    (num_splits <= MAX_SPLITS, a power of two: one compiled variant serves every split count)."""
    pdl_prologue(USE_PDL)
    row = tl.program_id(0)
    head = tl.program_id(1)
    q_start = tl.load(query_start_loc + row)
    qlen = tl.load(query_start_loc + row + 1) - q_start
    if qlen != 1:
        return
    offs_s = tl.arange(0, MAX_SPLITS)
    s_valid = offs_s < num_splits
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < D
    base = row.to(tl.int64) * stride_pr + head * stride_ph
    m = tl.load(M_part + base + offs_s, mask=s_valid, other=-1.0e30)
    l = tl.load(L_part + base + offs_s, mask=s_valid, other=0.0)
    m_max = tl.max(tl.where(l > 0, m, -1.0e30), axis=0)
    w = tl.where(l > 0, tl.exp2(m - m_max), 0.0)
    total = tl.sum(l * w, axis=0)
    acc = tl.load(Acc_part + (base + offs_s[:, None]) * D + offs_d[None, :], mask=s_valid[:, None] & d_valid[None, :],
                  other=0.0)
    out = tl.sum(acc * w[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(O + q_start.to(tl.int64) * stride_ot + head * stride_oh + offs_d, out.to(O.dtype.element_ty),
             mask=d_valid)
