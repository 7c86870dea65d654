"""The CUDA engine path (static step buffers, CUDA graphs, Triton attention) against the CPU path.

Greedy float32 output on CUDA must be token-identical to the CPU reference engine (torch attention,
no graphs) on a small synthetic model, with graphs on and off and with knobs that make mixed
prefill+decode iterations, padded buckets and preemption. Skipped without CUDA.
"""
from __future__ import annotations

import random

import pytest
import torch

from batchdeck.engine.config import EngineConfig, LiveConfig
from batchdeck.engine.llm_engine import LLMEngine
from batchdeck.engine.models import load_model
from batchdeck.engine.request import SamplingParams

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

MODEL = "synthetic:tiny"


def _loaded(device: str, model: str = MODEL):
    """Synthetic weights are drawn on the CPU and moved, so both devices run the same model."""
    lm = load_model(model, "cpu", "float32")
    if device != "cpu":
        lm.model.to(device)
    return lm


def _prompts(seed: int, count: int, max_len: int = 120):
    rng = random.Random(seed)
    prompts = [[rng.randrange(256) for _ in range(rng.randint(1, max_len))] for _ in range(count)]
    return prompts, [rng.randint(1, 24) for _ in range(count)]


def _run(device: str, prompts, max_tokens, *, graphs: bool = True, num_blocks: int = 512, block_size: int = 16,
         overlap: bool = False, **live):
    cfg = EngineConfig(model=MODEL, device=device, dtype="float32", num_blocks=num_blocks, block_size=block_size,
                       max_num_seqs_limit=16, max_batched_tokens_limit=256, cuda_graphs=graphs,
                       attention_backend="auto", async_scheduling=overlap)
    engine = LLMEngine(cfg, LiveConfig(**live), loaded=_loaded(device), check_invariants=True)
    for i, (p, n) in enumerate(zip(prompts, max_tokens)):
        engine.add_request(str(i), p, SamplingParams(max_tokens=n, ignore_eos=True))
    engine.run_until_done()
    assert engine.blocks.num_free == engine.blocks.num_blocks
    return engine, [engine.requests[str(i)].output_token_ids for i in range(len(prompts))]


KNOBS = [
    dict(max_num_seqs=8, max_batched_tokens=256, chunk_size=256),
    dict(max_num_seqs=5, max_batched_tokens=40, chunk_size=13),
    dict(max_num_seqs=16, max_batched_tokens=64, chunk_size=64, batching="static", static_timeout=0.0),
]


@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("knobs", range(len(KNOBS)))
@pytest.mark.parametrize("graphs", [True, False])
def test_greedy_float32_cuda_matches_cpu(knobs, graphs, overlap):
    prompts, max_tokens = _prompts(knobs, 12)
    _, want = _run("cpu", prompts, max_tokens, **KNOBS[knobs])
    engine, got = _run("cuda", prompts, max_tokens, graphs=graphs, overlap=overlap, **KNOBS[knobs])
    assert engine.backend.name == "triton"
    assert engine.runner.fused.get("attention") == engine.loaded.num_layers  # the fused layer path ran
    assert got == want
    stats = engine.runner.graphs.stats if engine.runner.graphs is not None else None
    if graphs:
        assert stats is not None and stats.replays > 0 and stats.eager == 0
        decode = [v for (kind, _), v in engine.runner.graphs.graphs.items() if kind == "decode"]
        assert decode and all(greedy is not None for *_, greedy in decode)  # the argmax is in the graph
    else:
        assert stats is None


def test_start_up_replays_every_graph_once_without_writing_the_kv_pool():
    """Each captured graph's first launch (its upload to the device) happens at start-up, on inputs
    that write no K/V: the zeroed pool stays zero, then and on a later round of replays."""
    cfg = EngineConfig(model=MODEL, device="cuda", dtype="float32", num_blocks=64, max_num_seqs_limit=16,
                       max_batched_tokens_limit=256, cuda_graphs=True)
    engine = LLMEngine(cfg, LiveConfig(**KNOBS[0]), loaded=_loaded("cuda"))
    stats = engine.runner.graphs.stats
    assert [(kind, tokens) for kind, tokens, _ in stats.first_replays] == [(k, t) for k, t, _ in stats.captured]
    assert len(stats.captured) > 3
    pool = [*engine.kv_cache.keys, *engine.kv_cache.values]
    assert all(int(t.count_nonzero()) == 0 for t in pool)
    again = engine.runner.graphs.replay_each()
    assert len(again) == len(stats.captured)
    assert all(int(t.count_nonzero()) == 0 for t in pool)


@pytest.mark.parametrize("overlap", [True, False])
def test_decode_graphs_pick_the_sampling_rows(overlap):
    """A token budget equal to the row cap: a prompt's one-token chunk (it samples nothing) rides
    with the decode rows in a decode-only iteration, whose graph keeps every row."""
    prompts, max_tokens = _prompts(7, 8, max_len=40)
    knobs = dict(max_num_seqs=3, max_batched_tokens=3, chunk_size=3)
    _, want = _run("cpu", prompts, max_tokens, **knobs)
    engine, got = _run("cuda", prompts, max_tokens, overlap=overlap, **knobs)
    assert got == want
    assert engine.runner.graphs.stats.row_picks > 0


