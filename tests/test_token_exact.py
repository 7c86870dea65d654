"""The engine's greedy output equals transformers' generate() for each prompt alone, whatever the
batching knobs, pool size (preemption included) and batching mode, with iterations overlapped
(async scheduling) or not."""
from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import greedy, make_engine, reference_tokens


def run_and_compare(path, prompts, max_tokens, **knobs):
    engine = make_engine(path, **knobs)
    for i, (p, n) in enumerate(zip(prompts, max_tokens)):
        engine.add_request(str(i), p, greedy(n))
    engine.run_until_done()
    assert engine.blocks.num_free == engine.blocks.num_blocks, "blocks leaked after the run"
    for i, (p, n) in enumerate(zip(prompts, max_tokens)):
        got = tuple(engine.requests[str(i)].output_token_ids)
        assert got == reference_tokens(path, tuple(p), n), f"request {i} differs (knobs {knobs})"
    return engine


def random_prompts(seed, count, max_len=48):
    rng = random.Random(seed)
    prompts = [[rng.randrange(256) for _ in range(rng.randrange(1, max_len))] for _ in range(count)]
    return prompts, [rng.randrange(1, 12) for _ in range(count)]


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
def test_fixed_case_each_architecture(model_dirs, arch, overlap):
    prompts, max_tokens = random_prompts(1, 6)
    run_and_compare(model_dirs[arch], prompts, max_tokens, max_num_seqs=3, max_batched_tokens=20, chunk_size=7,
                    block_size=4, num_blocks=64, overlap=overlap)


@pytest.mark.parametrize("overlap", [False, True])
def test_preemption_forced_and_exact(model_dirs, overlap):
    prompts, max_tokens = random_prompts(2, 8)
    engine = run_and_compare(model_dirs["qwen3"], prompts, max_tokens, max_num_seqs=8, max_batched_tokens=64,
                             chunk_size=16, block_size=4, num_blocks=16, overlap=overlap)
    assert sum(r.num_preemptions for r in engine.requests.values()) > 0, "pool was meant to force preemption"


@pytest.mark.parametrize("overlap", [False, True])
def test_static_batching_exact_and_pads(model_dirs, overlap):
    prompts, max_tokens = random_prompts(3, 7)
    engine = run_and_compare(model_dirs["llama"], prompts, max_tokens, max_num_seqs=3, max_batched_tokens=64,
                             chunk_size=64, batching="static", static_timeout=0.0, overlap=overlap)
    assert engine.iteration > 0


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    arch=st.sampled_from(["llama", "qwen2", "qwen3"]),
    seed=st.integers(0, 10_000),
    count=st.integers(1, 7),
    max_num_seqs=st.integers(1, 6),
    max_batched_tokens=st.integers(1, 80),
    chunk_size=st.integers(1, 80),
    block_size=st.sampled_from([1, 2, 4, 8, 16]),
    pool_tokens=st.integers(64, 512),
    batching=st.sampled_from(["continuous", "static"]),
    overlap=st.booleans(),
)
def test_token_exact_over_knobs(model_dirs, arch, seed, count, max_num_seqs, max_batched_tokens, chunk_size,
                                block_size, pool_tokens, batching, overlap):
    prompts, max_tokens = random_prompts(seed, count, max_len=40)
    chunk_size = min(chunk_size, max_batched_tokens)
    num_blocks = max(-(-pool_tokens // block_size), -(-52 // block_size))  # always room for one request
    max_num_seqs = min(max_num_seqs, num_blocks)  # the pool bounds the running cap
    run_and_compare(model_dirs[arch], prompts, max_tokens, max_num_seqs=max_num_seqs,
                    max_batched_tokens=max_batched_tokens, chunk_size=chunk_size, block_size=block_size,
                    num_blocks=num_blocks, batching=batching, static_timeout=0.0, overlap=overlap)



def test_a_static_batchs_padding_rows_are_counted_apart_from_its_decode_tokens(model_dirs):
    """Records of a static batch after its short request finished: that row keeps computing as padding
    (num_padding_tokens), and num_decode_tokens counts only the rows still generating."""
    from batchdeck.engine.telemetry import ListSink

    sink = ListSink()
    e = make_engine(model_dirs["llama"], sink=sink, max_num_seqs=2, batching="static", static_timeout=0.0)
    e.add_request("short", [1, 2, 3], greedy(2))
    e.add_request("long", [4, 5, 6], greedy(6))
    e.run_until_done()
    records = sink.iterations
    padded = [r for r in records if r.num_padding_tokens]
    assert padded, "the finished short request pads the batch until the long one ends"
    assert all(r.num_padding_tokens == 1 and r.num_decode_tokens == 1 for r in padded)
    assert sum(r.num_generated_tokens for r in records) == 2 + 6
