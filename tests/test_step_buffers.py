"""The persistent step buffers (the CUDA-graph input path) hold exactly what `build_inputs` builds,
iteration after iteration, while requests join, finish and are preempted. Runs on the CPU."""
import random

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from batchdeck.engine.block_manager import BlockManager
from batchdeck.engine.config import LiveConfig
from batchdeck.engine.cuda_graphs import StepBuffers
from batchdeck.engine.model_runner import HostTables, build_inputs, fill_step
from batchdeck.engine.request import Request, SamplingParams
from batchdeck.engine.scheduler import Scheduler
from batchdeck.engine.speculative.drafter import LookupDrafter
from batchdeck.policies import make_policy


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
    assert buf.order[:r].tolist() == meta.row_order.tolist()
    for row in range(r):  # entries past a row's own blocks are padding and may hold anything
        n = -(-int(meta.seq_lens[row]) // BLOCK_SIZE)
        assert np.array_equal(buf.bt[row, :n], meta.block_tables[row, :n].numpy()), f"row {row} table"
    s = prepared.num_samples
    assert prepared.sample_counts == reference.sample_counts
    assert buf.sample[:s].tolist() == reference.sample_rows.tolist()
    assert [c.request.request_id for c in prepared.sampling_chunks] == [
        c.request.request_id for c in reference.sampling_chunks]


def _stand_in_graphs(buf: StepBuffers, max_rows: int, max_tokens: int, verify_tokens: int):
    """A graph runner whose 'captured' buckets are stand-ins (the graph a name, logits [kept, 2]):
    lookups and layouts as on a GPU."""
    from batchdeck.engine.cuda_graphs import CudaGraphRunner, GraphHit

    runner = CudaGraphRunner(lambda t, r, q, kept: None, buf, BLOCK_SIZE, 512, max_rows=max_rows,
                             max_tokens=max_tokens, verify_tokens=verify_tokens)
    for kind, sizes in (("decode", runner.decode_sizes), ("mixed", runner.token_sizes), ("verify", runner.verify_sizes)):
        for n in sizes:
            rows = n if kind == "decode" else runner.rows_for(n)
            kept = n if kind == "verify" else rows
            runner.graphs[(kind, n)] = GraphHit(f"{kind}{n}", torch.zeros(kept, 2), n, rows, kind == "decode",
                                                torch.zeros(kept, dtype=torch.int64) if kind == "decode" else None)
    return runner


def _check_uploaded(buf: StepBuffers, prepared, reference) -> None:
    """What the device views of the iteration's layout read after the upload: the reference inputs,
    the bucket's padding, block tables current for every row (uploaded only when one changed), and
    nothing of the mirror past the layout's end copied."""
    t, r, s = prepared.num_tokens, prepared.num_rows, prepared.num_samples
    hit = prepared.graph
    tb, rb, kept = (t, r, max(s, 1)) if hit is None else (hit.tokens, hit.rows, len(hit.logits))
    buf.dev.fill_(0xA5)
    buf.upload(prepared.table_rows)
    meta = reference.metadata
    ids, pos, dev = buf.views(tb, rb, kept, num_decodes=0, max_query_len=1, max_seq_len=1, block_size=BLOCK_SIZE,
                              query_lens_host=[], seq_lens_host=[])
    assert ids[0, :t].tolist() == reference.input_ids[0].tolist()
    assert pos[0, :t].tolist() == reference.positions[0].tolist()
    assert dev.slot_mapping[:t].tolist() == meta.slot_mapping.tolist()
    assert dev.slot_mapping[t:].tolist() == [-1] * (tb - t)  # padded tokens write no K/V
    assert dev.query_start_loc[:r + 1].tolist() == meta.query_start_loc.tolist()
    assert dev.query_start_loc[r + 1:].tolist() == [int(meta.query_start_loc[-1])] * (rb - r)  # no queries
    assert dev.seq_lens[:r].tolist() == meta.seq_lens.tolist() and not dev.seq_lens[r:].any()
    assert dev.context_lens[:r].tolist() == meta.context_lens.tolist()
    assert dev.row_order[:r].tolist() == meta.row_order.tolist()
    assert dev.row_order[r:].tolist() == list(range(r, rb))  # padded rows last
    for row in range(r):
        n = -(-int(meta.seq_lens[row]) // BLOCK_SIZE)
        assert dev.block_tables[row, :n].tolist() == meta.block_tables[row, :n].tolist(), f"row {row}'s table"
    samples = buf.sample_rows(tb, kept)
    if hit is None or not hit.every_row:
        assert samples[:s].tolist() == reference.sample_rows.tolist()
    else:  # a decode bucket keeps every row; the sampling rows pick theirs
        assert prepared.sampling_rows == reference.sample_rows.tolist()  # decode rows: token i is row i
    end = 8 * (3 * tb + kept) + 4 * (4 * rb + 1)
    assert (buf.dev[end:] == 0xA5).all(), "the upload copied past the iteration's layout"


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), num_blocks=st.integers(12, 48), max_num_seqs=st.integers(1, 6),
       budget=st.integers(4, 40), spec_k=st.sampled_from([0, 0, 2, 5, 9]), buckets=st.booleans())
