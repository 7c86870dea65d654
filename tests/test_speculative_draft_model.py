"""The draft-model drafter: greedy output is token-identical to plain decoding under chunked prefill,
preemption and live k; its own KV pool rolls back rejected drafts and ends empty; a draft equal to
the target is accepted in full."""
import json

import pytest
import torch

from batchdeck.engine.config import ConfigError, EngineConfig, LiveConfig
from batchdeck.engine.llm_engine import LLMEngine
from batchdeck.engine.request import SamplingParams
from batchdeck.engine.speculative.draft_model import DraftModelDrafter
from tests.helpers import TINY, greedy, loaded, reference_tokens, save_tiny_model
from tests.test_speculative_engine import prompts_for, step_checked


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory):
    """A different random model with the same vocabulary: it proposes mostly wrong tokens."""
    return save_tiny_model("llama", str(tmp_path_factory.mktemp("draft") / "llama"), seed=7)


def draft_engine(path, draft, num_blocks=64, block_size=4, overlap=False, **live):
    cfg = EngineConfig(model=path, num_blocks=num_blocks, block_size=block_size, drafter="model", draft_model=draft,
                       async_scheduling=overlap)
    return LLMEngine(cfg, LiveConfig(**live), loaded=loaded(path), check_invariants=True)


def run_prompts(engine, prompts, max_tokens, sampling=None, k_schedule=None):
    for i, (p, n) in enumerate(zip(prompts, max_tokens)):
        engine.add_request(str(i), p, sampling(i, n) if sampling else greedy(n))
    assert isinstance(engine.drafter, DraftModelDrafter)
    return step_checked(engine, k_schedule)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_output_is_token_identical_with_a_draft_model(model_dirs, draft_dir, k):
    path = model_dirs["qwen3"]
    prompts, max_tokens = prompts_for(20 + k, count=5)
    engine = run_prompts(draft_engine(path, draft_dir, spec_k=k, max_num_seqs=3, max_batched_tokens=24,
                                      chunk_size=8, num_blocks=40), prompts, max_tokens)
    for i, (p, n) in enumerate(zip(prompts, max_tokens)):
        assert tuple(engine.requests[str(i)].output_token_ids) == reference_tokens(path, tuple(p), n)
    assert sum(r.spec_proposed for r in engine.requests.values()) > 0


@pytest.mark.parametrize("overlap", [False, True])  # overlapped iterations while spec_k is 0
def test_draft_model_under_preemption_and_live_k_changes(model_dirs, draft_dir, overlap):
    path = model_dirs["llama"]
    prompts, max_tokens = prompts_for(31, count=6)
    engine = run_prompts(draft_engine(path, draft_dir, max_num_seqs=6, max_batched_tokens=32, chunk_size=8,
                                      num_blocks=16, overlap=overlap), prompts, max_tokens,
                         k_schedule={0: 4, 4: 0, 7: 2, 11: 6})
    for i, (p, n) in enumerate(zip(prompts, max_tokens)):
        assert tuple(engine.requests[str(i)].output_token_ids) == reference_tokens(path, tuple(p), n)
    assert sum(r.num_preemptions for r in engine.requests.values()) > 0
    assert sum(r.spec_proposed for r in engine.requests.values()) > 0


def test_the_target_as_its_own_draft_is_accepted_in_full(model_dirs):
    path = model_dirs["qwen2"]
    prompts, max_tokens = prompts_for(5, count=4)
    engine = run_prompts(draft_engine(path, path, spec_k=4, max_num_seqs=4, max_batched_tokens=64, chunk_size=16),
                         prompts, max_tokens)
    reqs = list(engine.requests.values())
    proposed, accepted = sum(r.spec_proposed for r in reqs), sum(r.spec_accepted for r in reqs)
    assert proposed > 0 and accepted == proposed
    for i, (p, n) in enumerate(zip(prompts, max_tokens)):
        assert tuple(engine.requests[str(i)].output_token_ids) == reference_tokens(path, tuple(p), n)
    # with every draft accepted, each verification step yields k + 1 tokens (fewer only at max_tokens)
    steps = sum(r.spec_steps for r in reqs)
    assert accepted / steps > 2.5
    for r in reqs:  # per request: acceptance rate and mean accepted drafts per verification
        rec = engine.request_record(r)
        assert rec.spec_acceptance_rate == 1.0
        assert rec.spec_mean_accepted == pytest.approx(r.spec_accepted / r.spec_steps)


