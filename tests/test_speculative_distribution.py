"""Speculative sampling keeps the target's output distribution, measured through the whole engine.

A tiny-vocabulary random model serves thousands of seeded, sampled requests (temperature 1) with
speculation on; a repetitive prompt makes the drafter propose at every decode step. The empirical
distribution of each output position is compared by a chi-square test with the exact marginal of
that position, computed by enumerating every prefix through the HF model directly. The same
harness, with the rejection rule's residual replaced by the plain target distribution, must fail.
"""
from __future__ import annotations

import functools
import itertools
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import batchdeck.engine.speculative.verify as verify_module
from batchdeck.engine.config import EngineConfig, LiveConfig
from batchdeck.engine.llm_engine import LLMEngine
from batchdeck.engine.request import SamplingParams
from tests.helpers import loaded, oracle_model

VOCAB = 8
TINY_VOCAB = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=16, vocab_size=VOCAB, max_position_embeddings=64,
                  tie_word_embeddings=False, initializer_range=0.2, bos_token_id=0, eos_token_id=1)
# x0 c x1 c ... x6 c: whatever the first output token t, the context's tail "c t" (or "t") occurred earlier,
# so n-gram lookup proposes at every decode step, and its first draft is always DRAFTED. One token drafted
# after every first token makes a wrong correction show plainly in position 2's marginal.
DRAFTED = 4
PROMPT = [t for x in range(VOCAB) if x != DRAFTED for t in (x, DRAFTED)]
MAX_TOKENS = 4
SPEC_K = 3  # the first decode step has room for 2 drafts (max_tokens), the next for 1
POSITIONS = (1, 2, 3, 4)  # 1: the prefill's token; 2, 3: drafts verified or corrected; 4: bonus or corrected
NUM_REQUESTS = 3000
# Chi-square critical values at p = 0.001, by degrees of freedom.
CHI2_CRITICAL_001 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322}


@dataclass(frozen=True)
class DrafterSetup:
    """How a drafter is switched on: EngineConfig kwargs (given the target model's directory, e.g. to
    save a draft model beside it) and an optional hook run on the built engine."""

    engine_kwargs: Callable[[str], dict[str, Any]]
    install: Callable[[LLMEngine], None] | None = None
    live_kwargs: dict[str, Any] = field(default_factory=dict)


def draft_model_beside(target_dir: str) -> dict[str, Any]:
    """A different random model with the target's 8-token vocabulary, saved next to it: its drafts
    follow a distribution q unlike p, so the rejection rule's min(1, p/q) and residual both matter."""
    path = os.path.join(os.path.dirname(target_dir), "draft")
    if not os.path.exists(os.path.join(path, "config.json")):
        torch.manual_seed(1)
        AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen3", **TINY_VOCAB)).save_pretrained(path)
    return {"drafter": "model", "draft_model": path}


DRAFTERS = [
    pytest.param(DrafterSetup(lambda target_dir: {"drafter": "ngram"}), id="ngram"),
    pytest.param(DrafterSetup(draft_model_beside), id="draft-model"),
]


