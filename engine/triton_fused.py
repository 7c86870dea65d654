"""Fewer, fused kernels inside each layer: Triton replacements of HF module forwards (CUDA only).

In a CUDA graph the GPU still pays a few microseconds per kernel, and a stock HF decoder layer
launches about 50 of them (RMSNorm alone is 6-7 elementwise kernels, q/k norm and the rotary
embedding about 25). `fuse_model` swaps, per module instance (never the classes, so other models
in the process stay stock):

- every `*RMSNorm` forward -> one kernel;
- Qwen3 / Llama attention -> one q|k|v matmul (weights concatenated, the three Linear weights
  become views of it), one kernel for q/k RMSNorm (Qwen3) + rotary embedding of every head, then
  the engine's paged-attention backend and o_proj;
- SiLU MLPs -> one gate|up matmul (concatenated the same way), one SiLU-mul kernel, down_proj;
- Qwen3 / Llama decoder layers -> the post-attention residual add fused into the RMSNorm after it.

That is about 11 kernels per layer instead of about 50. The kernels reproduce the HF modules'
rounding steps (each HF op that returns the model dtype is rounded the same way here), so float32
results differ only by reduction order. Disable with BATCHDECK_FUSED=0.
"""
from __future__ import annotations

import os
import types

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


@triton.jit
def rmsnorm_kernel(X, W, Y, stride_x, stride_y, N, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    var = tl.sum(x * x, axis=0) / N
    xn = (x * (1.0 / tl.sqrt(var + eps))).to(Y.dtype.element_ty)
    w = tl.load(W + offs, mask=mask, other=0.0)
    tl.store(Y + row * stride_y + offs, (w.to(tl.float32) * xn.to(tl.float32)).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def add_rmsnorm_kernel(X, H, W, R, Y, stride_x, stride_h, stride_r, stride_y, N, eps, BLOCK: tl.constexpr):
    """R = X + H (rounded to the model dtype, as the HF residual add), Y = RMSNorm(R)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    h = tl.load(H + row * stride_h + offs, mask=mask, other=0.0).to(tl.float32)
    r = (x + h).to(R.dtype.element_ty)
    tl.store(R + row * stride_r + offs, r, mask=mask)
    rf = r.to(tl.float32)
    var = tl.sum(rf * rf, axis=0) / N
    xn = (rf * (1.0 / tl.sqrt(var + eps))).to(Y.dtype.element_ty)
    w = tl.load(W + offs, mask=mask, other=0.0)
    tl.store(Y + row * stride_y + offs, (w.to(tl.float32) * xn.to(tl.float32)).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def qk_norm_rope_kernel(QKV, COS, SIN, QW, KW, Q, K, stride_qkv, stride_cos, eps,
                        H: tl.constexpr, KVH: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr,
                        NH_P2: tl.constexpr, HAS_NORM: tl.constexpr):
    """One program per token: every q and k head of it (q heads first), RMSNorm on each head's
    D values (Qwen3), then the rotary embedding (rotate-half form), written to Q [T, H, D], K [T, KVH, D]."""
    t = tl.program_id(0).to(tl.int64)
    hh = tl.arange(0, NH_P2)[:, None]
    offs = tl.arange(0, HALF)[None, :]
    hmask = hh < H + KVH
    is_q = hh < H
    dt = Q.dtype.element_ty
    src = QKV + t * stride_qkv + hh * D + offs
    x1 = tl.load(src, mask=hmask, other=0.0)
    x2 = tl.load(src + HALF, mask=hmask, other=0.0)
    if HAS_NORM:
        f1 = x1.to(tl.float32)
        f2 = x2.to(tl.float32)
        var = (tl.sum(f1 * f1, axis=1) + tl.sum(f2 * f2, axis=1)) / D
        r = (1.0 / tl.sqrt(var + eps))[:, None]
        w1 = tl.where(is_q, tl.load(QW + offs), tl.load(KW + offs)).to(tl.float32)
        w2 = tl.where(is_q, tl.load(QW + HALF + offs), tl.load(KW + HALF + offs)).to(tl.float32)
        x1 = (w1 * (f1 * r).to(dt).to(tl.float32)).to(dt)
        x2 = (w2 * (f2 * r).to(dt).to(tl.float32)).to(dt)
    c1 = tl.load(COS + t * stride_cos + offs).to(tl.float32)
    c2 = tl.load(COS + t * stride_cos + HALF + offs).to(tl.float32)
    s1 = tl.load(SIN + t * stride_cos + offs).to(tl.float32)
    s2 = tl.load(SIN + t * stride_cos + HALF + offs).to(tl.float32)
    y1 = x1.to(tl.float32)
    y2 = x2.to(tl.float32)
    o1 = ((y1 * c1).to(dt).to(tl.float32) + (-y2 * s1).to(dt).to(tl.float32)).to(dt)
    o2 = ((y2 * c2).to(dt).to(tl.float32) + (y1 * s2).to(dt).to(tl.float32)).to(dt)
    q_dst = Q + t * (H * D) + hh * D + offs
    k_mask = hmask & (hh >= H)
    k_dst = K + t * (KVH * D) + tl.where(k_mask, hh - H, 0) * D + offs
    tl.store(q_dst, o1, mask=is_q)
    tl.store(q_dst + HALF, o2, mask=is_q)
    tl.store(k_dst, o1, mask=k_mask)
    tl.store(k_dst + HALF, o2, mask=k_mask)


@triton.jit
def silu_mul_kernel(GU, OUT, stride_gu, stride_out, I, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < I
    g = tl.load(GU + row * stride_gu + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(GU + row * stride_gu + I + offs, mask=mask, other=0.0).to(tl.float32)
    a = (g / (1.0 + tl.exp(-g))).to(OUT.dtype.element_ty).to(tl.float32)
    tl.store(OUT + row * stride_out + offs, (a * u).to(OUT.dtype.element_ty), mask=mask)


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        block = _pow2(n)
        rmsnorm_kernel[(x2.shape[0],)](x2, weight, y, x2.stride(0), y.stride(0), n, eps, BLOCK=block,
                                       num_warps=4 if block <= 2048 else 8)
    return y.view(x.shape)


def add_rmsnorm(x: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, eps: float):
    """(x + h, RMSNorm(x + h)) in one pass."""
    n = x.shape[-1]
    x2, h2 = x.reshape(-1, n), h.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if h2.stride(-1) != 1:
        h2 = h2.contiguous()
    r = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        block = _pow2(n)
        add_rmsnorm_kernel[(x2.shape[0],)](x2, h2, weight, r, y, x2.stride(0), h2.stride(0), r.stride(0), y.stride(0),
                                           n, eps, BLOCK=block, num_warps=4 if block <= 2048 else 8)
    return r.view(x.shape), y.view(x.shape)


def silu_mul(gu: torch.Tensor) -> torch.Tensor:
    i = gu.shape[-1] // 2
    g2 = gu.reshape(-1, 2 * i)
    out = torch.empty((g2.shape[0], i), dtype=gu.dtype, device=gu.device)
    if g2.shape[0]:
        block = 1024
        silu_mul_kernel[(g2.shape[0], triton.cdiv(i, block))](g2, out, g2.stride(0), out.stride(0), i, BLOCK=block)
    return out.view(*gu.shape[:-1], i)


def _norm_forward(self, hidden_states):
    if self.weight.dtype != hidden_states.dtype:  # HF would promote: keep its arithmetic
        return type(self).forward(self, hidden_states)
    return rmsnorm(hidden_states, self.weight, self.variance_epsilon)


def _layer_forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None,
                   use_cache=False, position_embeddings=None, **kwargs):
    """The HF decoder layer with the post-attention residual add fused into the following RMSNorm."""
    h = self.input_layernorm(hidden_states)
    h, _ = self.self_attn(hidden_states=h, attention_mask=attention_mask, position_ids=position_ids,
                          past_key_values=past_key_values, use_cache=use_cache,
                          position_embeddings=position_embeddings, **kwargs)
    norm = self.post_attention_layernorm
    if norm.weight.dtype == hidden_states.dtype == h.dtype:
        residual, h = add_rmsnorm(hidden_states, h, norm.weight, norm.variance_epsilon)
    else:
        residual = hidden_states + h
        h = norm(residual)
    return residual + self.mlp(h)


def _mlp_forward(self, x):
    return self.down_proj(silu_mul(F.linear(x, self._bd_gate_up)))


def _attn_forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None,
                  **kwargs):
    step = kwargs["batchdeck_step"]
    shape = hidden_states.shape[:-1]
    x = hidden_states.reshape(-1, hidden_states.shape[-1])
    qkv = F.linear(x, self._bd_qkv_weight, self._bd_qkv_bias)
    t = x.shape[0]
    h, kvh, d = self._bd_heads
    cos, sin = position_embeddings
    cos, sin = cos.reshape(-1, d), sin.reshape(-1, d)
    q = torch.empty((t, h, d), dtype=qkv.dtype, device=qkv.device)
    k = torch.empty((t, kvh, d), dtype=qkv.dtype, device=qkv.device)
    if t:
        norm = getattr(self, "q_norm", None)
        nh = _pow2(h + kvh)
        qk_norm_rope_kernel[(t,)](
            qkv, cos, sin, norm.weight if norm is not None else qkv, self.k_norm.weight if norm is not None else qkv,
            q, k, qkv.stride(0), cos.stride(0), norm.variance_epsilon if norm is not None else 0.0,
            H=h, KVH=kvh, D=d, HALF=d // 2, NH_P2=nh, HAS_NORM=norm is not None,
            num_warps=4 if nh * d <= 4096 else 8)
    v = qkv[:, (h + kvh) * d:].view(t, kvh, d)
    layer = self.layer_idx
    out = step.backend.forward(q, k, v, step.kv_cache.keys[layer], step.kv_cache.values[layer], step.metadata,
                               self.scaling, getattr(self, "sliding_window", None))
    return self.o_proj(out.reshape(*shape, h * d)), None


def _concat(linears: list[torch.nn.Linear], attr: str) -> torch.Tensor | None:
    """Concatenate the linears' weights (or biases) along dim 0; each module keeps a view of it."""
    parts = [getattr(m, attr) for m in linears]
    if all(p is None for p in parts):
        return None
    if any(p is None for p in parts):
        raise ValueError("mixed bias")
    whole = torch.cat([p.data for p in parts], 0)
    at = 0
    for m, p in zip(linears, parts):
        n = p.shape[0]
        setattr(m, attr, torch.nn.Parameter(whole[at:at + n], requires_grad=False))
        at += n
    return whole


def fuse_model(model: torch.nn.Module) -> dict[str, int]:
    """Swap module forwards for the fused versions; returns how many of each were swapped."""
    counts = {"rmsnorm": 0, "attention": 0, "mlp": 0, "layer": 0}
    if os.environ.get("BATCHDECK_FUSED", "1") == "0":
        return counts
    config = getattr(model, "config", None)
    act = getattr(config, "hidden_act", None)
    for module in model.modules():
        name = type(module).__name__
        if name.endswith("RMSNorm") and hasattr(module, "variance_epsilon") and getattr(module, "weight", None) is not None \
                and module.weight.dim() == 1 and name != "Gemma3RMSNorm":
            module.forward = types.MethodType(_norm_forward, module)
            counts["rmsnorm"] += 1
        elif name in ("Qwen3Attention", "LlamaAttention") and all(
                hasattr(module, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "layer_idx", "scaling")):
            d = module.head_dim
            h = module.q_proj.out_features // d
            kvh = module.k_proj.out_features // d
            if d != _pow2(d) or d < 16:
                continue
            try:
                module._bd_qkv_bias = _concat([module.q_proj, module.k_proj, module.v_proj], "bias")
            except ValueError:
                continue
            module._bd_qkv_weight = _concat([module.q_proj, module.k_proj, module.v_proj], "weight")
            module._bd_heads = (h, kvh, d)
            module.forward = types.MethodType(_attn_forward, module)
            counts["attention"] += 1
        elif name in ("Qwen3DecoderLayer", "LlamaDecoderLayer") and all(
                hasattr(module, a) for a in ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")) \
                and hasattr(module.post_attention_layernorm, "variance_epsilon"):
            module.forward = types.MethodType(_layer_forward, module)
            counts["layer"] += 1
        elif name.endswith("MLP") and act in ("silu", "swish") and all(
                hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj")) \
                and module.gate_proj.bias is None and module.up_proj.bias is None:
            module._bd_gate_up = _concat([module.gate_proj, module.up_proj], "weight")
            module.forward = types.MethodType(_mlp_forward, module)
            counts["mlp"] += 1
    return counts


def unfuse_model(model: torch.nn.Module) -> None:
    """Back to the stock forwards (the concatenated weights stay: the modules hold views of them)."""
    for module in model.modules():
        if "forward" in module.__dict__ and getattr(module.forward, "__func__", None) in (
                _norm_forward, _attn_forward, _mlp_forward, _layer_forward):
            del module.forward