def test_greedy_rows_beside_sampled_ones_take_the_decode_graphs_argmax():
    """A decode step whose batch mixes greedy and sampled rows: the greedy rows' tokens come from the
    graph's own argmax and must match the CPU's (the schedule does not depend on the sampled tokens:
    fixed lengths, ignore_eos)."""
    prompts, _ = _prompts(11, 6, max_len=40)
    greedy_rows = (0, 2, 4)

    def run(device):
        cfg = EngineConfig(model=MODEL, device=device, dtype="float32", num_blocks=256, max_num_seqs_limit=8,
                           max_batched_tokens_limit=64, cuda_graphs=True, attention_backend="auto")
        e = LLMEngine(cfg, LiveConfig(max_num_seqs=8, max_batched_tokens=64, chunk_size=64), loaded=_loaded(device))
        for i, p in enumerate(prompts):
            sampling = (SamplingParams(max_tokens=12, ignore_eos=True) if i in greedy_rows else
                        SamplingParams(max_tokens=12, temperature=1.0, seed=i, ignore_eos=True))
            e.add_request(str(i), p, sampling)
        e.run_until_done()
        return e, [e.requests[str(i)].output_token_ids for i in greedy_rows]

    _, want = run("cpu")
    engine, got = run("cuda")
    assert got == want
    assert engine.runner.graphs.stats.replays > 0


@pytest.mark.parametrize("overlap", [True, False])
def test_preemption_on_cuda_matches_cpu(overlap):
    prompts, max_tokens = _prompts(5, 10, max_len=60)
    knobs = dict(max_num_seqs=10, max_batched_tokens=128, chunk_size=32)
    cpu_engine, want = _run("cpu", prompts, max_tokens, num_blocks=12, block_size=8, **knobs)
    engine, got = _run("cuda", prompts, max_tokens, num_blocks=12, block_size=8, overlap=overlap, **knobs)
    assert sum(r.num_preemptions for r in engine.requests.values()) > 0
    assert got == want