def test_fill_step_matches_build_inputs_across_iterations(seed, num_blocks, max_num_seqs, budget, spec_k, buckets):
    """Includes speculating iterations: random drafts, random acceptance, rolled-back blocks; with
    `buckets`, the inputs are laid out for the (stand-in) captured bucket each iteration fits."""
    rng = random.Random(seed)
    blocks = BlockManager(num_blocks, BLOCK_SIZE)
    sched = Scheduler(blocks, make_policy("fcfs"), LiveConfig(max_num_seqs=max_num_seqs, max_batched_tokens=budget,
                                                              chunk_size=min(8, budget), spec_k=spec_k))
    sched.drafter = LookupDrafter(lambda ids, k: [rng.randrange(256) for _ in range(rng.randrange(0, k + 1))])
    buf = StepBuffers(max_tokens=budget, max_rows=max_num_seqs * (spec_k + 1), max_blocks=num_blocks,
                      device=torch.device("cpu"))
    tables = HostTables(num_blocks, max_num_seqs)
    graphs = _stand_in_graphs(buf, buf.max_rows, budget, budget if spec_k else 0) if buckets else None
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
        sched.drafter.fill([c for c in plan.chunks if c.num_draft])
        prepared = fill_step(buf, plan.chunks, blocks, tables, graphs)
        reference = build_inputs(plan.chunks, blocks, torch.device("cpu"))
        _check_same(buf, prepared, reference)
        _check_uploaded(buf, prepared, reference)
        for c in plan.chunks:  # pretend the model ran (accepting a random prefix of the drafts)
            r = c.request
            r.num_computed_tokens += c.num_tokens
            if c.samples:
                accepted = list(c.draft[:rng.randrange(len(c.draft) + 1)])
                for token in accepted + [rng.randrange(256)]:
                    r.append_token(token, 0.0)
                r.num_computed_tokens = min(r.num_computed_tokens, r.num_tokens - 1)
                blocks.shrink(r.request_id, r.num_computed_tokens)
                if r.num_output_tokens >= r.sampling.max_tokens:
                    r.status = r.status.FINISHED
                    sched.finish(r)
    assert not sched.has_work or step == 199


def use_step_buffers(engine, max_tokens: int, max_rows: int) -> None:
    """Put the engine's runner on the persistent-buffer path the CUDA engine uses (here on the CPU)."""
    runner = engine.runner
    width = -(-engine.max_model_len // BLOCK_SIZE)
    runner.buffers = StepBuffers(max_tokens, max_rows, width, torch.device("cpu"))
    runner.tables = HostTables(width, max_rows)
    runner.max_model_len = engine.max_model_len


def test_buffer_execution_path_is_token_exact_on_cpu(model_dirs):
    """The persistent-buffer path the CUDA engine uses (here without graphs, on the CPU)."""
    from tests.helpers import greedy, make_engine, reference_tokens

    path = model_dirs["qwen3"]
    engine = make_engine(path, max_num_seqs=4, max_batched_tokens=32, chunk_size=8, block_size=4, num_blocks=12)
    use_step_buffers(engine, max_tokens=32, max_rows=4)
    prompts = [[(7 * i + j) % 256 for j in range(3 + 5 * i)] for i in range(6)]
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, greedy(6))
    engine.run_until_done()
    for i, p in enumerate(prompts):
        assert tuple(engine.requests[str(i)].output_token_ids) == reference_tokens(path, tuple(p), 6)
    assert sum(r.num_preemptions for r in engine.requests.values()) > 0


