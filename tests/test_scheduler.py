"""The scheduling mechanism without a model: budgets, caps, KV admission, static batches, drains."""
from batchdeck.engine.block_manager import BlockManager
from batchdeck.engine.config import LiveConfig
from batchdeck.engine.request import Request, SamplingParams
from batchdeck.engine.scheduler import Scheduler
from batchdeck.policies import make_policy
from tests.helpers import advance


def req(rid, n_prompt, max_tokens=4, arrival=0.0):
    return Request(rid, list(range(n_prompt)), SamplingParams(max_tokens=max_tokens), arrival_time=arrival)


def sched(num_blocks=64, block_size=4, **live):
    return Scheduler(BlockManager(num_blocks, block_size), make_policy("fcfs"), LiveConfig(**live))


def test_chunked_prefill_respects_budget_and_chunk_cap():
    s = sched(max_num_seqs=4, max_batched_tokens=10, chunk_size=6)
    for i in range(3):
        s.add(req(str(i), 20))
    plan = s.schedule(0.0)
    assert [c.num_tokens for c in plan.chunks] == [6, 4]
    assert plan.num_tokens <= 10


def test_stall_free_puts_decodes_first():
    s = sched(max_num_seqs=4, max_batched_tokens=8, chunk_size=8)
    a = req("a", 3)
    s.add(a)
    advance(s.schedule(0.0))  # a prefilled, has a token, now decodes
    s.add(req("b", 30))
    plan = s.schedule(0.0)
    assert plan.chunks[0].request is a and plan.chunks[0].is_decode
    assert plan.chunks[1].num_tokens == 7


def test_prefill_first_skips_decodes_while_prefill_pending():
    s = sched(max_num_seqs=4, max_batched_tokens=8, chunk_size=8, mixing="prefill-first")
    a = req("a", 3)
    s.add(a)
    advance(s.schedule(0.0))
    s.add(req("b", 30))
    plan = s.schedule(0.0)
    assert all(not c.is_decode for c in plan.chunks)


def test_running_cap_and_kv_admission():
    s = sched(num_blocks=4, block_size=4, max_num_seqs=2, max_batched_tokens=100, chunk_size=100)
    for i in range(3):
        s.add(req(str(i), 6))
    plan = s.schedule(0.0)
    assert len(plan.chunks) == 2  # cap of 2, and 2 blocks each fit exactly
    assert s.blocks.num_free == 0


def test_preemption_when_pool_runs_dry():
    s = sched(num_blocks=4, block_size=4, max_num_seqs=2, max_batched_tokens=100, chunk_size=100)
    a, b = req("a", 8), req("b", 8)
    s.add(a), s.add(b)
    advance(s.schedule(0.0))  # both hold 2 blocks, each wants a 3rd to decode
    plan = s.schedule(0.0)
    assert plan.preempted == [b] and b.num_computed_tokens == 0 and b in s.waiting
    assert [c.request for c in plan.chunks] == [a]
    s.blocks.check()


def test_drain_keeps_running_but_admits_none_over_cap():
    s = sched(max_num_seqs=4, max_batched_tokens=100, chunk_size=100, preemption="drain")
    rs = [req(str(i), 4, max_tokens=10) for i in range(5)]
    for r in rs:
        s.add(r)
    advance(s.schedule(0.0))
    s.set_config(LiveConfig(max_num_seqs=2, max_batched_tokens=100, chunk_size=100, preemption="drain"))
    plan = s.schedule(0.0)
    assert len(s.running) == 4 and not plan.preempted and all(c.is_decode for c in plan.chunks)


def test_recompute_mode_preempts_down_to_cap():
    s = sched(max_num_seqs=4, max_batched_tokens=100, chunk_size=100)
    for i in range(4):
        s.add(req(str(i), 4, max_tokens=10))
    advance(s.schedule(0.0))
    s.set_config(LiveConfig(max_num_seqs=2, max_batched_tokens=100, chunk_size=100))
    plan = s.schedule(0.0)
    assert len(s.running) == 2 and len(plan.preempted) == 2


def test_static_batch_waits_then_no_joins_and_pads():
    s = sched(max_num_seqs=2, max_batched_tokens=100, chunk_size=100, batching="static", static_timeout=5.0)
    a = req("a", 4, max_tokens=1)
    s.add(a)
    assert s.schedule(0.0).empty  # waiting for a full batch or the timeout
    b = req("b", 4, max_tokens=3)
    s.add(b)
    plan = s.schedule(0.1)
    assert {c.request.request_id for c in plan.chunks} == {"a", "b"}
    advance(plan)
    s.finish(a)  # a is done after one token: it stays as padding
    s.add(req("c", 4))
    plan = s.schedule(0.2)
    ids = [(c.request.request_id, c.padding) for c in plan.chunks]
    assert ("a", True) in ids and ("b", False) in ids and all(r != "c" for r, _ in ids)
    assert s.blocks.table("a"), "padding keeps its blocks until the batch ends"
    advance(plan)
    b.append_token(1, 0.0)
    s.finish(b)
    assert s.static_batch is None and not s.blocks.table("a")
    plan = s.schedule(10.0)  # c's timeout has passed: a new batch forms with c
    assert [c.request.request_id for c in plan.chunks] == ["c"]