def test_sampled_requests_carry_the_draft_distribution(model_dirs, draft_dir):
    path = model_dirs["qwen3"]
    engine = draft_engine(path, draft_dir, spec_k=3, max_num_seqs=4)
    seen = []
    fill = engine.drafter.fill

    def spy(chunks):
        fill(chunks)
        seen.extend((len(c.draft), None if c.draft_probs is None else tuple(c.draft_probs.shape)) for c in chunks)

    engine.drafter.fill = spy
    prompts, _ = prompts_for(9, count=4)
    run_prompts(engine, prompts, [12] * 4,
                sampling=lambda i, n: SamplingParams(max_tokens=n, temperature=0.9, top_k=50, seed=i, ignore_eos=True))
    assert all(len(r.output_token_ids) == 12 for r in engine.requests.values())
    vocab = TINY["vocab_size"]
    assert seen and all(shape == (n, vocab) for n, shape in seen)


def test_draft_model_config_errors(model_dirs, tmp_path):
    path = model_dirs["qwen3"]
    with pytest.raises(ConfigError, match="draft_model=None .*drafter=model"):
        EngineConfig(model=path, drafter="model").validate()
    with pytest.raises(ConfigError, match="drafter='ngram' .*draft model is given"):
        EngineConfig(model=path, drafter="ngram", draft_model=path).validate()
    with pytest.raises(ConfigError, match="drafter='eagle' .*ngram, model"):
        EngineConfig(model=path, drafter="eagle").validate()
    from transformers import AutoConfig, AutoModelForCausalLM

    other = tmp_path / "big-vocab"
    AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **{**TINY, "vocab_size": 4000})).save_pretrained(other)
    with pytest.raises(ConfigError, match="vocab_size is 4000, the target's 300"):
        draft_engine(path, str(other))


def test_generate_cli_with_a_draft_model(tmp_path, model_dirs, draft_dir, capsys):
    from batchdeck.cli import main

    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    prompts, max_tokens = prompts_for(6, count=3)
    src.write_text("".join(json.dumps({"id": str(i), "prompt_token_ids": p, "max_tokens": n, "ignore_eos": True}) + "\n"
                           for i, (p, n) in enumerate(zip(prompts, max_tokens))))
    path = model_dirs["qwen3"]
    assert main(["generate", "--model", path, "--input", str(src), "--output", str(out), "--spec-k", "3",
                 "--drafter", "model", "--draft-model", draft_dir, "--block-size", "4", "--device", "cpu"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    for row, p, n in zip(rows, prompts, max_tokens):
        assert tuple(row["output_token_ids"]) == reference_tokens(path, tuple(p), n)
    assert sum(r["metrics"]["spec_proposed"] for r in rows) > 0
    assert main(["generate", "--model", path, "--input", str(src), "--output", str(out), "--drafter", "model"]) != 0
    assert "draft_model" in capsys.readouterr().err


def test_rejected_drafts_kv_is_rolled_back_in_the_draft_pool(model_dirs):
    """The target drafts for itself, but every other drafting iteration the first draft is forced
    wrong (inside the draft model, so its KV holds the wrong token) and is followed by a plain decode
    step (k = 0). Corrupted iterations accept nothing; the ones after them must accept everything,
    which holds only if the rejected drafts' KV was discarded."""
    path = model_dirs["qwen3"]
    records = []
    cfg = EngineConfig(model=path, num_blocks=64, block_size=4, drafter="model", draft_model=path)
    engine = LLMEngine(cfg, LiveConfig(spec_k=3, max_num_seqs=4, max_batched_tokens=64, chunk_size=16),
                       loaded=loaded(path), check_invariants=True,
                       sink=lambda kind, rec: records.append(rec) if kind == "iteration" else None)
    drafter = engine.drafter
    fills = [0]
    first_sample = [False]
    fill, fit = drafter.fill, drafter._fit_vocab

    def counting_fill(chunks):
        fills[0] += 1
        first_sample[0] = fills[0] % 2 == 0
        fill(chunks)

    def corrupting_fit(logits):
        logits = fit(logits).clone()
        if first_sample[0]:  # every row's first draft becomes its second-best token
            logits[torch.arange(len(logits)), logits.argmax(dim=-1)] = float("-inf")
            first_sample[0] = False
        return logits

    drafter.fill, drafter._fit_vocab = counting_fill, corrupting_fit
    prompts, _ = prompts_for(12, count=4)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, greedy(20))
    while engine.has_unfinished:
        before = fills[0]
        engine.step()
        if fills[0] != before and fills[0] % 2 == 0:
            engine.update_config({"spec_k": 0})
            engine.step()
            engine.update_config({"spec_k": 3})
    assert drafter.blocks.num_free == drafter.blocks.num_blocks
    spec = [r for r in records if r.spec_proposed]
    assert len(spec) >= 6
    for i, r in enumerate(spec):
        assert r.spec_accepted == (r.spec_proposed if i % 2 == 0 else 0), (i, r.spec_proposed, r.spec_accepted)


def test_cli_spec_k_limit_bounds_live_k(tmp_path, model_dirs, capsys):
    from batchdeck.cli import build_parser, main
    from batchdeck.engine.service.flags import engine_configs

    args = build_parser().parse_args(["generate", "--model", model_dirs["qwen3"], "--input", "x", "--output", "y",
                                      "--spec-k-limit", "2", "--device", "cpu"])
    cfg, live = engine_configs(args)
    assert cfg.spec_k_limit == 2 and live.spec_k == 0
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"prompt_token_ids": [1, 2, 3], "max_tokens": 2}) + "\n")
    assert main(["generate", "--model", model_dirs["qwen3"], "--input", str(src), "--output", str(tmp_path / "o"),
                 "--spec-k", "3", "--spec-k-limit", "2", "--device", "cpu"]) != 0
    assert "spec_k=3" in capsys.readouterr().err


