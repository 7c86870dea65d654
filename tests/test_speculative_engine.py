"""Speculative decoding inside the iteration: greedy output is token-identical to plain decoding,
whatever the drafts, k, chunking, preemption and live changes of k; rejected KV is rolled back."""
import random

import pytest

from batchdeck.engine.block_manager import blocks_needed
from batchdeck.engine.config import ConfigError
from batchdeck.engine.speculative.draft_model import DraftModelDrafter
from batchdeck.engine.speculative.drafter import LookupDrafter
from batchdeck.engine.speculative.ngram import propose_ngram
from tests.helpers import greedy, make_engine, reference_tokens


def use_drafter(engine, propose):
    """Replace the engine's drafter by a lookup drafter around `propose(token_ids, k)`."""
    engine.drafter = engine.scheduler.drafter = LookupDrafter(propose)


def oracle_drafter(path, prompts, max_tokens, wrong_every=0):
    """Proposes the true continuation (from transformers' generate), optionally corrupting some
    drafts, so both the accept and the reject paths run on a random-weight model."""
    truth = {tuple(p): list(p) + list(reference_tokens(path, tuple(p), n)) for p, n in zip(prompts, max_tokens)}
    calls = [0]

    def draft(token_ids, k):
        for prompt, full in truth.items():
            if list(token_ids) == full[:len(token_ids)] and len(token_ids) >= len(prompt):
                out = full[len(token_ids):len(token_ids) + k]
                calls[0] += 1
                if wrong_every and calls[0] % wrong_every == 0 and out:
                    out = out[:-1] + [(out[-1] + 1) % 256]
                return out
        return []

    return draft


def run(path, prompts, max_tokens, drafter=None, k_schedule=None, **knobs):
    engine = make_engine(path, **knobs)
    if drafter is not None:
        use_drafter(engine, drafter)
    for i, (p, n) in enumerate(zip(prompts, max_tokens)):
        engine.add_request(str(i), p, greedy(n))
    return step_checked(engine, k_schedule)


def step_checked(engine, k_schedule=None):
    """Step to the end (setting spec_k at the steps `k_schedule` names), checking after every step
    that the KV pools hold exactly what is computed: rejected drafts' blocks went back, in the draft
    model's pool too; both pools are empty at the end."""
    draft = engine.drafter if isinstance(engine.drafter, DraftModelDrafter) else None
    bs = engine.blocks.block_size
    step = 0
    while engine.has_unfinished:
        if k_schedule and step in k_schedule:
            engine.update_config({"spec_k": k_schedule[step]})
        engine.step()
        step += 1
        for r in engine.scheduler.running:
            assert len(engine.blocks.table(r.request_id)) == blocks_needed(r.num_computed_tokens, bs)
            kv = draft.kv.get(r.request_id) if draft else None
            if kv is not None:
                assert kv.computed <= len(r.token_ids)
                assert len(draft.blocks.table(r.request_id)) == blocks_needed(kv.computed, bs)
    assert engine.blocks.num_free == engine.blocks.num_blocks
    if draft:
        assert draft.blocks.num_free == draft.blocks.num_blocks and not draft.kv
    return engine


def prompts_for(seed, count=5):
    rng = random.Random(seed)
    base = [rng.randrange(256) for _ in range(6)]
    prompts = [base * rng.randrange(1, 4) + [rng.randrange(256) for _ in range(rng.randrange(1, 8))]
               for _ in range(count)]
    return prompts, [rng.randrange(4, 16) for _ in range(count)]


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("wrong_every", [0, 3])
def test_greedy_speculation_is_token_identical(model_dirs, k, wrong_every):
    path = model_dirs["qwen3"]
    prompts, max_tokens = prompts_for(k + 10 * wrong_every)
    engine = run(path, prompts, max_tokens, oracle_drafter(path, prompts, max_tokens, wrong_every),
                 spec_k=k, max_num_seqs=3, max_batched_tokens=24, chunk_size=8, block_size=4, num_blocks=40,
                 overlap=k == 2)  # async scheduling on: speculating iterations run synchronously
    for i, (p, n) in enumerate(zip(prompts, max_tokens)):
        assert tuple(engine.requests[str(i)].output_token_ids) == reference_tokens(path, tuple(p), n)
    proposed = sum(r.spec_proposed for r in engine.requests.values())
    accepted = sum(r.spec_accepted for r in engine.requests.values())
    assert proposed > 0 and accepted > 0
    assert (accepted < proposed) == bool(wrong_every)


