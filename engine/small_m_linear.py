"""A weight-streaming linear for decode-sized batches: y = x @ W.T (+ bias) for x [M <= MAX_ROWS, K].

At a few rows a linear reads its whole weight to do almost no arithmetic, so it runs at the speed
weights stream from memory. cuBLAS picks tiles sized for larger M: on an H200 its kernels for the
qwen3-0.6b layer shapes (4-12 MB weights) stream them at 0.3-2.1 TB/s at one row
(benchmarks/results/gpu_gemv_h200.json). This kernel spreads the weight over many programs (BLOCK_N output features each; with SPLIT_K > 1 also over
slices of K), loads it along K in wide coalesced tiles, accumulates in float32 and rounds once to the
model dtype, as F.linear does (results differ from it only by reduction order).

Two ways to do the arithmetic (both read W [N, K] K-contiguous, once):
- `dot`: the tensor cores, with the roles swapped (acc[BLOCK_N, 16] = W tile @ x tile.T), so the
  weight is the large operand and the rows of x, padded to 16, 32 or 64, the small one;
- `fma`: for M <= 4, elementwise products accumulated per lane in float32 and summed over K once at
  the end (no padding of the rows).

Split-K without a second launch: each slice writes its float32 partial to a workspace, bumps the
tile's arrival counter, and the last slice to arrive adds the partials in slice order (a fixed
order: the result does not depend on which slice came last), rounds, applies the epilogue and sets
the counter back to 0, so counters are 0 between calls and a CUDA graph replays the call as is.

Epilogues: bias; or, for a gate|up weight [2I, K] (gate rows first), SiLU(gate) * up with gate, up
and SiLU(gate) each rounded to the model dtype as the HF MLP rounds them, so the SiLU-mul kernel
goes away.

Launch decisions depend on shapes only (`pick_config(M, N, K, ...)` in engine/small_m_rule.py, no
autotuning at call time), so calls are CUDA-graph safe once each config is compiled (the graph warm-up call compiles it).
`benchmarks/gpu_gemv_bench.py` times every candidate of `candidate_configs` against cuBLAS and the
rule's pick.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from batchdeck.engine.pdl import pdl_launch, pdl_prologue
from batchdeck.engine.small_m_rule import MAX_ROWS, SmallMConfig, block_m_for, fits, pick_config


@triton.jit(do_not_specialize=["M"])  # one compiled kernel for 1 row and for several
def small_m_linear_kernel(X, W, B, OUT, WS, CNT, M, N, K, k_per_split, stride_x, stride_w, stride_out,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          USE_DOT: tl.constexpr, SPLIT: tl.constexpr, SILU: tl.constexpr, HAS_BIAS: tl.constexpr,
                          EVEN_K: tl.constexpr, IEEE: tl.constexpr, USE_PDL: tl.constexpr = False):
    """Program (pid_n, pid_k): output features [pid_n * BLOCK_N, +BLOCK_N) over K slice pid_k.
    Accumulators are [BLOCK_N, BLOCK_M] (features x rows). SILU: W is [2N, K], gate rows then up rows."""
    pdl_prologue(USE_PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    m_mask = offs_m < M
    w_rows = W + offs_n.to(tl.int64)[:, None] * stride_w
    wu_rows = W + (offs_n + N).to(tl.int64)[:, None] * stride_w
    k_start = pid_k * k_per_split
    if USE_DOT:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc3 = tl.zeros((BLOCK_N, BLOCK_M, BLOCK_K), dtype=tl.float32)
        acc3_u = tl.zeros((BLOCK_N, BLOCK_M, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, k_per_split, BLOCK_K):
        kk = k_start + k0 + offs_k
        if EVEN_K:
            w_mask = n_mask[:, None]
            k_ok = offs_k >= 0
        else:
            k_ok = kk < K
            w_mask = n_mask[:, None] & k_ok[None, :]
        w = tl.load(w_rows + kk[None, :], mask=w_mask, other=0.0)
        if USE_DOT:
            xt = tl.load(X + offs_m[None, :] * stride_x + kk[:, None], mask=m_mask[None, :] & k_ok[:, None],
                         other=0.0)  # [BLOCK_K, BLOCK_M]
            if IEEE:
                acc += tl.dot(w, xt, input_precision="ieee")
            else:
                acc += tl.dot(w, xt)
            if SILU:
                wu = tl.load(wu_rows + kk[None, :], mask=w_mask, other=0.0)
                if IEEE:
                    acc_u += tl.dot(wu, xt, input_precision="ieee")
                else:
                    acc_u += tl.dot(wu, xt)
        else:
            x = tl.load(X + offs_m[:, None] * stride_x + kk[None, :], mask=m_mask[:, None] & k_ok[None, :],
                        other=0.0)  # [BLOCK_M, BLOCK_K]
            xf = x.to(tl.float32)[None, :, :]
            acc3 += w.to(tl.float32)[:, None, :] * xf
            if SILU:
                wu = tl.load(wu_rows + kk[None, :], mask=w_mask, other=0.0)
                acc3_u += wu.to(tl.float32)[:, None, :] * xf
    if not USE_DOT:
        acc = tl.sum(acc3, axis=2)
        acc_u = tl.sum(acc3_u, axis=2)

    out_ptrs = OUT + offs_m[None, :] * stride_out + offs_n[:, None]
    out_mask = n_mask[:, None] & m_mask[None, :]
    if SPLIT:
        # partial of slice s, accumulator a at WS[(s * n_acc + a) * N + n, m] (n_acc = 2 with SILU)
        n_acc: tl.constexpr = 2 if SILU else 1
        ws = WS + offs_n[:, None] * BLOCK_M + offs_m[None, :]
        tile_mask = n_mask[:, None]
        tl.store(ws + (pid_k * n_acc) * N * BLOCK_M, acc, mask=tile_mask)
        if SILU:
            tl.store(ws + (pid_k * n_acc + 1) * N * BLOCK_M, acc_u, mask=tile_mask)
        tl.debug_barrier()  # every thread's partial is written before the release below
        arrived = tl.atomic_add(CNT + pid_n, 1, sem="acq_rel")
        if arrived == tl.num_programs(1) - 1:
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            acc_u = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for s in range(0, tl.num_programs(1)):
                acc += tl.load(ws + (s * n_acc) * N * BLOCK_M, mask=tile_mask, other=0.0, cache_modifier=".cg")
                if SILU:
                    acc_u += tl.load(ws + (s * n_acc + 1) * N * BLOCK_M, mask=tile_mask, other=0.0,
                                     cache_modifier=".cg")
            _epilogue(acc, acc_u, B, offs_n, n_mask, out_ptrs, out_mask, SILU, HAS_BIAS)
            tl.atomic_xchg(CNT + pid_n, 0)
    else:
        _epilogue(acc, acc_u, B, offs_n, n_mask, out_ptrs, out_mask, SILU, HAS_BIAS)


@triton.jit
def _epilogue(acc, acc_u, B, offs_n, n_mask, out_ptrs, out_mask, SILU: tl.constexpr, HAS_BIAS: tl.constexpr):
    dt = out_ptrs.dtype.element_ty
    if SILU:
        g = acc.to(dt).to(tl.float32)
        u = acc_u.to(dt).to(tl.float32)
        a = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
        y = (a * u).to(dt)
    else:
        if HAS_BIAS:
            acc += tl.load(B + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
        y = acc.to(dt)
    tl.store(out_ptrs, y, mask=out_mask)


def _indexed(device) -> torch.device:
    """'cuda' -> 'cuda:<current>' (a tensor's device always carries its index)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


_COUNTERS: dict[torch.device, torch.Tensor] = {}
COUNTER_SLOTS = 8192  # feature tiles of one call: N / BLOCK_N


def counters(device: torch.device) -> torch.Tensor:
    """The split-K arrival counters of a device (zeros; every call leaves them zero). Allocate before a
    graph capture (`fuse_model` does): a capture must not be the first call on a device."""
    device = _indexed(device)
    buf = _COUNTERS.get(device)
    if buf is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("small_m_linear: call counters(device) before capturing a CUDA graph")
        buf = _COUNTERS[device] = torch.zeros(COUNTER_SLOTS, dtype=torch.int32, device=device)
    return buf


_SMS: dict[torch.device, int] = {}


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (132 on an H100/H200 SXM; 132 assumed off CUDA, so the
    interpreter runs the configs an H200 would)."""
    device = _indexed(device)
    if device.type != "cuda":
        return 132
    if device not in _SMS:
        _SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SMS[device]


def small_m_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *, silu_mul: bool = False,
                   config: SmallMConfig | None = None) -> torch.Tensor:
    """F.linear(x, w, bias) for x [..., K] with at most MAX_ROWS rows, w [N, K] with K contiguous.
    silu_mul: w is a gate|up weight [2I, K] and the result is SiLU(x @ Wg.T) * (x @ Wu.T), [..., I]."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if w.dim() != 2 or w.shape[1] != k or w.stride(1) != 1:
        raise ValueError(f"small_m_linear: weight {tuple(w.shape)} (strides {w.stride()}) for input features {k}: "
                         "need [N, K] with K contiguous")
    if silu_mul and (bias is not None or w.shape[0] % 2):
        raise ValueError("small_m_linear: silu_mul needs a gate|up weight [2I, K] without bias")
    n = w.shape[0] // 2 if silu_mul else w.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out.view(*x.shape[:-1], n)
    if config is None:
        config = pick_config(m, n, k, num_sms(x.device), x.element_size(), silu_mul)
        if config is None:
            raise ValueError(f"small_m_linear: no launch rule for {m} rows of a [{n}, {k}] weight (at most "
                             f"{MAX_ROWS} rows, and above 16 only large weights: the rest is cuBLAS's)")
    if not fits(config, m, n, k, silu_mul):
        raise ValueError(f"small_m_linear: config {config.label()} does not fit M={m}, N={n}, K={k}")
    block_m = block_m_for(config.mode, m)
    split = config.split_k
    k_per_split = triton.cdiv(triton.cdiv(k, split), config.block_k) * config.block_k
    split = triton.cdiv(k, k_per_split)  # no empty slice
    tiles = triton.cdiv(n, config.block_n)
    if split > 1 and tiles > COUNTER_SLOTS:  # more tiles than arrival counters: one slice, whole K steps
        split, k_per_split = 1, triton.cdiv(k, config.block_k) * config.block_k
    if split > 1:
        ws = torch.empty((split * (2 if silu_mul else 1) * n * block_m,), dtype=torch.float32, device=x.device)
        cnt = counters(x.device)
    else:
        ws = cnt = out
    pdl = pdl_launch(x.device)
    small_m_linear_kernel[(tiles, split)](
        x2, w, bias if bias is not None else w, out, ws, cnt, m, n, k, k_per_split, x2.stride(0), w.stride(0),
        out.stride(0), BLOCK_M=block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        USE_DOT=config.mode == "dot", SPLIT=split > 1, SILU=silu_mul, HAS_BIAS=bias is not None,
        EVEN_K=k % k_per_split == 0, IEEE=x.dtype == torch.float32,
        num_warps=config.num_warps, num_stages=config.num_stages, **pdl)
    return out.view(*x.shape[:-1], n)