def test_selective_runs_long_prefill_alone_then_interleaves():
    s = sched(max_num_seqs=4, max_batched_tokens=64, chunk_size=16, mixing="selective", selective_threshold=32)
    short = req("s", 4, max_tokens=20)
    s.add(short)
    advance(s.schedule(0.0))
    s.add(req("long", 64))
    kinds = []
    for _ in range(4):
        plan = s.schedule(0.0)
        kinds.append(sorted(c.request.request_id for c in plan.chunks))
        advance(plan)
    assert kinds[0] == ["long"] and kinds[1] == ["s"] and kinds[2] == ["long"]


def test_selective_turn_of_a_long_prefill_that_preempts_itself_goes_to_the_others():
    """The long prefill's alone turn needs a block none is free for; FCFS evicts the latest arrival, the
    long prefill itself. The decoding request then runs in that iteration, which used to plan nothing
    (and the engine stopped: unfinished requests, nothing scheduled)."""
    s = sched(num_blocks=4, block_size=4, max_num_seqs=2, max_batched_tokens=8, chunk_size=8,
              mixing="selective", selective_threshold=8)
    short = req("s", 5, max_tokens=7)
    s.add(short)
    advance(s.schedule(0.0))  # s: 5 prompt tokens + its first output, 2 blocks
    s.add(req("long", 12, max_tokens=1, arrival=1.0))
    evicted = None
    for _ in range(40):
        if not s.has_work:
            break
        plan = s.schedule(0.0)
        assert plan.chunks, "an iteration planned nothing with requests unfinished"
        if evicted is None and [r.request_id for r in plan.preempted] == ["long"]:
            evicted = [c.request.request_id for c in plan.chunks]
        advance(plan)
        for r in list(s.running):
            if r.num_output_tokens >= r.sampling.max_tokens and not r.is_prefilling:
                s.finish(r)
        s.blocks.check()
    assert evicted == ["s"]  # the iteration that evicted the long prefill decoded s
    assert not s.has_work


def test_static_batch_seats_max_num_seqs_even_when_prefill_takes_several_iterations():
    s = sched(num_blocks=256, max_num_seqs=4, max_batched_tokens=16, chunk_size=16, batching="static",
              static_timeout=0.0)
    rs = [req(str(i), 16, max_tokens=2) for i in range(6)]
    for r in rs:
        s.add(r)
    plan = s.schedule(0.0)
    assert [c.request.request_id for c in plan.chunks] == ["0"]  # the budget fits one prefill ...
    assert {r.request_id for r in s.static_batch} == {"0", "1", "2", "3"}  # ... but four are seated
    seen = set()
    for _ in range(6):
        advance(plan)
        plan = s.schedule(0.0)
        seen |= {c.request.request_id for c in plan.chunks}
    assert seen <= {"0", "1", "2", "3"}  # nobody joins mid-batch


def test_draft_positions_are_shortened_before_anyone_is_preempted():
    from batchdeck.engine.speculative.drafter import LookupDrafter

    s = sched(num_blocks=5, block_size=4, max_num_seqs=2, max_batched_tokens=100, chunk_size=100, spec_k=6)
    s.drafter = LookupDrafter(lambda ids, k: [7] * k)
    a, b = req("a", 7, max_tokens=20), req("b", 7, max_tokens=20)
    s.add(a), s.add(b)
    advance(s.schedule(0.0))  # both prefilled (2 blocks each, 7 tokens + 1 sampled); 1 block free
    plan = s.schedule(0.0)
    assert plan.preempted == []  # drafts are optional: they shrink to the free room instead
    drafts = {c.request.request_id: c.num_draft for c in plan.chunks}
    assert drafts == {"a": 4, "b": 0}  # a: 8 tokens + 4 drafts fill its 3rd block; b: its own 2 blocks hold 8
    assert all(c.num_tokens == 1 + c.num_draft for c in plan.chunks)
    s.blocks.check()


def test_prefill_first_under_kv_pressure_makes_progress():
    """A victim readmitted in the iteration that evicted it kept a prefill in every plan, so the decodes
    holding the blocks never ran (prefill-first runs decodes only in iterations without prefills)."""
    s = sched(num_blocks=8, block_size=4, mixing="prefill-first", max_num_seqs=4, max_batched_tokens=16, chunk_size=4)
    reqs = [req("0", 4, 16), req("1", 15, 15), req("2", 10, 21), req("3", 9, 7)]
    for r in reqs:
        s.add(r)
    for _ in range(500):
        if not s.has_work:
            break
        plan = s.schedule(0.0)
        advance(plan)
        for r in list(s.running):
            if r.num_output_tokens >= r.sampling.max_tokens and not r.is_prefilling:
                s.finish(r)
        s.blocks.check()
    assert not s.has_work, [(r.request_id, r.num_output_tokens, r.num_preemptions) for r in reqs]


def test_no_admission_in_an_iteration_that_evicted_for_blocks():
    s = Scheduler(BlockManager(4, 4), make_policy("sjf"),
                  LiveConfig(max_num_seqs=3, max_batched_tokens=100, chunk_size=100))
    a, b = req("a", 8), req("b", 8)
    s.add(a), s.add(b)
    advance(s.schedule(0.0))
    c = req("c", 1)
    s.add(c)
    plan = s.schedule(0.0)  # a's decode evicts b; c (shortest first) would fit the block left, but not now
    assert plan.preempted == [b] and [ch.request for ch in plan.chunks] == [a] and s.blocks.num_free == 1
    advance(plan)
    plan = s.schedule(0.0)  # the next iteration admits again
    assert c in [ch.request for ch in plan.chunks]
