"""Fewer, fused kernels inside each layer: Triton replacements of HF module forwards (CUDA only).

In a CUDA graph the GPU still pays a few microseconds per kernel, and a stock HF decoder layer
launches about 80 of them (RMSNorm alone is 6-7 elementwise kernels, q/k norm and the rotary
embedding about 25). `fuse_model` swaps, per module instance (never the classes, so other models
in the process stay stock), at BATCHDECK_FUSED level 1:

- every `*RMSNorm` forward -> one kernel;
- Qwen3 / Llama attention -> one q|k|v matmul (weights concatenated, the three Linear weights
  become views of it), one kernel for q/k RMSNorm (Qwen3) + rotary embedding of every head, then
  the engine's paged-attention backend and o_proj;
- SiLU MLPs -> one gate|up matmul (concatenated the same way), one SiLU-mul kernel, down_proj;
- Qwen3 / Llama decoder layers -> the post-attention residual add fused into the RMSNorm after it.

and at level 2 also across modules, on the Qwen3 / Llama base model:

- each layer's closing residual add fused into the next layer's input RMSNorm (the last one into
  the final norm);
- cos/sin read from a [max_position_embeddings, head_dim] table by position inside the q/k kernel
  (no per-step rotary kernels);
- the q/k kernel also writes k and v into the paged KV pool (no separate K/V-write kernel).

Kernels of one decode step with L layers and split-KV attention (counted on the CPU through Triton's
interpreter): stock about 80 L; level 1 12 L + 14 (per layer: RMSNorm, qkv GEMM, q/k norm+rope,
K/V write, split attention, combine, o_proj, add+RMSNorm, gate|up GEMM, SiLU-mul, down GEMM,
residual add; per step: embedding, 7 rotary ops, final norm, logits row select, lm_head); level 2
10 L + 4 (per layer: add+RMSNorm, qkv GEMM, q/k norm+rope+K/V write, split attention, combine,
o_proj, add+RMSNorm, gate|up GEMM, SiLU-mul, down GEMM; per step: embedding, final add+RMSNorm,
logits row select, lm_head). The kernels reproduce the HF modules' rounding steps (each HF op
that returns the model dtype is rounded the same way here), so float32 results differ only by
reduction order, and levels 1 and 2 give identical results. Level 3 (the default) also runs the qkv,
o_proj, gate|up and down_proj linears and the lm_head through the weight-streaming small-M kernel of
engine/small_m_linear.py where its rule takes the shape (up to 16 rows every layer linear, up to 64 the
large weights; the lm_head from 16 rows), the SiLU-mul in the gate|up kernel's epilogue (9 kernels per layer; its own reduction
order, the same rounding steps): on an H200 a qwen3-0.6b layer's linears at one row take 20.1 us there
against 31.6 us through cuBLAS (benchmarks/results/gpu_gemv_h200.json), llama-3.1-8b's at 64 rows
122.5 us against 126.6 (…_wide.json). BATCHDECK_FUSED=0 keeps the stock modules.
"""
from __future__ import annotations

import os
import types

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from batchdeck.engine.pdl import pdl_launch, pdl_prologue
from batchdeck.engine.small_m_linear import counters, num_sms, small_m_linear
from batchdeck.engine.small_m_rule import pick_config