@pytest.fixture(scope="module")
def vocab_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A random qwen3 with an 8-token vocabulary whose next-token distributions are spread out."""
    path = str(tmp_path_factory.mktemp("tiny_vocab") / "qwen3")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen3", **TINY_VOCAB)).save_pretrained(path)
    return path


@functools.lru_cache(maxsize=4)
def exact_marginals(path: str, prompt: tuple[int, ...], positions: tuple[int, ...]) -> dict[int, torch.Tensor]:
    """P(output token at position j = v) for every v, by enumerating all V^(j-1) prefixes (one batched
    forward per position) through the HF model itself."""
    model = oracle_model(path)
    prefix_probs = torch.ones(1, dtype=torch.float64)  # probability of each prefix of length j-1
    prefixes: list[tuple[int, ...]] = [()]
    out: dict[int, torch.Tensor] = {}
    with torch.inference_mode():
        for j in range(1, max(positions) + 1):
            ids = torch.tensor([prompt + p for p in prefixes])
            nxt = model(ids).logits[:, -1].double().softmax(-1)  # [V^(j-1), V]
            if j in positions:
                out[j] = prefix_probs @ nxt
            prefix_probs = (prefix_probs.unsqueeze(1) * nxt).reshape(-1)
            prefixes = [p + (v,) for p, v in itertools.product(prefixes, range(VOCAB))]
    return out


def chi_square(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> tuple[float, int]:
    """Pearson's statistic and its degrees of freedom; bins expected below `min_expected` are pooled
    (smallest first) until every bin reaches it."""
    expected = (probs * counts.sum()).tolist()
    observed = counts.double().tolist()
    bins = sorted(zip(expected, observed))
    while len(bins) > 1 and bins[0][0] < min_expected:
        (e0, o0), (e1, o1) = bins[0], bins[1]
        bins = sorted([(e0 + e1, o0 + o1)] + bins[2:])
    stat = sum((o - e) ** 2 / e for e, o in bins)
    return stat, len(bins) - 1


@dataclass
class RunStats:
    counts: dict[int, torch.Tensor]  # position -> [V] histogram of output tokens
    proposed: int
    accepted: int
    requests_without_proposal: int
    iteration_proposed: int
    iteration_accepted: int


def run_sampled(path: str, setup: DrafterSetup, num_requests: int, spec_k: int = SPEC_K,
                seed_base: int = 10_000) -> RunStats:
    """Serve `num_requests` seeded, sampled (temperature 1) copies of PROMPT; histogram their outputs."""
    records: list[Any] = []

    def sink(kind: str, record: Any) -> None:
        if kind == "iteration":
            records.append(record)

    cfg = EngineConfig(model=path, num_blocks=512, block_size=4, **setup.engine_kwargs(path))
    live = LiveConfig(**{"spec_k": spec_k, "max_num_seqs": 64, "max_batched_tokens": 512, **setup.live_kwargs})
    engine = LLMEngine(cfg, live, loaded=loaded(path), sink=sink, check_invariants=True)
    if setup.install is not None:
        setup.install(engine)
    engine.retain_finished = num_requests
    for i in range(num_requests):
        engine.add_request(str(i), PROMPT, SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0,
                                                          seed=seed_base + i, ignore_eos=True))
    engine.run_until_done()
    reqs = [engine.requests[str(i)] for i in range(num_requests)]
    counts = {j: torch.zeros(VOCAB, dtype=torch.int64) for j in POSITIONS}
    for r in reqs:
        assert len(r.output_token_ids) == MAX_TOKENS
        for j in POSITIONS:
            counts[j][r.output_token_ids[j - 1]] += 1
    assert engine.blocks.num_free == engine.blocks.num_blocks
    return RunStats(counts, sum(r.spec_proposed for r in reqs), sum(r.spec_accepted for r in reqs),
                    sum(1 for r in reqs if r.spec_proposed == 0),
                    sum(rec.spec_proposed for rec in records), sum(rec.spec_accepted for rec in records))


def residual_free_verify_sampled(target_probs: torch.Tensor, draft_tokens: list[int],
                                 draft_probs: torch.Tensor | None,
                                 generator: torch.Generator | None = None) -> list[int]:
    """rejection.verify_sampled with a broken correction: on rejection it samples from the target p
    instead of normalize(max(0, p - q)), which over-weights the rejected draft token."""
    k = len(draft_tokens)
    dev = target_probs.device
    if k == 0:
        return [int(torch.multinomial(target_probs[0], 1, generator=generator))]
    idx = torch.tensor(draft_tokens, device=dev)
    p = target_probs[:k].gather(1, idx.unsqueeze(1)).squeeze(1)
    q = torch.ones_like(p) if draft_probs is None else draft_probs.gather(1, idx.unsqueeze(1)).squeeze(1)
    u = torch.rand(k, device=dev, generator=generator)
    accept = (u * q < p).tolist()
    out: list[int] = []
    for i, ok in enumerate(accept):
        if not ok:
            out.append(int(torch.multinomial(target_probs[i], 1, generator=generator)))  # the bug
            return out
        out.append(draft_tokens[i])
    out.append(int(torch.multinomial(target_probs[k], 1, generator=generator)))
    return out


def position_statistics(path: str, stats: RunStats) -> dict[int, tuple[float, int]]:
    marginals = exact_marginals(path, tuple(PROMPT), POSITIONS)
    return {j: chi_square(stats.counts[j], marginals[j]) for j in POSITIONS}


@pytest.mark.parametrize("setup", DRAFTERS)
def test_speculative_sampling_keeps_the_target_distribution(vocab_model: str, setup: DrafterSetup) -> None:
    stats = run_sampled(vocab_model, setup, NUM_REQUESTS)
    # speculation really ran, both ways, at every request's first decode step
    assert stats.requests_without_proposal == 0
    assert 0 < stats.accepted < stats.proposed
    assert (stats.iteration_proposed, stats.iteration_accepted) == (stats.proposed, stats.accepted)
    for j, (stat, dof) in position_statistics(vocab_model, stats).items():
        assert dof >= 3, f"position {j}: the distribution collapsed into {dof + 1} bins"
        assert stat < CHI2_CRITICAL_001[dof], f"position {j}: chi-square {stat:.1f} with {dof} dof"
    # the harness itself, without speculation (a failure above that also shows here is the harness's)
    plain = run_sampled(vocab_model, setup, NUM_REQUESTS // 3, spec_k=0)
    assert plain.proposed == 0
    for j, (stat, dof) in position_statistics(vocab_model, plain).items():
        assert stat < CHI2_CRITICAL_001[dof], f"spec_k=0, position {j}: chi-square {stat:.1f} with {dof} dof"


@pytest.mark.parametrize("setup", DRAFTERS)
def test_the_harness_detects_a_correction_without_the_residual(vocab_model: str, setup: DrafterSetup,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    calls = [0]

    def broken(*args: Any, **kwargs: Any) -> list[int]:
        calls[0] += 1
        return residual_free_verify_sampled(*args, **kwargs)

    monkeypatch.setattr(verify_module, "verify_sampled", broken)
    stats = run_sampled(vocab_model, setup, NUM_REQUESTS)
    assert calls[0] > 0 and stats.accepted < stats.proposed  # the broken rule ran and rejected drafts
    results = position_statistics(vocab_model, stats)
    assert results[1][0] < CHI2_CRITICAL_001[results[1][1]]  # the prefill's token never meets the rule
    for j in (2, 3):  # the speculative positions
        stat, dof = results[j]
        assert stat > CHI2_CRITICAL_001[dof], f"position {j}: chi-square {stat:.1f} with {dof} dof"
