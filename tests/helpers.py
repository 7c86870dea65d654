"""Shared test helpers: tiny HF models saved to disk, and transformers' generate() as the oracle."""
from __future__ import annotations

import functools
import os

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from batchdeck.engine.config import EngineConfig, LiveConfig
from batchdeck.engine.llm_engine import LLMEngine
from batchdeck.engine.models import load_model
from batchdeck.engine.request import SamplingParams

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=300, max_position_embeddings=512,
            tie_word_embeddings=False, initializer_range=0.2, bos_token_id=256, eos_token_id=257)


# the simulator's cost per iteration for the hand-made synthetic:tiny profile (seconds per feature)
TINY_SIM_COST = {"constant": 2e-3, "prefill_tokens": 3e-5, "prefill_attention": 2e-3, "decode_rows": 4e-5,
                 "decode_context": 1e-5}


def save_tiny_profile(path) -> str:
    """Save a hand-made simulator profile of `synthetic:tiny` (TINY_SIM_COST, 8,192 blocks) at `path`:
    simulated engines in tests need no GPU and no calibration."""
    from batchdeck.engine.sim.cost_model import CostModel
    from batchdeck.engine.sim.profile import SimProfile

    SimProfile(name="test-tiny", model="synthetic:tiny", device_name="Test GPU", dtype="bfloat16", block_size=16,
               num_blocks=8192, kv_bytes_per_block=16384,
               model_shape={"vocab_size": 1024, "max_model_len": 8192, "eos_token_ids": [257]},
               cost=CostModel(dict(TINY_SIM_COST))).save(path)
    return str(path)


def save_tiny_model(model_type: str, path: str, seed: int = 0) -> str:
    """A random-weight model of `model_type` saved with save_pretrained (no tokenizer: byte-level)."""
    if not os.path.exists(os.path.join(path, "config.json")):
        cfg = AutoConfig.for_model(model_type, **TINY)
        torch.manual_seed(seed)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return path


@functools.lru_cache(maxsize=8)
def oracle_model(path: str):
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    m.generation_config.eos_token_id = None  # the engine side runs with ignore_eos
    return m.eval()


@functools.lru_cache(maxsize=4096)
def reference_tokens(path: str, prompt: tuple[int, ...], max_tokens: int) -> tuple[int, ...]:
    """Greedy tokens from transformers' own generate() for this prompt alone."""
    model = oracle_model(path)
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                             do_sample=False, pad_token_id=0)
    return tuple(out[0, len(prompt):].tolist())


@functools.lru_cache(maxsize=8)
def loaded(path: str):
    return load_model(path)


def make_engine(path: str, *, num_blocks: int = 256, block_size: int = 16, sink=None, overlap: bool = False,
                **live) -> LLMEngine:
    """`overlap`: async scheduling (overlapped iterations), off by default on cpu."""
    kwargs = {"sink": sink} if sink is not None else {}
    return LLMEngine(EngineConfig(model=path, num_blocks=num_blocks, block_size=block_size, async_scheduling=overlap),
                     LiveConfig(**live), loaded=loaded(path), check_invariants=True, **kwargs)


def fail_steps(llm: LLMEngine, when, message: str = "injected step failure") -> None:
    """Make `llm.step` raise RuntimeError(message) from the first step at which `when()` is true."""
    real = llm.step

    def step():
        if when():
            raise RuntimeError(message)
        return real()

    llm.step = step


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True)


def advance(plan, token=1):
    """Pretend the model ran the plan: computed tokens advance, sampling chunks append a token."""
    for c in plan.chunks:
        if c.padding:
            continue
        c.request.num_computed_tokens += c.num_tokens
        if c.samples:
            c.request.append_token(token, 0.0)


REVISION = "0123456789abcdef0123456789abcdef01234567"


def fake_hub_cache(root, repo_id: str) -> str:
    """A hub cache laid out as huggingface_hub lays it out (models--ORG--NAME/refs/main naming
    snapshots/<rev>/), holding a tiny qwen3 saved with save_pretrained; returns the snapshot directory."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REVISION)
    save_tiny_model("qwen3", str(repo / "snapshots" / REVISION))
    return str(repo / "snapshots" / REVISION)
