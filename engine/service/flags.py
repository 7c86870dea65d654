"""Engine flags shared by every command that starts an engine, and turning them into the engine's configs."""
from __future__ import annotations

import argparse
import sys
from typing import Any

from batchdeck.engine.config import DRAFTERS, ConfigError, EngineConfig, LiveConfig


def _json_object(text: str) -> dict:
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc.msg}): {text!r}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}")
    return value


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    """Model and sizing flags shared by every command that starts an engine."""
    p.add_argument("--model", default="synthetic:tiny", help="synthetic:<name> or a local HF model directory")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: float32 on cpu, bfloat16 on cuda")
    p.add_argument("--max-num-seqs", type=int, default=None, help="running cap (live setting)")
    p.add_argument("--max-batched-tokens", type=int, default=None, help="tokens per iteration (live setting)")
    p.add_argument("--chunk-size", type=int, default=None, help="prefill chunk cap per request (live setting)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_argument("--num-blocks", type=int, default=None, help="KV blocks in the pool (default: from memory)")
    p.add_argument("--gpu-memory-fraction", type=float, default=0.85, help="KV pool share of free GPU memory")
    p.add_argument("--policy", default=None, help="scheduling policy (live setting)")
    p.add_argument("--policy-params", default=None, type=_json_object,
                   help='policy parameters as JSON, e.g. \'{"aging_s": 10}\' (live setting)')
    p.add_argument("--batching", default=None, choices=["continuous", "static"], help="batching mode (live setting)")
    p.add_argument("--mixing", default=None, help="prefill/decode mixing mode (live setting)")
    p.add_argument("--spec-k", type=int, default=None, help="speculative decoding: draft tokens per step (live; 0 = off)")
    p.add_argument("--spec-k-limit", type=int, default=None,
                   help="the largest spec_k live config may ask for (default: 8, or --spec-k if larger; "
                        "0 leaves speculation off and captures no verify graphs)")
    p.add_argument("--drafter", default=None, choices=list(DRAFTERS),
                   help="speculative decoding's proposer: ngram (prompt lookup, the default) or model (--draft-model)")
    p.add_argument("--draft-model", default=None,
                   help="drafter=model: synthetic:<name> or a local directory sharing the target's vocabulary")
    p.add_argument("--max-waiting", type=int, default=None,
                   help="refuse new requests while this many wait (default: no bound)")
    p.add_argument("--attention-backend", default="auto", choices=["auto", "torch", "triton"])
    p.add_argument("--seed", type=int, default=0, help="seed for synthetic weights and unseeded sampling")


# The flags of add_engine_flags, by their EngineConfig / LiveConfig names.
ENGINE_FLAG_DESTS = ("model", "device", "dtype", "max_num_seqs", "max_batched_tokens", "chunk_size", "block_size",
                     "num_blocks", "gpu_memory_fraction", "policy", "policy_params", "batching", "mixing", "spec_k",
                     "spec_k_limit", "drafter", "draft_model", "max_waiting", "attention_backend", "seed")


def implied_drafter(args: argparse.Namespace) -> str | None:
    """--drafter, or `model` when only --draft-model is given."""
    return args.drafter or ("model" if args.draft_model else None)


def given_engine_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The engine flags set on the command line, by setting name, for commands whose flags default to
    None so that a preset's settings apply unless a flag is given (see `flags_default_to_none`)."""
    given = {d: getattr(args, d) for d in ENGINE_FLAG_DESTS if getattr(args, d, None) is not None}
    if implied_drafter(args):
        given["drafter"] = implied_drafter(args)
    return given


def flags_default_to_none(p: argparse.ArgumentParser) -> None:
    """Make every engine flag default to None: only what is given overrides a preset or the defaults."""
    p.set_defaults(**{dest: None for dest in ENGINE_FLAG_DESTS})


def engine_configs(args: argparse.Namespace) -> tuple[EngineConfig, LiveConfig]:
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    live = LiveConfig()
    overrides = {k: getattr(args, k) for k in ("max_num_seqs", "max_batched_tokens", "chunk_size", "policy",
                                               "policy_params", "batching", "mixing", "spec_k")
                 if getattr(args, k, None) is not None}
    if "max_batched_tokens" in overrides and "chunk_size" not in overrides:
        overrides["chunk_size"] = min(live.chunk_size, overrides["max_batched_tokens"])
    live = LiveConfig(**{**live.to_dict(), **overrides})
    cfg = EngineConfig(model=args.model, device=device, dtype=dtype, block_size=args.block_size,
                       num_blocks=args.num_blocks, gpu_memory_fraction=args.gpu_memory_fraction,
                       max_num_seqs_limit=max(256, live.max_num_seqs),
                       max_batched_tokens_limit=max(8192, live.max_batched_tokens),
                       attention_backend=args.attention_backend, seed=args.seed,
                       spec_k_limit=args.spec_k_limit if args.spec_k_limit is not None else max(8, live.spec_k),
                       drafter=implied_drafter(args) or "ngram", draft_model=args.draft_model,
                       max_waiting=getattr(args, "max_waiting", None))
    return cfg, live


def build_engine(args: argparse.Namespace, **kwargs):
    from batchdeck.engine.llm_engine import LLMEngine

    cfg, live = engine_configs(args)
    return LLMEngine(cfg, live, **kwargs)