def test_buffer_execution_path_verifies_drafts_token_exact_on_cpu(model_dirs, tmp_path):
    """Speculating iterations on the persistent-buffer path (draft model: the target itself, and a
    different model that is mostly rejected), including iterations with more sample entries than rows."""
    from batchdeck.engine.config import EngineConfig
    from batchdeck.engine.llm_engine import LLMEngine
    from tests.helpers import greedy, loaded, reference_tokens, save_tiny_model

    path = model_dirs["qwen3"]
    other = save_tiny_model("llama", str(tmp_path / "draft"), seed=3)
    prompts = [[(7 * i + j) % 256 for j in range(3 + 5 * i)] for i in range(5)]
    for draft in (path, other):
        engine = LLMEngine(EngineConfig(model=path, num_blocks=40, block_size=BLOCK_SIZE, drafter="model",
                                        draft_model=draft),
                           LiveConfig(max_num_seqs=4, max_batched_tokens=32, chunk_size=8, spec_k=3),
                           loaded=loaded(path), check_invariants=True)
        use_step_buffers(engine, max_tokens=32, max_rows=16)
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, greedy(9))
        engine.run_until_done()
        for i, p in enumerate(prompts):
            assert tuple(engine.requests[str(i)].output_token_ids) == reference_tokens(path, tuple(p), 9)
        assert sum(r.spec_proposed for r in engine.requests.values()) > 0


def test_decode_buckets_are_few_and_pad_little_where_rows_cost():
    from batchdeck.engine.cuda_graphs import decode_buckets, pick

    assert decode_buckets(1) == [1] and decode_buckets(3) == [1, 2, 3]
    assert decode_buckets(256) == [1, 2, 4, 8, 16, 32, 64, 96, 128, 160, 192, 224, 256]
    for max_rows in range(1, 1100, 7):
        sizes = decode_buckets(max_rows)
        assert sizes == sorted(set(sizes)) and sizes[0] == 1 and sizes[-1] == max_rows
        for n in range(1, max_rows + 1):
            b = pick(sizes, n)
            assert b >= n and (b <= 2 * n if n <= 128 else b <= 1.25 * n + 1)
    assert len(decode_buckets(1024)) <= 21


def test_graph_lookup_sends_speculating_iterations_to_buckets_that_keep_every_position():
    buf = StepBuffers(max_tokens=256, max_rows=8, max_blocks=4, device=torch.device("cpu"))
    runner = _stand_in_graphs(buf, 8, 256, 40)
    assert runner.verify_sizes == [32, 40]
    assert runner.lookup(5, 5, decode_only=True)[0] == "decode8"
    assert runner.lookup(20, 3, decode_only=False, samples=3)[0] == "mixed32"  # one sample per row
    assert runner.lookup(20, 5, decode_only=False, samples=20)[0] == "verify32"  # 5 rows verifying 3 drafts each
    assert runner.lookup(36, 8, decode_only=False, samples=36)[0] == "verify40"
    assert runner.lookup(48, 8, decode_only=False, samples=48) is None  # beyond the verify buckets: eager
    buf.sample[:20] = np.arange(20)
    buf.pad(20, 5, 32, 8, samples=20, kept=32)  # the padded rows must not clobber verified positions
    assert buf.sample[:20].tolist() == list(range(20)) and not buf.sample[20:32].any()