@pytest.mark.parametrize("overlap", [False, True])  # overlapped iterations while spec_k is 0
def test_ngram_drafter_under_preemption_and_live_k_changes(model_dirs, overlap):
    path = model_dirs["llama"]
    prompts, max_tokens = prompts_for(7, count=6)
    engine = run(path, prompts, max_tokens, propose_ngram, k_schedule={0: 3, 5: 0, 9: 2, 14: 4},
                 max_num_seqs=6, max_batched_tokens=32, chunk_size=8, block_size=4, num_blocks=16, overlap=overlap)
    for i, (p, n) in enumerate(zip(prompts, max_tokens)):
        assert tuple(engine.requests[str(i)].output_token_ids) == reference_tokens(path, tuple(p), n)
    assert sum(r.num_preemptions for r in engine.requests.values()) > 0
    assert sum(r.spec_proposed for r in engine.requests.values()) > 0


def test_spec_k_is_bounded(model_dirs):
    engine = make_engine(model_dirs["qwen3"])
    with pytest.raises(ConfigError, match=r"spec_k=99 .*\[0, 8\]"):
        engine.update_config({"spec_k": 99})


def test_sampled_requests_speculate_and_keep_their_lengths(model_dirs):
    from batchdeck.engine.request import SamplingParams

    engine = make_engine(model_dirs["qwen2"], spec_k=3, max_num_seqs=4, block_size=4, num_blocks=64)
    use_drafter(engine, lambda tokens, k: [tokens[-1]] * k)  # always proposes: exercises verification
    prompts, _ = prompts_for(3, count=4)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(max_tokens=12, temperature=0.8, seed=i, ignore_eos=True))
    engine.run_until_done()
    assert all(len(r.output_token_ids) == 12 for r in engine.requests.values())
    assert sum(r.spec_proposed for r in engine.requests.values()) > 0
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_generate_cli_reports_speculation_metrics(tmp_path, model_dirs):
    import json

    from batchdeck.cli import main

    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    prompts, max_tokens = prompts_for(5, count=3)
    src.write_text("".join(json.dumps({"id": str(i), "prompt_token_ids": p, "max_tokens": n, "ignore_eos": True}) + "\n"
                           for i, (p, n) in enumerate(zip(prompts, max_tokens))))
    assert main(["generate", "--model", model_dirs["qwen3"], "--input", str(src), "--output", str(out),
                 "--spec-k", "3", "--drafter", "ngram", "--block-size", "4", "--device", "cpu"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    for row, p, n in zip(rows, prompts, max_tokens):
        assert tuple(row["output_token_ids"]) == reference_tokens(model_dirs["qwen3"], tuple(p), n)
        assert {"spec_proposed", "spec_accepted"} <= set(row["metrics"])
    assert sum(r["metrics"]["spec_proposed"] for r in rows) > 0


def test_policies_are_told_the_verified_output_not_one_token_per_step(model_dirs):
    from batchdeck.policies.fcfs import FCFSPolicy

    class CountingPolicy(FCFSPolicy):
        def __init__(self):
            super().__init__()
            self.output_service = 0

        def on_tokens_computed(self, request, num_prompt_tokens, num_output_tokens):
            self.output_service += num_output_tokens

    path = model_dirs["qwen3"]
    prompts, max_tokens = prompts_for(4, count=3)
    engine = make_engine(path, spec_k=3, max_num_seqs=3, block_size=4, num_blocks=40)
    use_drafter(engine, oracle_drafter(path, prompts, max_tokens))
    counter = CountingPolicy()
    engine.scheduler.set_policy(counter)
    for i, (p, n) in enumerate(zip(prompts, max_tokens)):
        engine.add_request(str(i), p, greedy(n))
    engine.run_until_done()
    assert sum(r.spec_accepted for r in engine.requests.values()) > 0
    assert counter.output_service == sum(max_tokens)


def test_a_stop_token_among_accepted_drafts_ends_the_request_and_the_count(model_dirs):
    from batchdeck.engine.request import SamplingParams

    path = model_dirs["qwen3"]
    prompts, _ = prompts_for(8, count=4)
    for prompt in prompts:  # a prompt whose third output token first appears there
        ref = reference_tokens(path, tuple(prompt), 8)
        if ref[2] not in ref[:2]:
            break
    engine = make_engine(path, spec_k=4, max_num_seqs=2, block_size=4, num_blocks=40)
    use_drafter(engine, oracle_drafter(path, [prompt], [8]))  # every draft right
    engine.add_request("s", prompt, SamplingParams(max_tokens=8, ignore_eos=True, stop_token_ids=[ref[2]]))
    engine.run_until_done()
    r = engine.requests["s"]
    assert tuple(r.output_token_ids) == ref[:3] and r.finish_reason.value == "stop"
    assert (r.spec_proposed, r.spec_accepted) == (4, 2)  # drafts 2 and 3 kept; 4 and 5 fell after the stop
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_itl_counts_one_gap_per_delivery_when_drafts_are_accepted(model_dirs):
    """Accepted drafts arrive with their step's token: ITL has one gap per step that delivered tokens
    (as vLLM counts it), while TPOT still divides by every output token."""
    import numpy as np

    from batchdeck.engine.telemetry import ListSink

    sink = ListSink()
    path = model_dirs["qwen2"]
    prompts, _ = prompts_for(3, count=2)
    engine = make_engine(path, sink=sink, spec_k=3, max_num_seqs=2, block_size=4, num_blocks=64)
    use_drafter(engine, oracle_drafter(path, prompts, [16, 16], wrong_every=3))
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, greedy(16))
    engine.run_until_done()
    deliveries = [len(set(r.token_times)) - 1 for r in engine.requests.values()]
    assert sum(r.spec_accepted for r in engine.requests.values()) > 0  # some steps delivered several tokens
    assert sum(len(it.itls) for it in sink.iterations) == sum(deliveries) < 2 * 15
    assert all(g > 0 for it in sink.iterations for g in it.itls)
    for rec in sink.requests:
        r = engine.requests[rec.request_id]
        assert rec.itl_max == pytest.approx(float(np.diff(r.token_times).max()))
        assert rec.tpot == pytest.approx((rec.e2e_latency - rec.ttft) / 15)


def test_a_speculated_step_reports_no_logprob_even_when_the_last_plain_step_did(model_dirs):
    """A step whose request speculated (every draft rejected: one token) has no log-probability; the
    sampler's dict from an earlier plain step must not be read as this step's."""
    from batchdeck.engine.request import SamplingParams

    engine = make_engine(model_dirs["qwen3"], spec_k=3)
    use_drafter(engine, lambda token_ids, k: [(token_ids[-1] + 1) % 256] * k if len(token_ids) % 2 else [])
    engine.add_request("r", [5, 6, 7, 8], SamplingParams(max_tokens=12, logprobs=True, ignore_eos=True))
    speculated = plain = 0
    while engine.has_unfinished:
        res = engine.step()
        if res is None:
            continue
        drafted = {c.request.request_id: bool(c.draft) for c in res.plan.chunks if c.samples}
        for out in res.outputs:
            if drafted.get(out.request_id):
                speculated += 1
                assert out.logprobs is None, f"a speculated step reported {out.logprobs}"
            else:
                plain += 1
                assert out.logprobs is not None and len(out.logprobs) == len(out.new_token_ids) == 1
    assert speculated and plain
