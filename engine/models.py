"""Model loading: `synthetic:<name>` (a real transformers architecture with a known model's shape
and seeded random weights), a local Hugging Face model directory, or a hub id (`Qwen/Qwen3-0.6B`)
found in the local Hugging Face cache. Nothing is ever downloaded.

End of sequence is what transformers' `generate()` stops at: the model's generation config, else its
config (a real tokenizer's EOS only when neither names one). The byte tokenizer's EOS is the
synthetic models' (their config names it); a directory without a tokenizer does not inherit it.

Speed depends on shapes, not weights, so synthetic shapes give honest speed numbers.
"""
from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from batchdeck.engine.attention.hf_hook import register
from batchdeck.engine.hub_cache import cached_snapshot, hub_cache_dir, looks_like_hub_id
from batchdeck.engine.import_bytecode import bytecode_hint
from batchdeck.engine.tokenizer import BYTE_BOS, BYTE_EOS, ByteTokenizer, HFTokenizer, Tokenizer

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, vocab_size=512, max_position_embeddings=4096,
             tie_word_embeddings=True, initializer_range=0.1)
_LLAMA3_ROPE = dict(rope_type="llama3", low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8192)

# name -> (model_type, config kwargs). Dimensions are the real models' (Qwen3-0.6B, Llama 3.x, ...).
SYNTHETIC_SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny": ("qwen3", _TINY),
    "tiny-llama": ("llama", _TINY),
    "tiny-qwen2": ("qwen2", _TINY),
    "tiny-mistral": ("mistral", dict(_TINY, sliding_window=None)),
    "qwen3-0.6b": ("qwen3", dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                                 num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                                 vocab_size=151936, max_position_embeddings=40960, rope_theta=1000000.0,
                                 rms_norm_eps=1e-6, tie_word_embeddings=True)),
    "qwen2.5-0.5b": ("qwen2", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                   num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                                   max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                                   tie_word_embeddings=True)),
    "llama-3.2-1b": ("llama", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                   num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                                   vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
                                   rope_scaling=dict(_LLAMA3_ROPE, factor=32.0), rms_norm_eps=1e-5,
                                   tie_word_embeddings=True)),
    "llama-3.1-8b": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                   vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
                                   rope_scaling=dict(_LLAMA3_ROPE, factor=8.0), rms_norm_eps=1e-5,
                                   tie_word_embeddings=False)),
    "mistral-7b": ("mistral", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                   vocab_size=32768, max_position_embeddings=32768, rope_theta=1000000.0,
                                   sliding_window=None, rms_norm_eps=1e-5, tie_word_embeddings=False)),
}
SYNTHETIC_CONTEXT_CAP = 8192  # synthetic shapes serve at most this context (keeps pools sane)


class ModelError(ValueError):
    """The model could not be loaded; the message says which and why."""


@dataclass
class LoadedModel:
    model: torch.nn.Module
    config: PretrainedConfig
    tokenizer: Tokenizer
    name: str
    max_model_len: int
    eos_token_ids: tuple[int, ...]

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def num_kv_heads(self) -> int:
        return getattr(self.config, "num_key_value_heads", None) or self.config.num_attention_heads

    @property
    def head_dim(self) -> int:
        return getattr(self.config, "head_dim", None) or self.config.hidden_size // self.config.num_attention_heads


def synthetic_config(name: str) -> PretrainedConfig:
    if name not in SYNTHETIC_SHAPES:
        raise ModelError(f"unknown synthetic model {name!r}: allowed " + ", ".join(f"synthetic:{n}" for n in SYNTHETIC_SHAPES))
    model_type, kwargs = SYNTHETIC_SHAPES[name]
    cfg = AutoConfig.for_model(model_type, bos_token_id=BYTE_BOS, eos_token_id=BYTE_EOS, **kwargs)
    return cfg


def _check_architecture(config: PretrainedConfig, source: str) -> type:
    arch = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
    if arch is None:
        raise ModelError(f"{source}: architecture {config.model_type!r} is not a causal LM transformers knows")
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    if not getattr(cls, "_supports_attention_backend", False):
        raise ModelError(
            f"{source}: architecture {cls.__name__} ({config.model_type}) does not route attention through "
            "transformers' attention interface, so batchdeck cannot page its KV cache"
        )
    return cls


def _eos_ids(model: torch.nn.Module, config: PretrainedConfig, tokenizer: Tokenizer) -> tuple[int, ...]:
    eos = None
    for source in (getattr(model, "generation_config", None), config):
        eos = getattr(source, "eos_token_id", None)
        if eos is not None:
            break
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return ()
    return tuple(int(t) for t in eos) if isinstance(eos, (list, tuple)) else (int(eos),)


def resolve_model_dir(spec: str) -> str:
    """A local directory as given, else a hub id's cached snapshot; ModelError says how to fix it."""
    if os.path.isdir(spec):
        return spec
    if not looks_like_hub_id(spec):
        raise ModelError(
            f"model {spec!r} is neither synthetic:<name>, a local model directory nor a Hugging Face hub id "
            "(ORG/NAME); allowed synthetic names: " + ", ".join(SYNTHETIC_SHAPES)
        )
    snapshot = cached_snapshot(spec)
    if snapshot is None:
        raise ModelError(
            f"model {spec!r} is not a local directory and not in the local Hugging Face cache ({hub_cache_dir()}; "
            f"set HF_HUB_CACHE or HF_HOME if it lives elsewhere). batchdeck never downloads: fetch it where there "
            f"is network (`hf download {spec}`), or point --model at a directory holding its config.json and "
            f"weights, e.g. --model /models/{spec.rsplit('/', 1)[-1]}"
        )
    return snapshot


@functools.cache
def _warn_once_if_compiled_from_source() -> None:
    """The heavy imports' bytecode is looked at once per process (the first model load)."""
    hint = bytecode_hint()
    if hint:
        log.warning(hint)


def load_model(spec: str, device: str = "cpu", dtype: str = "float32", seed: int = 0) -> LoadedModel:
    """Load `synthetic:<name>` or a local directory, with batchdeck's paged attention registered."""
    attn = register()
    _warn_once_if_compiled_from_source()
    torch_dtype = DTYPES[dtype]
    dev = torch.device(device)
    if spec.startswith("synthetic:"):
        name = spec.split(":", 1)[1]
        config = synthetic_config(name)
        _check_architecture(config, spec)
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(seed)
            if dev.type == "cuda":
                torch.cuda.manual_seed(seed)
            with dev:
                model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype, attn_implementation=attn)
        tokenizer: Tokenizer = ByteTokenizer()
        max_len = min(config.max_position_embeddings, SYNTHETIC_CONTEXT_CAP)
    else:
        path = resolve_model_dir(spec)
        try:
            config = AutoConfig.from_pretrained(path, local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - transformers raises many kinds
            raise ModelError(f"model directory {path!r} has no readable config.json: {exc}") from exc
        _check_architecture(config, spec)
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, attn_implementation=attn,
                                                         local_files_only=True).to(dev)
        except (OSError, ValueError) as exc:
            raise ModelError(f"model directory {path!r} could not be loaded: {exc}") from exc
        has_tokenizer = any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer.model", "vocab.json"))
        tokenizer = HFTokenizer(path) if has_tokenizer else ByteTokenizer(eos_token_id=None)
        max_len = getattr(config, "max_position_embeddings", 4096)
    model.eval()
    model.requires_grad_(False)
    name = spec
    return LoadedModel(model, config, tokenizer, name, max_len, _eos_ids(model, config, tokenizer))
