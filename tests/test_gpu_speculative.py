"""Speculative decoding on the CUDA path: speculating iterations replay CUDA graphs (the mixed
buckets keep logits for every verified position) and greedy float32 output stays token-identical
to plain decoding, for the n-gram drafter and for a draft model. Skipped without CUDA."""
from __future__ import annotations

import pytest
import torch

from batchdeck.engine.config import EngineConfig, LiveConfig
from batchdeck.engine.llm_engine import LLMEngine
from batchdeck.engine.request import SamplingParams
from tests.test_gpu_engine import _loaded, _prompts

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _run(prompts, max_tokens, *, spec_k=0, drafter="ngram", draft_model=None, **live):
    cfg = EngineConfig(model="synthetic:tiny", device="cuda", dtype="float32", num_blocks=512,
                       max_num_seqs_limit=16, max_batched_tokens_limit=256, cuda_graphs=True,
                       drafter=drafter, draft_model=draft_model)
    records = []
    # the draft's synthetic weights are drawn on the CPU too (as _loaded does), so "synthetic:tiny" is the target
    draft = None if draft_model is None else _loaded("cuda", draft_model)
    engine = LLMEngine(cfg, LiveConfig(spec_k=spec_k, **live), loaded=_loaded("cuda"), check_invariants=True,
                       sink=lambda kind, rec: records.append(rec) if kind == "iteration" else None, draft_loaded=draft)
    for i, (p, n) in enumerate(zip(prompts, max_tokens)):
        engine.add_request(str(i), p, SamplingParams(max_tokens=n, ignore_eos=True))
    engine.run_until_done()
    assert engine.blocks.num_free == engine.blocks.num_blocks
    return engine, records, [engine.requests[str(i)].output_token_ids for i in range(len(prompts))]


@pytest.mark.parametrize("drafter,draft_model", [("ngram", None), ("model", "synthetic:tiny"),
                                                 ("model", "synthetic:tiny-llama")])
def test_speculation_on_cuda_graphs_is_token_identical(drafter, draft_model):
    prompts, max_tokens = _prompts(11, 10, max_len=60)
    prompts = [p + p[: len(p) // 2] for p in prompts]  # repeated spans give the n-gram drafter matches
    live = dict(max_num_seqs=8, max_batched_tokens=128, chunk_size=64)
    _, _, plain = _run(prompts, max_tokens, **live)
    engine, records, spec = _run(prompts, max_tokens, spec_k=3, drafter=drafter, draft_model=draft_model, **live)
    assert spec == plain
    assert sum(r.spec_proposed for r in records) > 0
    stats = engine.runner.graphs.stats
    assert stats.replays > 0 and stats.eager == 0  # speculating iterations replayed graphs too
    if draft_model == "synthetic:tiny":  # the target drafting for itself: (nearly) everything is accepted
        assert sum(r.spec_accepted for r in records) >= 0.9 * sum(r.spec_proposed for r in records)


@pytest.mark.parametrize("drafter,draft_model", [("ngram", None), ("model", "synthetic:tiny-llama")])
def test_sampled_speculation_on_cuda_keeps_lengths_and_pools(drafter, draft_model):
    """Sampled requests (seeded, top-k/top-p) through the rejection rule on the device, bfloat16."""
    cfg = EngineConfig(model="synthetic:tiny", device="cuda", dtype="bfloat16", num_blocks=256,
                       max_num_seqs_limit=16, max_batched_tokens_limit=256, drafter=drafter, draft_model=draft_model)
    engine = LLMEngine(cfg, LiveConfig(spec_k=4, max_num_seqs=8, max_batched_tokens=128, chunk_size=64),
                       check_invariants=True)
    prompts, _ = _prompts(5, 12, max_len=40)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p + p, SamplingParams(max_tokens=24, temperature=0.9, top_k=40, top_p=0.95,
                                                         seed=i, ignore_eos=True))
    engine.run_until_done()
    reqs = [engine.requests[str(i)] for i in range(len(prompts))]
    assert all(len(r.output_token_ids) == 24 for r in reqs)
    assert sum(r.spec_proposed for r in reqs) > 0
    assert engine.blocks.num_free == engine.blocks.num_blocks
    if draft_model:
        assert engine.drafter.blocks.num_free == engine.drafter.blocks.num_blocks
