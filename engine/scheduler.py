"""The iteration scheduler: the mechanism of continuous and static batching with chunked prefill.

Every iteration it builds a `StepPlan` under the live limits (`max_num_seqs`, `max_batched_tokens`,
`chunk_size`), the mixing mode, and the KV blocks available. A request admitted with prefix caching on
starts at its cached prefix (engine/block_manager.py): those tokens cost no token budget and only the
rest is computed. Ordering decisions (who is admitted
first, who is preempted) are the policy's; everything else is here.
"""
from __future__ import annotations

from batchdeck.engine.block_manager import BlockManager
from batchdeck.engine.config import LiveConfig
from batchdeck.engine.request import Request, RequestStatus
from batchdeck.engine.speculative.drafter import Drafter
from batchdeck.engine.step_plan import ScheduledChunk, StepPlan
from batchdeck.policies.base import Policy


class Scheduler:
    def __init__(self, blocks: BlockManager, policy: Policy, config: LiveConfig):
        self.blocks = blocks
        self.policy = policy
        self.config = config
        self.waiting: list[Request] = []
        self.running: list[Request] = []  # admission order
        self.static_batch: list[Request] | None = None  # members of the batch in flight (static mode)
        self.padding: list[Request] = []  # finished static-batch members still holding their slot
        self._last_step_alone = False  # selective mixing: the previous step ran a long prefill alone
        self.drafter: Drafter | None = None  # speculative decoding's proposer (reserves draft positions)
        self.max_model_len = 1 << 30  # the engine sets the model's context length
        self._next_seq = 0
        self._order: list[Request] | None = None  # the policy's order of `waiting`, memoized per schedule()
        self._in_plan: set[int] = set()  # id() of the requests the plan being built already has a chunk for
        self._policy_preempts = _overrides_should_preempt(policy)
        policy.prefix_lookup = blocks.cached_prefix_tokens
        blocks.set_prefix_caching(config.prefix_caching)

    # -- queues ---------------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        if request.admission_seq < 0:
            request.admission_seq = self._next_seq
            self._next_seq += 1
        request.status = RequestStatus.WAITING
        self.policy.on_arrival(request, self.waiting, self.running)
        self.waiting.append(request)
        self._order = None

    def remove(self, request: Request) -> None:
        """Take a request out of every queue and free its blocks (abort)."""
        for queue in (self.waiting, self.running, self.padding):
            if request in queue:
                queue.remove(request)
        self._order = None
        if self.static_batch is not None and request in self.static_batch:
            self.static_batch.remove(request)
        self.blocks.free(request.request_id)
        self._end_static_batch_if_done()
        request.prefix_memo = None  # its block keys are of no further use

    def finish(self, request: Request) -> None:
        """A request produced its last token: it leaves (continuous) or pads its slot (static)."""
        self.running.remove(request)
        request.prefix_memo = None  # its block keys are of no further use
        if self.static_batch is not None and request in self.static_batch:
            self.padding.append(request)
        else:
            self.blocks.free(request.request_id)
        self._end_static_batch_if_done()

    def set_policy(self, policy: Policy) -> None:
        """Swap the policy live: the new one takes the queues as they are (nothing is dropped or restarted)."""
        policy.take_over(self.policy, self.waiting, self.running)
        policy.prefix_lookup = self.blocks.cached_prefix_tokens
        self.policy = policy
        self._policy_preempts = _overrides_should_preempt(policy)
        self._order = None

    def set_config(self, config: LiveConfig) -> None:
        if config.batching == "continuous" and self.static_batch is not None:
            self._end_static_batch()
        elif config.batching == "static" and self.config.batching != "static" and self.running:
            self.static_batch = list(self.running)  # what runs now is the batch; nobody joins it
        if config.prefix_caching != self.blocks.prefix_caching:
            self.blocks.set_prefix_caching(config.prefix_caching)
            self._order = None
        self.config = config

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- planning -------------------------------------------------------------------------------
    def schedule(self, now: float) -> StepPlan:
        plan = StepPlan()
        cfg = self.config
        self._order = None
        self._in_plan = set()
        if cfg.preemption == "recompute":
            while len(self.running) > cfg.max_num_seqs:
                self._preempt(self.policy.pick_victim(self.running, now), plan)
        if cfg.batching == "static":
            self._schedule_static(plan, now)
        else:
            self._schedule_continuous(plan, now)
        return plan

    def _schedule_continuous(self, plan: StepPlan, now: float) -> None:
        cfg = self.config
        budget = cfg.max_batched_tokens
        if self._policy_preempts:
            self._priority_preemption(plan, now)
        decoding: list[Request] = []
        prefilling: list[Request] = []
        for r in self.running:  # r.is_prefilling, inlined (this loop runs over every running request)
            (prefilling if len(r.token_ids) - r.num_computed_tokens > 1 else decoding).append(r)

        if cfg.mixing == "selective":
            long = self._long_prefill_for_alone_turn(prefilling, now)
            has_other = bool(decoding) or any(not self._is_long(r) for r in prefilling) or any(
                not self._is_long(r) for r in self.waiting
            )
            if long is not None and (not self._last_step_alone or not has_other):
                self._run_alone(long, plan, budget, now)
                if not plan.empty:
                    return
                # its turn ran nothing (no blocks: it was preempted, or not admitted): the others take it
            self._last_step_alone = False
            budget = self._run(decoding, plan, budget, now)
            budget = self._run([r for r in prefilling if not self._is_long(r)], plan, budget, now)
            self._admit_waiting(plan, budget, now, skip_long=True)
            if plan.empty and long is not None and long.status is RequestStatus.RUNNING:
                # the others could not run (no seat for a short waiting one): the long prefill goes on
                self._run_alone(long, plan, budget, now)
            return

        if cfg.mixing == "prefill-first":
            budget = self._run(prefilling, plan, budget, now)
            budget = self._admit_waiting(plan, budget, now)
            if plan.num_prefill_chunks == 0:
                self._run(decoding, plan, budget, now)
            return

        # stall-free: running decodes first, then prefill chunks fill the rest of the budget.
        budget = self._run(decoding, plan, budget, now)
        budget = self._run(prefilling, plan, budget, now)
        self._admit_waiting(plan, budget, now)

    def _run_alone(self, long: Request, plan: StepPlan, budget: int, now: float) -> None:
        """Selective mixing: this iteration is the long prefill's alone."""
        self._last_step_alone = True
        if long.status is RequestStatus.WAITING:
            self._admit([long], plan, budget, now)
        else:
            self._run([long], plan, budget, now)

    def _schedule_static(self, plan: StepPlan, now: float) -> None:
        cfg = self.config
        if self.static_batch is not None and not self.running:
            self._end_static_batch()
        if self.static_batch is None:
            if not self.waiting:
                return
            oldest = min(r.arrival_time for r in self.waiting)
            if len(self.waiting) < cfg.max_num_seqs and now - oldest < cfg.static_timeout:
                return
            self._form_static_batch(now)
            if self.static_batch is None:
                return
        budget = cfg.max_batched_tokens
        budget = self._run([r for r in self.running if not r.is_prefilling], plan, budget, now)
        budget = self._run([r for r in self.running if r.is_prefilling], plan, budget, now)
        for r in self.padding:
            if budget <= 0:
                break
            plan.chunks.append(ScheduledChunk(r, r.num_computed_tokens - 1, 1, samples=False,
                                              is_decode=True, padding=True))
            budget -= 1

    def pending_static_wait(self, now: float) -> float | None:
        """Seconds until a static batch would form by timeout, if the engine is waiting for one."""
        if self.config.batching != "static" or self.static_batch is not None or not self.waiting:
            return None
        return max(0.0, min(r.arrival_time for r in self.waiting) + self.config.static_timeout - now)

    # -- pieces ---------------------------------------------------------------------------------
    def _run(self, requests: list[Request], plan: StepPlan, budget: int, now: float) -> int:
        """Schedule running requests' next chunks, preempting victims when blocks run out."""
        # The hot loop of every iteration (once per running request): properties and _append are inlined.
        scheduled = self._in_plan
        chunk_size = self.config.chunk_size
        blocks = self.blocks
        tables, block_size = blocks.tables, blocks.block_size
        chunks = plan.chunks
        running_status = RequestStatus.RUNNING
        spec_k = self.config.spec_k if self.drafter is not None else 0
        max_model_len = self.max_model_len
        for r in requests:
            if budget <= 0:
                break
            if r.status is not running_status or id(r) in scheduled:
                continue
            ids = r.token_ids
            if r.reaches_length_limit(len(ids), max_model_len):  # counting the tokens in flight (placeholders)
                continue  # its token in flight is its last (overlapped iterations): it leaves when booked
            computed = r.num_computed_tokens
            pending = len(ids) - computed  # r.num_pending_tokens
            n = pending if pending < chunk_size else chunk_size
            if n > budget:
                n = budget
            num_draft = self._draft_room(r, budget) if spec_k and pending == 1 and r.output_token_ids else 0
            n += num_draft
            table = tables.get(r.request_id)
            if table is None or len(table) * block_size < computed + n:  # else its blocks already suffice
                while not blocks.grow(r.request_id, computed + n):
                    candidates = [x for x in self.running if id(x) not in scheduled]
                    victim = self.policy.pick_victim(candidates, now)
                    plan.evicted_for_blocks = True
                    self._preempt(victim, plan)
                    if victim is r:
                        break
                if r.status is not running_status:
                    continue
            chunks.append(ScheduledChunk(r, computed, n, n - num_draft == pending,
                                         pending == 1 and len(ids) > len(r.prompt_token_ids), num_draft=num_draft))
            scheduled.add(id(r))
            budget -= n
        return budget

    def _draft_room(self, r: Request, budget: int) -> int:
        """Draft positions for a decoding request: within k, the token budget, max_tokens, the context
        and the KV blocks it holds or that are free (drafts are optional: nobody is evicted for them),
        as many as the drafter asks for (the drafter fills them after planning)."""
        blocks = self.blocks
        held = len(blocks.tables.get(r.request_id) or ())
        room = min(self.config.spec_k, budget - 1, r.sampling.max_tokens - len(r.output_token_ids) - 1,
                   self.max_model_len - len(r.token_ids) - 1,
                   (held + blocks.num_free) * blocks.block_size - len(r.token_ids))
        return self.drafter.plan(r, room) if room > 0 else 0

    def _ordered_waiting(self, now: float) -> list[Request]:
        """The policy's admission order; asked once per schedule() unless `waiting` changed since."""
        if self._order is None:
            self._order = self.policy.order_waiting(self.waiting, now)
        return self._order

    def _form_static_batch(self, now: float) -> None:
        """Seat up to max_num_seqs waiting requests (policy order) as one batch, each with blocks for
        its first chunk; their prefill then runs over as many iterations as the token budget needs."""
        self.static_batch = []
        for r in self._ordered_waiting(now):
            if len(self.running) >= self.config.max_num_seqs:
                break
            cached = self.blocks.cached_prefix_tokens(r)
            if not self.blocks.admit(r, cached, cached + min(len(r.token_ids) - cached, self.config.chunk_size)):
                break  # no skipping ahead: the policy's order is respected
            self._took_cached(r, cached)
            self.waiting.remove(r)
            r.status = RequestStatus.RUNNING
            if r.first_scheduled_time is None:
                r.first_scheduled_time = now
            self.running.append(r)
            self.static_batch.append(r)
        self._order = None
        if not self.static_batch:
            self.static_batch = None

    def _admit_waiting(self, plan: StepPlan, budget: int, now: float, skip_long: bool = False) -> int:
        """Admit in policy order; the order is not even computed when nothing could be admitted.

        Nobody is admitted in an iteration that evicted a running request for KV blocks: admitting
        right after an eviction only feeds the thrash (and with prefill-first, where decodes wait for
        prefills, a readmitted victim's prefill could keep the decodes holding the blocks from ever running).
        """
        if budget <= 0 or not self.waiting or len(self.running) >= self.config.max_num_seqs \
                or plan.evicted_for_blocks:
            return budget
        ordered = self._ordered_waiting(now)
        if skip_long:
            ordered = [r for r in ordered if not self._is_long(r)]
        return self._admit(ordered, plan, budget, now)

    def _admit(self, ordered: list[Request], plan: StepPlan, budget: int, now: float) -> int:
        """Admit waiting requests in policy order while seats, tokens and KV blocks last."""
        for r in ordered:
            if budget <= 0 or len(self.running) >= self.config.max_num_seqs:
                break
            cached = self.blocks.cached_prefix_tokens(r)  # cached tokens cost no budget
            n = min(len(r.token_ids) - cached, self.config.chunk_size, budget)
            if not self.blocks.admit(r, cached, cached + n):
                break  # no skipping ahead: the policy's order is respected
            self._took_cached(r, cached)
            self.waiting.remove(r)
            self._order = None
            r.status = RequestStatus.RUNNING
            if r.first_scheduled_time is None:
                r.first_scheduled_time = now
            self.running.append(r)
            if self.static_batch is not None:
                self.static_batch.append(r)
            self._append(plan, r, n)
            budget -= n
        return budget

    def _priority_preemption(self, plan: StepPlan, now: float) -> None:
        """Let the policy evict running requests for the best waiting one when blocks are short."""
        cap = self.config.max_num_seqs
        if not self.waiting or len(self.running) > cap:
            return  # over the cap only while draining (preemption=drain): nobody is admitted, so none evicted
        head = self._ordered_waiting(now)[0]
        while not self._can_admit(head) or len(self.running) >= cap:
            victim = self.policy.should_preempt(head, self.running, now)
            if victim is None:
                return
            self._preempt(victim, plan)

    def _took_cached(self, r: Request, cached: int) -> None:
        """`r` was admitted with its first `cached` tokens served from the prefix cache."""
        r.num_computed_tokens = cached
        if r.first_scheduled_time is None:
            r.num_cached_tokens = cached
        if cached:
            self.policy.on_prefix_hit(r, cached)

    def _can_admit(self, r: Request) -> bool:
        """Whether the KV blocks for `r`'s first chunk (after its cached prefix) are there now."""
        cached = self.blocks.cached_prefix_tokens(r)
        n = min(len(r.token_ids) - cached, self.config.chunk_size, self.config.max_batched_tokens)
        return self.blocks.can_admit(r, cached, cached + n)

    def _append(self, plan: StepPlan, r: Request, n: int) -> None:
        computed = r.num_computed_tokens
        pending = len(r.token_ids) - computed
        samples = n == pending  # the chunk brings r level with its token list
        is_decode = n == 1 and pending == 1 and len(r.token_ids) > len(r.prompt_token_ids)
        plan.chunks.append(ScheduledChunk(r, computed, n, samples, is_decode))
        self._in_plan.add(id(r))

    def _preempt(self, victim: Request, plan: StepPlan) -> None:
        self.running.remove(victim)
        if self.static_batch is not None and victim in self.static_batch:
            self.static_batch.remove(victim)
        self.blocks.free(victim.request_id)
        victim.num_computed_tokens = 0
        victim.num_preemptions += 1
        victim.status = RequestStatus.WAITING
        self.waiting.append(victim)
        self._order = None
        plan.preempted.append(victim)
        self._end_static_batch_if_done()

    def _end_static_batch_if_done(self) -> None:
        if self.static_batch is not None and not self.running:
            self._end_static_batch()

    def _end_static_batch(self) -> None:
        for r in self.padding:
            self.blocks.free(r.request_id)
        self.padding.clear()
        self.static_batch = None

    def _is_long(self, r: Request) -> bool:
        return r.num_prompt_tokens >= self.config.selective_threshold

    def _long_prefill_for_alone_turn(self, prefilling: list[Request], now: float) -> Request | None:
        for r in prefilling:
            if self._is_long(r):
                return r
        if len(self.running) >= self.config.max_num_seqs:
            return None
        for r in self._ordered_waiting(now):
            if self._is_long(r):
                return r if self._can_admit(r) else None
        return None


def _overrides_should_preempt(policy: Policy) -> bool:
    """Whether the policy may evict running requests for a waiting one (the base class never does)."""
    return type(policy).should_preempt is not Policy.should_preempt
