"""The persistent step buffers (the CUDA-graph input path) hold exactly what `build_inputs` builds,
iteration after iteration, while requests join, finish and are preempted. Runs on the CPU."""
import random

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.block_manager import BlockManager
from engine.config import LiveConfig
from engine.cuda_graphs import StepBuffers
from engine.model_runner import HostTables, build_inputs, fill_step
from engine.request import Request, SamplingParams
from engine.scheduler import Scheduler
from policies import make_policy


BLOCK_SIZE = 4


def _check_same(buf: StepBuffers, prepared, reference) -> None:
    t, r = prepared.num_tokens, prepared.num_rows
    meta = reference.metadata
    assert buf.ids[:t].tolist() == reference.input_ids[0].tolist()
    assert buf.pos[:t].tolist() == reference.positions[0].tolist()
    assert buf.slots[:t].tolist() == meta.slot_mapping.tolist()
    assert buf.qsl[:r + 1].tolist() == meta.query_start_loc.tolist()
    assert buf.seq[:r].tolist() == meta.seq_lens.tolist()
    assert buf.ctx[:r].tolist() == meta.context_lens.tolist()
    for row in range(r):  # entries past a row's own blocks are padding and may hold anything
        n = -(-int(meta.seq_lens[row]) // BLOCK_SIZE)
        assert np.array_equal(buf.bt[row, :n], meta.block_tables[row, :n].numpy()), f"row {row} table"
    s = len(prepared.sampling_chunks)
    assert buf.sample[:s].tolist() == reference.sample_rows.tolist()
    assert [c.request.request_id for c in prepared.sampling_chunks] == [
        c.request.request_id for c in reference.sampling_chunks]


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), num_blocks=st.integers(12, 48), max_num_seqs=st.integers(1, 6),
       budget=st.integers(4, 40))
def test_fill_step_matches_build_inputs_across_iterations(seed, num_blocks, max_num_seqs, budget):
    rng = random.Random(seed)
    blocks = BlockManager(num_blocks, BLOCK_SIZE)
    sched = Scheduler(blocks, make_policy("fcfs"),
                      LiveConfig(max_num_seqs=max_num_seqs, max_batched_tokens=budget, chunk_size=min(8, budget)))
    buf = StepBuffers(max_tokens=budget, max_rows=max_num_seqs, max_blocks=num_blocks, device=torch.device("cpu"))
    tables = HostTables(num_blocks, max_num_seqs)
    pending = [Request(str(i), [rng.randrange(256) for _ in range(rng.randrange(1, 20))],
                       SamplingParams(max_tokens=rng.randrange(1, 12))) for i in range(10)]
    for step in range(200):
        if pending and rng.random() < 0.4:
            sched.add(pending.pop())
        plan = sched.schedule(0.0)
        if plan.empty:
            if not pending and not sched.has_work:
                break
            continue
        prepared = fill_step(buf, plan.chunks, blocks, tables)
        _check_same(buf, prepared, build_inputs(plan.chunks, blocks, torch.device("cpu")))
        for c in plan.chunks:  # pretend the model ran
            r = c.request
            r.num_computed_tokens += c.num_tokens
            if c.samples:
                r.append_token(rng.randrange(256), 0.0)
                if r.num_output_tokens >= r.sampling.max_tokens:
                    r.status = r.status.FINISHED
                    sched.finish(r)
    assert not sched.has_work or step == 199


def test_buffer_execution_path_is_token_exact_on_cpu(model_dirs):
    """The persistent-buffer path the CUDA engine uses (here without graphs, on the CPU)."""
    from tests.helpers import greedy, make_engine, reference_tokens

    path = model_dirs["qwen3"]
    engine = make_engine(path, max_num_seqs=4, max_batched_tokens=32, chunk_size=8, block_size=4, num_blocks=12)
    runner = engine.runner
    width = -(-engine.max_model_len // BLOCK_SIZE)
    runner.buffers = StepBuffers(32, 4, width, torch.device("cpu"))
    runner.tables = HostTables(width, 4)
    runner.max_model_len = engine.max_model_len
    prompts = [[(7 * i + j) % 256 for j in range(3 + 5 * i)] for i in range(6)]
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, greedy(6))
    engine.run_until_done()
    for i, p in enumerate(prompts):
        assert tuple(engine.requests[str(i)].output_token_ids) == reference_tokens(path, tuple(p), 6)
    assert sum(r.num_preemptions for r in engine.requests.values()) > 0