def test_host_tables_rewrite_a_row_after_a_rollback_freed_several_blocks():
    """k > block_size: a rollback frees two blocks and the regrow puts the old last block back last
    with a different one before it; the mirror must not keep the stale middle entry."""
    from batchdeck.engine.step_plan import ScheduledChunk

    blocks = BlockManager(4, BLOCK_SIZE)
    r = Request("r", [1, 2, 3], SamplingParams(max_tokens=20))
    r.append_token(42, 0.0)
    r.num_computed_tokens = 3
    buf = StepBuffers(max_tokens=32, max_rows=4, max_blocks=4, device=torch.device("cpu"))
    tables = HostTables(4, 4)
    k = 5
    blocks.grow("r", 3 + 1 + k)
    fill_step(buf, [ScheduledChunk(r, 3, 1 + k, True, True, num_draft=k, draft=(9,) * k)], blocks, tables)
    r.append_token(77, 0.0)  # every draft rejected
    r.num_computed_tokens = 4
    blocks.shrink("r", 4)
    blocks.grow("r", 4 + 1 + k)
    chunk = ScheduledChunk(r, 4, 1 + k, True, True, num_draft=k, draft=(9,) * k)
    prepared = fill_step(buf, [chunk], blocks, tables)
    _check_same(buf, prepared, build_inputs([chunk], blocks, torch.device("cpu")))


def test_block_tables_go_up_for_the_rows_written_since_the_last_upload():
    """Graph capture zeroes the tables (host and device) before any iteration; the runner's mirror,
    filled by no iteration yet, then uploads every row's table; an unchanged table is not sent again,
    and a table that grew sends its row alone."""
    from batchdeck.engine.step_plan import ScheduledChunk

    blocks = BlockManager(16, BLOCK_SIZE)
    reqs = []
    for i in range(3):
        r = Request(str(i), [1] * (5 + 4 * i), SamplingParams(max_tokens=8))
        r.append_token(7, 0.0)
        r.num_computed_tokens = r.num_tokens - 1
        blocks.grow(r.request_id, r.num_tokens)
        reqs.append(r)
    chunks = [ScheduledChunk(r, r.num_computed_tokens, 1, True, True) for r in reqs]
    buf = StepBuffers(max_tokens=32, max_rows=4, max_blocks=8, device=torch.device("cpu"))
    graphs = _stand_in_graphs(buf, 4, 32, 0)
    buf.bt[:] = -1  # stale tables on both sides: capture must zero them
    buf.dev_bt.fill_(-1)
    graphs._dummy(4, 4, 4)  # what a capture writes and uploads before each bucket
    assert not buf.dev_bt.any()
    tables = HostTables(8, 4)  # the runner's: made before capture, filled by no iteration yet

    def step(expected_rows):
        prepared = fill_step(buf, chunks, blocks, tables, graphs)
        assert prepared.table_rows == expected_rows
        buf.upload(prepared.table_rows)
        dev = buf.dev_bt.view(4, 8)
        for i, r in enumerate(reqs):
            table = blocks.tables[r.request_id]
            assert dev[i, :len(table)].tolist() == table, f"row {i}"

    step((0, 3))
    step(None)  # nothing changed: the tables stay as uploaded
    blocks.grow(reqs[1].request_id, reqs[1].num_tokens + BLOCK_SIZE)
    step((1, 2))


def test_row_order_is_longest_first_with_ties_in_row_order():
    from batchdeck.engine.model_runner import longest_first

    assert longest_first(np.array([5, 9, 5, 1, 9])).tolist() == [1, 4, 0, 2, 3]
    assert longest_first(np.array([], dtype=np.int64)).tolist() == []


def test_start_up_dummy_iterations_leave_no_stale_row_order():
    """The capture warm-ups and first replays run on `_dummy` inputs: after a larger layout's upload left
    other bytes where a smaller layout's row order lies, the order is a valid permutation again."""
    from types import SimpleNamespace

    from batchdeck.engine.cuda_graphs import CudaGraphRunner

    buf = StepBuffers(64, 16, 8, torch.device("cpu"))
    runner = SimpleNamespace(buffers=buf, max_model_len=256)
    assert CudaGraphRunner._dummy(runner, 64, 16, 16)
    buf.ids[:64] = 10 ** 9  # what another iteration may leave in the mirror
    buf.upload(None)
    for tb, rb in ((32, 8), (8, 8), (4, 2)):
        assert CudaGraphRunner._dummy(runner, tb, rb, rb)
        _, _, meta = buf.views(tb, rb, rb, num_decodes=0, max_query_len=1, max_seq_len=1, block_size=4,
                               query_lens_host=[], seq_lens_host=[])
        assert meta.row_order.tolist() == list(range(rb))