def test_seeded_sampling_on_cuda_independent_of_batch():
    params = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)

    def run(extra, max_num_seqs):
        cfg = EngineConfig(model=MODEL, device="cuda", dtype="float32", num_blocks=256, max_num_seqs_limit=8,
                           max_batched_tokens_limit=64)
        e = LLMEngine(cfg, LiveConfig(max_num_seqs=max_num_seqs, max_batched_tokens=32, chunk_size=8),
                      loaded=_loaded("cuda"))
        for i in range(extra):
            e.add_request(f"x{i}", [5 + i] * (3 + i), SamplingParams(max_tokens=7, temperature=0.7, ignore_eos=True))
        e.add_request("target", [1, 2, 3, 4, 5], params)
        e.run_until_done()
        return e.requests["target"].output_token_ids

    alone = run(0, 1)
    assert run(3, 4) == alone
    assert run(5, 2) == alone


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_fused_modules_match_stock_bf16(arch):
    """RMSNorm and the SiLU MLP, fused vs stock HF modules, bf16, head dim 128 shapes."""
    import copy

    from transformers import AutoConfig, AutoModelForCausalLM

    from batchdeck.engine.triton_fused import fuse_model, unfuse_model

    cfg = AutoConfig.for_model(arch, hidden_size=512, intermediate_size=1536, num_hidden_layers=2,
                               num_attention_heads=8, num_key_value_heads=2, head_dim=128, vocab_size=1000)
    torch.manual_seed(0)
    with torch.device("cuda"):
        stock = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    fused = copy.deepcopy(stock)
    counts = fuse_model(fused)
    assert counts["rmsnorm"] >= 5 and counts["mlp"] == 2 and counts["attention"] == 2 and counts["layer"] == 2
    assert counts["model"] == 1 and counts["lm_head"] == 1
    x = torch.randn(37, 512, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        for a, b in ((fused.model.norm, stock.model.norm), (fused.model.layers[0].mlp, stock.model.layers[0].mlp),
                     (fused.lm_head, stock.lm_head)):
            for rows in (x, x[:16], x[:1]):  # above 32 rows (a small weight: cuBLAS), 16 (the kernel), 1
                got, want = a(rows).double(), b(rows).double()
                assert ((got - want).norm() / want.norm()).item() < 1e-2
    unfuse_model(fused)  # the runner's fallback when a fused kernel fails to build: every stock forward back
    assert not [name for name, m in fused.named_modules() if "forward" in m.__dict__]


@pytest.mark.parametrize("model", ["synthetic:tiny", "synthetic:tiny-llama"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cross_module_fusions_match_per_module_fusions(monkeypatch, model, dtype):
    """BATCHDECK_FUSED=2 (residual add fused into the next RMSNorm, rotary table, K/V written by the
    q/k kernel) against =1, CUDA graphs on, mixed and decode-only iterations: the same rounding steps,
    so the same tokens and log-probabilities."""
    prompts, _ = _prompts(21, 8, max_len=60)

    def run(level: str):
        monkeypatch.setenv("BATCHDECK_FUSED", level)
        cfg = EngineConfig(model=model, device="cuda", dtype=dtype, num_blocks=256, max_num_seqs_limit=8,
                           max_batched_tokens_limit=128, cuda_graphs=True)
        engine = LLMEngine(cfg, LiveConfig(max_num_seqs=8, max_batched_tokens=64, chunk_size=32),
                           loaded=load_model(model, "cuda", dtype))
        assert engine.runner.fused.get("model") == (1 if level == "2" else 0)
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, SamplingParams(max_tokens=12, ignore_eos=True, logprobs=True))
        logprobs: dict[str, list[float]] = {}
        while engine.has_unfinished:
            result = engine.step()
            for out in result.outputs if result else ():
                logprobs.setdefault(out.request_id, []).extend(out.logprobs or [])
        return [engine.requests[str(i)].output_token_ids for i in range(len(prompts))], logprobs

    want, want_lp = run("1")
    got, got_lp = run("2")
    assert got == want
    assert max(abs(a - b) for k in want_lp for a, b in zip(want_lp[k], got_lp[k])) < 1e-3


def test_small_m_linear_level_keeps_float32_tokens(monkeypatch):
    """BATCHDECK_FUSED=3 (the layer's linears through the small-M kernel at decode row counts, SiLU-mul in
    the gate|up epilogue) against =1, CUDA graphs on: the same float32 greedy tokens."""
    prompts, _ = _prompts(22, 6, max_len=50)

    def run(level: str):
        monkeypatch.setenv("BATCHDECK_FUSED", level)
        cfg = EngineConfig(model=MODEL, device="cuda", dtype="float32", num_blocks=256, max_num_seqs_limit=8,
                           max_batched_tokens_limit=128, cuda_graphs=True)
        engine = LLMEngine(cfg, LiveConfig(max_num_seqs=8, max_batched_tokens=64, chunk_size=32), loaded=_loaded("cuda"))
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, SamplingParams(max_tokens=12, ignore_eos=True))
        engine.run_until_done()
        return [engine.requests[str(i)].output_token_ids for i in range(len(prompts))]

    assert run("3") == run("1")


def test_overlapped_iterations_on_cuda_stop_abort_and_log_probabilities_match_the_cpu():
    """Async scheduling on CUDA (graphs, tokens fed on the device): stop tokens met while the next
    iteration is in flight, an abort with a token in flight and logprobs give the CPU's results."""
    prompts, _ = _prompts(9, 10, max_len=80)
    _, ref = _run("cpu", prompts, [20] * len(prompts), max_num_seqs=8, max_batched_tokens=64, chunk_size=32)
    stops = [r[2 + i % 5] for i, r in enumerate(ref)]

    def run(device: str, overlap: bool):
        cfg = EngineConfig(model=MODEL, device=device, dtype="float32", num_blocks=512, max_num_seqs_limit=16,
                           max_batched_tokens_limit=256, cuda_graphs=True, async_scheduling=overlap)
        engine = LLMEngine(cfg, LiveConfig(max_num_seqs=8, max_batched_tokens=64, chunk_size=32),
                           loaded=_loaded(device), check_invariants=True)
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, SamplingParams(max_tokens=20, ignore_eos=True, stop_token_ids=(stops[i],),
                                                         logprobs=i % 3 == 0))
        logprobs: dict[str, list[float]] = {}
        while engine.has_unfinished:
            result = engine.step()
            if engine.requests["1"].output_token_ids and not engine.requests["1"].is_finished:
                engine.abort("1")  # after its first token (its second is in flight when overlapped)
            for out in result.outputs if result else ():
                if out.logprobs:
                    logprobs.setdefault(out.request_id, []).extend(out.logprobs)
        assert engine.blocks.num_free == engine.blocks.num_blocks
        return engine, [engine.requests[str(i)].output_token_ids for i in range(len(prompts))], logprobs

    cpu, want, want_lp = run("cpu", False)
    cuda, got, got_lp = run("cuda", True)
    assert cuda.async_scheduling and cuda.runner.graphs.stats.replays > 0
    assert got == want and len(got[1]) == 1
    assert [r.finish_reason for r in cpu.requests.values()] == [r.finish_reason for r in cuda.requests.values()]
    assert cuda.requests["1"].finish_reason.value == "abort"
    assert all(cuda.requests[str(i)].finish_reason.value == "stop" for i in range(len(prompts)) if i != 1)
    assert want_lp.keys() == got_lp.keys()
    for rid in want_lp:
        assert got_lp[rid] == pytest.approx(want_lp[rid], abs=1e-3)