@triton.jit
def rmsnorm_kernel(X, W, Y, stride_x, stride_y, N, eps, BLOCK: tl.constexpr, USE_PDL: tl.constexpr = False):
    pdl_prologue(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    var = tl.sum(x * x, axis=0) / N
    xn = (x * (1.0 / tl.sqrt(var + eps))).to(Y.dtype.element_ty)
    w = tl.load(W + offs, mask=mask, other=0.0)
    tl.store(Y + row * stride_y + offs, (w.to(tl.float32) * xn.to(tl.float32)).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def add_rmsnorm_kernel(X, H, W, R, Y, stride_x, stride_h, stride_r, stride_y, N, eps, BLOCK: tl.constexpr,
                       USE_PDL: tl.constexpr = False):
    """R = X + H (rounded to the model dtype, as the HF residual add), Y = RMSNorm(R)."""
    pdl_prologue(USE_PDL)
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
def qk_norm_rope_kernel(QKV, COS, SIN, POS, QW, KW, Q, K, KC, VC, SLOT, stride_qkv, stride_cos, stride_cs, stride_ch,
                        eps, max_pos, H: tl.constexpr, KVH: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr,
                        NH_P2: tl.constexpr, KVH_P2: tl.constexpr, HAS_NORM: tl.constexpr, USE_POS: tl.constexpr,
                        WRITE_CACHE: tl.constexpr, USE_PDL: tl.constexpr = False):
    """One program per token: every q and k head of it (q heads first), RMSNorm on each head's
    D values (Qwen3), then the rotary embedding (rotate-half form). q goes to Q [T, H, D]; k goes to
    K [T, KVH, D], or with WRITE_CACHE, k and v go straight into the paged pool at the token's slot
    (slot -1: padding, skipped). USE_POS: COS/SIN are [max_pos, D] tables indexed by POS[t]; else
    they hold one row per token."""
    pdl_prologue(USE_PDL)
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
    if USE_POS:
        p = tl.load(POS + t).to(tl.int64)
        crow = tl.minimum(tl.maximum(p, 0), max_pos - 1) * stride_cos
    else:
        crow = t * stride_cos
    c1 = tl.load(COS + crow + offs).to(tl.float32)
    c2 = tl.load(COS + crow + HALF + offs).to(tl.float32)
    s1 = tl.load(SIN + crow + offs).to(tl.float32)
    s2 = tl.load(SIN + crow + HALF + offs).to(tl.float32)
    y1 = x1.to(tl.float32)
    y2 = x2.to(tl.float32)
    o1 = ((y1 * c1).to(dt).to(tl.float32) + (-y2 * s1).to(dt).to(tl.float32)).to(dt)
    o2 = ((y2 * c2).to(dt).to(tl.float32) + (y1 * s2).to(dt).to(tl.float32)).to(dt)
    q_dst = Q + t * (H * D) + hh * D + offs
    tl.store(q_dst, o1, mask=is_q)
    tl.store(q_dst + HALF, o2, mask=is_q)
    kh = tl.where(hh >= H, hh - H, 0)
    if WRITE_CACHE:
        slot = tl.load(SLOT + t + tl.zeros([1, 1], dtype=tl.int64)).to(tl.int64)  # [1, 1]: broadcasts
        k_mask = hmask & (hh >= H) & (slot >= 0)
        k_dst = KC + slot * stride_cs + kh * stride_ch + offs
        tl.store(k_dst, o1.to(KC.dtype.element_ty), mask=k_mask)
        tl.store(k_dst + HALF, o2.to(KC.dtype.element_ty), mask=k_mask)
        vh = tl.arange(0, KVH_P2)[:, None]
        dd = tl.arange(0, D)[None, :]
        v_mask = (vh < KVH) & (slot >= 0)
        v = tl.load(QKV + t * stride_qkv + (H + KVH) * D + vh * D + dd, mask=v_mask, other=0.0)
        tl.store(VC + slot * stride_cs + vh * stride_ch + dd, v.to(VC.dtype.element_ty), mask=v_mask)
    else:
        k_mask = hmask & (hh >= H)
        k_dst = K + t * (KVH * D) + kh * D + offs
        tl.store(k_dst, o1, mask=k_mask)
        tl.store(k_dst + HALF, o2, mask=k_mask)


@triton.jit
def silu_mul_kernel(GU, OUT, stride_gu, stride_out, I, BLOCK: tl.constexpr, USE_PDL: tl.constexpr = False):
    pdl_prologue(USE_PDL)
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
        pdl = pdl_launch(x2.device)
        rmsnorm_kernel[(x2.shape[0],)](x2, weight, y, x2.stride(0), y.stride(0), n, eps, BLOCK=block,
                                       num_warps=4 if block <= 2048 else 8, **pdl)
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
        pdl = pdl_launch(x2.device)
        add_rmsnorm_kernel[(x2.shape[0],)](x2, h2, weight, r, y, x2.stride(0), h2.stride(0), r.stride(0), y.stride(0),
                                           n, eps, BLOCK=block, num_warps=4 if block <= 2048 else 8,
                                           **pdl)
    return r.view(x.shape), y.view(x.shape)


def silu_mul(gu: torch.Tensor) -> torch.Tensor:
    i = gu.shape[-1] // 2
    g2 = gu.reshape(-1, 2 * i)
    out = torch.empty((g2.shape[0], i), dtype=gu.dtype, device=gu.device)
    if g2.shape[0]:
        block = 1024
        pdl = pdl_launch(g2.device)
        silu_mul_kernel[(g2.shape[0], triton.cdiv(i, block))](g2, out, g2.stride(0), out.stride(0), i, BLOCK=block,
                                                               **pdl)
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


def _linear(small_m: bool, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None,
            silu: bool = False) -> torch.Tensor:
    """F.linear (then SiLU-mul with `silu`), or at level 3 the small-M kernel where its rule takes the shape."""
    if small_m and x.dtype == w.dtype:
        k = x.shape[-1]
        m = x.numel() // k if k else 0
        config = pick_config(m, w.shape[0] // 2 if silu else w.shape[0], k, num_sms(x.device), x.element_size(), silu)
        if config is not None:
            return small_m_linear(x, w, b, silu_mul=silu, config=config)
    y = F.linear(x, w, b)
    return silu_mul(y) if silu else y


def _lm_head_forward(self, x):
    return _linear(True, x, self.weight, self.bias)


def _mlp_forward(self, x):
    small_m = self._bd_small_m
    h = _linear(small_m, x, self._bd_gate_up, silu=True)
    return _linear(small_m, h, self.down_proj.weight, self.down_proj.bias)


def _attn_forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None,
                  **kwargs):
    step = kwargs["batchdeck_step"]
    shape = hidden_states.shape[:-1]
    x = hidden_states.reshape(-1, hidden_states.shape[-1])
    qkv = _linear(self._bd_small_m, x, self._bd_qkv_weight, self._bd_qkv_bias)
    t = x.shape[0]
    h, kvh, d = self._bd_heads
    rope = kwargs.get("batchdeck_rope")  # (cos table, sin table, flat positions) from _model_forward
    if rope is not None:
        cos, sin, pos = rope
    else:
        cos, sin = position_embeddings
        cos, sin = cos.reshape(-1, d), sin.reshape(-1, d)
        pos = cos
    layer = self.layer_idx
    k_cache, v_cache = step.kv_cache.keys[layer], step.kv_cache.values[layer]
    meta = step.metadata
    write_cache = self._bd_write_cache and hasattr(step.backend, "attend")
    q = torch.empty((t, h, d), dtype=qkv.dtype, device=qkv.device)
    k = q if write_cache else torch.empty((t, kvh, d), dtype=qkv.dtype, device=qkv.device)
    if t:
        norm = getattr(self, "q_norm", None)
        nh = _pow2(h + kvh)
        pdl = pdl_launch(qkv.device)
        qk_norm_rope_kernel[(t,)](
            qkv, cos, sin, pos, norm.weight if norm is not None else qkv,
            self.k_norm.weight if norm is not None else qkv, q, k, k_cache, v_cache, meta.slot_mapping,
            qkv.stride(0), cos.stride(0), k_cache.stride(1), k_cache.stride(2),
            norm.variance_epsilon if norm is not None else 0.0, cos.shape[0],
            H=h, KVH=kvh, D=d, HALF=d // 2, NH_P2=nh, KVH_P2=_pow2(kvh), HAS_NORM=norm is not None,
            USE_POS=rope is not None, WRITE_CACHE=write_cache, num_warps=4 if nh * d <= 4096 else 8,
            **pdl)
    window = getattr(self, "sliding_window", None)
    if write_cache:
        out = torch.empty_like(q)
        step.backend.attend(q, k_cache, v_cache, out, meta.block_tables, meta.query_start_loc, meta.seq_lens,
                            self.scaling, window, decode_only=meta.max_query_len == 1, row_order=meta.row_order)
    else:
        v = qkv[:, (h + kvh) * d:].view(t, kvh, d)
        out = step.backend.forward(q, k, v, k_cache, v_cache, meta, self.scaling, window)
    return _linear(self._bd_small_m, out.reshape(*shape, h * d), self.o_proj.weight, self.o_proj.bias), None


def _model_forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                   use_cache=None, **kwargs):
    """The HF base model's forward for engine steps, every layer's end-of-layer residual add fused
    into the next RMSNorm (the last one into the final norm), the rotary embedding read from a table
    inside the q/k kernel. Anything else (no step context, embeddings given, a cache asked for, hidden
    states or attentions asked for) runs the stock forward."""
    step = kwargs.get("batchdeck_step")
    if step is None or input_ids is None or inputs_embeds is not None or position_ids is None or use_cache \
            or kwargs.get("output_hidden_states") or kwargs.get("output_attentions"):
        return type(self).forward(self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                  inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
    from transformers.modeling_outputs import BaseModelOutputWithPast

    h = self.embed_tokens(input_ids)
    cos, sin = self._bd_rope
    rope = (cos, sin, position_ids.reshape(-1))
    residual = None
    for layer in self.layers[: self.config.num_hidden_layers]:
        norm = layer.input_layernorm
        if residual is None:
            residual, x = h, rmsnorm(h, norm.weight, norm.variance_epsilon)
        else:
            residual, x = add_rmsnorm(residual, h, norm.weight, norm.variance_epsilon)
        a, _ = layer.self_attn(hidden_states=x, position_embeddings=None, attention_mask=None,
                               batchdeck_step=step, batchdeck_rope=rope)
        norm = layer.post_attention_layernorm
        residual, x = add_rmsnorm(residual, a, norm.weight, norm.variance_epsilon)
        h = layer.mlp(x)
    if residual is None:
        out = rmsnorm(h, self.norm.weight, self.norm.variance_epsilon)
    else:
        _, out = add_rmsnorm(residual, h, self.norm.weight, self.norm.variance_epsilon)
    return BaseModelOutputWithPast(last_hidden_state=out)


# Rotary types whose cos/sin depend on the position only (not on the sequence length): a table serves them.
STATIC_ROPE_TYPES = ("default", "linear", "llama3")


def _rope_table(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """cos and sin [max_position_embeddings, head_dim] from the model's own rotary module (the same
    elementwise ops per position as a step computes, so the values are identical), or None."""
    rotary = getattr(model, "rotary_emb", None)
    n = getattr(model.config, "max_position_embeddings", None)
    if rotary is None or not n or getattr(rotary, "rope_type", "default") not in STATIC_ROPE_TYPES:
        return None
    w = model.embed_tokens.weight
    with torch.inference_mode(False), torch.no_grad():
        cos, sin = rotary(torch.empty(1, dtype=w.dtype, device=w.device), torch.arange(n, device=w.device)[None])
    return cos[0].contiguous(), sin[0].contiguous()


def _fuse_base_model(model: torch.nn.Module) -> bool:
    """Install _model_forward on a Qwen3/Llama base model whose every layer, attention, MLP and norm
    runs fused in the model's dtype."""
    layers = getattr(model, "layers", None)
    if layers is None or not all(hasattr(model, a) for a in ("embed_tokens", "norm", "config")):
        return False
    dtype = model.embed_tokens.weight.dtype
    norms = [model.norm] + [n for layer in layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]
    if not all(getattr(n.forward, "__func__", None) is _norm_forward and n.weight.dtype == dtype for n in norms):
        return False
    if not all(getattr(layer.self_attn.forward, "__func__", None) is _attn_forward
               and getattr(layer.mlp.forward, "__func__", None) is _mlp_forward for layer in layers):
        return False
    table = _rope_table(model)
    if table is None:
        return False
    model._bd_rope = table
    model.forward = types.MethodType(_model_forward, model)
    return True


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


DEFAULT_FUSION_LEVEL = 3


def fusion_level() -> int:
    """BATCHDECK_FUSED: 0 stock modules, 1 per-module fusions, 2 also across modules, 3 (the default) also
    the layer's linears through the small-M kernel (engine/small_m_linear.py) for decode-sized batches."""
    raw = os.environ.get("BATCHDECK_FUSED", str(DEFAULT_FUSION_LEVEL))
    if raw not in ("0", "1", "2", "3"):
        raise ValueError(f"BATCHDECK_FUSED={raw!r}: allowed 0 (stock), 1 (per module), 2 (across modules), "
                         "3 (also the small-M Triton linears for decode-sized batches, the default)")
    return int(raw)


def fuse_model(model: torch.nn.Module) -> dict[str, int]:
    """Swap module forwards for the fused versions; returns how many of each were swapped."""
    counts = {"rmsnorm": 0, "attention": 0, "mlp": 0, "layer": 0, "model": 0, "lm_head": 0}
    level = fusion_level()
    if level == 0:
        return counts
    if level >= 3:
        param = next(model.parameters(), None)
        if param is not None:
            counters(param.device)  # the split-K counters exist before any graph capture
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
            module._bd_write_cache = level >= 2
            module._bd_small_m = level >= 3
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
            module._bd_small_m = level >= 3
            module.forward = types.MethodType(_mlp_forward, module)
            counts["mlp"] += 1
    head = model.get_output_embeddings() if level >= 3 and hasattr(model, "get_output_embeddings") else None
    if type(head) is torch.nn.Linear and head.weight.dim() == 2 and head.weight.stride(1) == 1:
        head.forward = types.MethodType(_lm_head_forward, head)
        counts["lm_head"] += 1
    if level >= 2:
        for module in model.modules():
            if type(module).__name__ in ("Qwen3Model", "LlamaModel") and _fuse_base_model(module):
                counts["model"] += 1
    return counts


def unfuse_model(model: torch.nn.Module) -> None:
    """Back to the stock forwards (the concatenated weights stay: the modules hold views of them): every
    forward `fuse_model` bound from this module goes, whichever module it was bound to."""
    for module in model.modules():
        func = getattr(module.__dict__.get("forward"), "__func__", None)
        if func is not None and func.__module__ == __name__:
            del module.forward