def test_a_smaller_draft_vocabulary_skips_requests_with_ids_it_cannot_embed(model_dirs, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    path = model_dirs["qwen3"]  # vocabulary 300
    small = tmp_path / "draft-260"
    torch.manual_seed(3)
    AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **{**TINY, "vocab_size": 260})).save_pretrained(small)
    engine = draft_engine(path, str(small), spec_k=3, max_num_seqs=4)
    prompts = [[5, 280, 7, 9, 11], [5, 6, 7, 9, 11]]  # 280: in the target's vocabulary, not the draft's
    run_prompts(engine, prompts, [10, 10])
    for i, p in enumerate(prompts):
        assert tuple(engine.requests[str(i)].output_token_ids) == reference_tokens(path, tuple(p), 10)
    assert engine.requests["0"].spec_proposed == 0 and engine.requests["1"].spec_proposed > 0


def test_the_engine_releases_preempted_requests_without_forgetting_their_stream(model_dirs, draft_dir):
    engine = draft_engine(model_dirs["llama"], draft_dir, spec_k=4, max_num_seqs=6, max_batched_tokens=32,
                          chunk_size=8, num_blocks=16)
    calls = []
    release = engine.drafter.release

    def spy(request_id, finished=True):
        calls.append((request_id, finished))
        release(request_id, finished)

    engine.drafter.release = spy
    prompts, max_tokens = prompts_for(31, count=6)
    run_prompts(engine, prompts, max_tokens,
                sampling=lambda i, n: SamplingParams(max_tokens=n, temperature=0.8, seed=i, ignore_eos=True))
    preemptions = sum(r.num_preemptions for r in engine.requests.values())
    assert preemptions > 0 and sum(1 for _, finished in calls if not finished) == preemptions
    assert sorted(rid for rid, finished in calls if finished) == sorted(engine.requests)


def test_preemption_keeps_a_seeded_requests_draft_stream(model_dirs, draft_dir):
    """Resumed drafting must go on with fresh noise, not replay what the request's drafts already used."""
    engine = draft_engine(model_dirs["qwen3"], draft_dir, spec_k=2)
    drafter = engine.drafter
    gen = drafter.sampler.generator_for("r", 11)
    first = torch.empty(4).exponential_(generator=gen)
    drafter.release("r", finished=False)  # preempted
    after = torch.empty(4).exponential_(generator=drafter.sampler.generator_for("r", 11))
    assert not torch.equal(first, after)
    drafter.release("r")  # finished: the stream is forgotten
    assert torch.equal(first, torch.empty(4).exponential_(generator=drafter.sampler.generator_for("r", 11)))
