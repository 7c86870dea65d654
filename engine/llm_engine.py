"""The engine: one `step()` is one iteration (schedule, forward, sample, bookkeeping); with
overlapped iterations (async scheduling, on by default on CUDA) the next one is scheduled and
launched before the current one is booked (see `LLMEngine.step`).

Everything that changes engine state from outside (new requests, aborts, config changes) is
either done between steps by the caller's thread or queued and applied at the next step's start;
`AsyncEngine` (engine/async_engine.py) runs `step()` in a worker thread.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
# np.percentile imports numpy.ma on its first call (8 ms); imported here, with the engine, that is not
# paid in the engine's thread at the first request's finish (request_record)
import numpy.ma  # noqa: F401
import torch

from batchdeck.engine.attention.backend import make_backend
from batchdeck.engine.block_manager import BlockManager, blocks_needed
from batchdeck.engine.config import ConfigBounds, ConfigError, EngineConfig, LiveConfig, validate_changes
from batchdeck.engine.kv_cache import KVCache, bytes_per_block
from batchdeck.engine.model_runner import LaunchedStep, ModelRunner
from batchdeck.engine.models import LoadedModel, load_model
from batchdeck.engine.request import (FinishReason, QueueFullError, Request, RequestError, RequestStatus,
                                      SamplingParams, check_request_fields)
from batchdeck.engine.sampler import Sampler, TopLogprobs
from batchdeck.engine.scheduler import Scheduler
from batchdeck.engine.step_plan import StepPlan
from batchdeck.engine.settings import CPU_KV_POOL_BYTES, START_KEYS
from batchdeck.engine.slo import DEFAULT_SLO_TARGETS, SLOTarget, slo_met
from batchdeck.engine.speculative.draft_model import DraftModelDrafter
from batchdeck.engine.speculative.drafter import Drafter, LookupDrafter
from batchdeck.engine.speculative.ngram import propose_ngram
from batchdeck.engine.telemetry import Event, IterationRecord, RequestRecord, SinkFn, null_sink
from batchdeck.policies import describe_policies, make_policy, policy_names, validate_policy_params

VOCAB_PADDING_SLACK = 1024  # draft and target vocabularies may differ by padding, not by tokenizer


@dataclass
class RequestOutput:
    """What a step produced for one request: new tokens, and whether it is done."""

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None = None
    logprobs: list[float] | None = None  # per new token, when the request asked (None for speculated steps)
    top_logprobs: list[TopLogprobs] | None = None  # per new token, when the request asked for top_logprobs


@dataclass
class StepResult:
    iteration: int
    outputs: list[RequestOutput] = field(default_factory=list)
    finished: list[Request] = field(default_factory=list)
    record: IterationRecord | None = None
    plan: StepPlan | None = None  # the plan this iteration executed (with overlap, not the last one scheduled)


@dataclass(slots=True)
class _InFlight:
    """An iteration launched and not booked yet, with what its record needs from the launch."""

    iteration: int
    plan: StepPlan
    launched: LaunchedStep
    preemptions: list[int]  # each chunk's request's preemption count at the launch
    config_version: int  # the live config it was planned under
    schedule_time: float = 0.0
    draft_time: float = 0.0
    launch_time: float = 0.0  # host time from the start of scheduling to the end of the launch
    overlapped: bool = False  # the next iteration was launched before this one was booked


def check_device(device: str) -> None:
    """ConfigError (naming `device`) when torch cannot use `device` on this machine."""
    if not device.startswith("cuda"):
        return
    if not torch.cuda.is_available():
        raise ConfigError("device", device, "cpu: torch finds no CUDA device on this machine")
    index = int(device[5:]) if device.startswith("cuda:") else 0
    if index >= torch.cuda.device_count():
        raise ConfigError("device", device, f"cuda or cuda:N with N < {torch.cuda.device_count()} "
                                            "(the CUDA devices torch finds)")


def available_memory(device: torch.device) -> int:
    """Bytes that could still be allocated on `device` (free GPU memory; the host's available memory)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def check_pool_fits(num_blocks: int, per_block: int, device: torch.device) -> None:
    """Refuse, before allocating, a KV pool larger than the memory available on its device."""
    need, have = num_blocks * per_block, available_memory(device)
    if need > have:
        raise ConfigError("num_blocks", num_blocks,
                          f"at most {have // per_block} here: {num_blocks} blocks of {per_block} bytes would take "
                          f"{_gb(need)} but {_gb(have)} of {device.type} memory is available")


class LLMEngine:
    def __init__(self, config: EngineConfig, live: LiveConfig | None = None, *, sink: SinkFn = null_sink,
                 clock: Callable[[], float] | None = None, loaded: LoadedModel | None = None,
                 slo_targets: Mapping[str, SLOTarget] | None = None, check_invariants: bool = False,
                 draft_loaded: LoadedModel | None = None):
        config.validate()
        self.config = config
        self.sink = sink
        self.check_invariants = check_invariants
        self.slo_targets = dict(slo_targets or DEFAULT_SLO_TARGETS)
        self._t0 = time.monotonic()
        self.clock = clock or (lambda: time.monotonic() - self._t0)
        self.simulation: dict[str, Any] | None = None  # set by a simulated engine: the profile it runs
        self.perf = time.perf_counter  # how step timings are read (a simulated engine reads its virtual clock)
        self.time_rate = 1.0  # engine-clock seconds per wall-clock second (a paced simulation runs faster)
        num_blocks = self._init_executor(loaded, draft_loaded)

        # Each running request holds at least one block, so the pool caps the running count too.
        self.bounds = ConfigBounds.for_engine(config, num_blocks, policy_names(),
                                              {name: d["params"] for name, d in describe_policies().items()})
        live = live or LiveConfig()
        initial = {k: v for k, v in live.to_dict().items() if k != "version"}
        self.live = validate_changes(LiveConfig(), initial, self.bounds, validate_policy_params)
        self.live = LiveConfig(**{**self.live.to_dict(), "version": 0})
        self._target = self.live
        self._pending: list[tuple[dict[str, Any], LiveConfig, str]] = []
        self.scheduler = Scheduler(self.blocks, make_policy(self.live.policy, self.live.policy_params), self.live)
        self.scheduler.max_model_len = self.max_model_len
        self.drafter = self._make_drafter(num_blocks)
        self.scheduler.drafter = self.drafter
        self.requests: dict[str, Request] = {}  # in flight, plus the most recent finished ones
        self.retain_finished = 10_000  # finished requests kept for look-up; older ones are forgotten
        self._finished_ids: deque[str] = deque()
        self.iteration = 0  # the next iteration to launch
        self._inflight: _InFlight | None = None  # launched, not booked yet (overlapped iterations)
        self.async_scheduling = config.async_scheduling
        self.num_requests_added = 0
        self._prefix_counts = (0, 0)  # the block manager's prefix-cache counters at the last record

    def _init_executor(self, loaded: LoadedModel | None, draft_loaded: LoadedModel | None) -> int:
        """Load the model, allocate the KV pool and build what executes iterations; returns the pool's
        block count. (The simulated engine, engine/sim/engine.py, builds its executor instead.)"""
        config = self.config
        self.device = torch.device(config.device)
        check_device(config.device)
        self.loaded = loaded or load_model(config.model, config.device, config.dtype, config.seed)
        self.max_model_len = min(self.loaded.max_model_len, config.max_model_len or self.loaded.max_model_len)

        lm = self.loaded
        dtype = next(lm.model.parameters()).dtype
        self.draft_loaded = self._load_draft_model(draft_loaded) if config.drafter == "model" else None
        per_block = bytes_per_block(lm.num_layers, config.block_size, lm.num_kv_heads, lm.head_dim, dtype)
        if self.draft_loaded is not None:  # the draft pool has as many blocks as the target's
            d = self.draft_loaded
            per_block += bytes_per_block(d.num_layers, config.block_size, d.num_kv_heads, d.head_dim, dtype)
        num_blocks = config.num_blocks or self._default_num_blocks(per_block)
        if config.num_blocks is not None:
            check_pool_fits(num_blocks, per_block, self.device)
        self.kv_cache = KVCache.allocate(lm.num_layers, num_blocks, config.block_size, lm.num_kv_heads,
                                         lm.head_dim, dtype, self.device)
        self.blocks = BlockManager(num_blocks, config.block_size)
        self.backend = make_backend(config.attention_backend, self.device)
        self.sampler = Sampler(self.device, config.seed)
        self.runner = ModelRunner(lm.model, self.kv_cache, self.backend, self.sampler, self.device,
                                  max_rows=config.max_num_seqs_limit, max_tokens=config.max_batched_tokens_limit,
                                  max_model_len=self.max_model_len, cuda_graphs=config.cuda_graphs,
                                  spec_k_limit=config.spec_k_limit)
        return num_blocks

    def _load_draft_model(self, draft: LoadedModel | None) -> LoadedModel:
        """The draft model (`draft` when the caller loaded it already), checked against the target."""
        cfg = self.config
        draft = draft or load_model(cfg.draft_model, cfg.device, cfg.dtype, cfg.seed)
        target_vocab, draft_vocab = self.loaded.config.vocab_size, draft.config.vocab_size
        if abs(target_vocab - draft_vocab) > VOCAB_PADDING_SLACK:
            raise ConfigError("draft_model", cfg.draft_model,
                              f"a model with the target's vocabulary: its vocab_size is {draft_vocab}, the "
                              f"target's {target_vocab} (they may differ by padding, at most {VOCAB_PADDING_SLACK})")
        return draft

    def _make_drafter(self, num_blocks: int) -> Drafter:
        cfg = self.config
        if self.draft_loaded is None:
            return LookupDrafter(propose_ngram)
        d = self.draft_loaded
        kv = KVCache.allocate(d.num_layers, num_blocks, cfg.block_size, d.num_kv_heads, d.head_dim,
                              next(d.model.parameters()).dtype, self.device)
        return DraftModelDrafter(d, kv, self.backend, self.device, self.loaded.config.vocab_size,
                                 max_rows=cfg.max_num_seqs_limit, max_tokens_per_forward=cfg.max_batched_tokens_limit,
                                 cuda_graphs=cfg.cuda_graphs, seed=cfg.seed)

    def restart_clock(self) -> None:
        """Make 'now' zero (an offline run starts its clock when it starts serving); only when idle."""
        if self.has_unfinished:
            raise RuntimeError("cannot restart the clock while requests are in flight")
        self._t0 = time.monotonic()
        restart = getattr(self.clock, "restart", None)  # a virtual clock restarts itself
        if restart is not None:
            restart()

    def sleep(self, seconds: float) -> None:
        """Wait `seconds` of engine time while idle (a simulated engine's virtual clock jumps instead)."""
        time.sleep(seconds / self.time_rate)

    # -- sizing ---------------------------------------------------------------------------------
    def _default_num_blocks(self, per_block: int) -> int:
        if self.device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(self.device)
            budget = free * self.config.gpu_memory_fraction
        else:
            budget = CPU_KV_POOL_BYTES
        return max(16, int(budget // per_block))

    # -- requests -------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams | None = None,
                    *, arrival_time: float | None = None, tenant: str = "default", priority: int = 0,
                    slo_class: str = "interactive") -> Request:
        """Validate and queue a request; raises RequestError (naming the field) and changes nothing.

        A rejection is also reported as a `request_rejected` event.
        """
        try:
            return self._add_request(request_id, prompt_token_ids, sampling, arrival_time=arrival_time,
                                     tenant=tenant, priority=priority, slo_class=slo_class)
        except RequestError as exc:
            self.emit_event("request_rejected", request_id=request_id, error=str(exc))
            raise

    def _add_request(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams | None,
                     *, arrival_time: float | None, tenant: str, priority: int, slo_class: str) -> Request:
        sampling = sampling or SamplingParams()
        self.check_request(request_id, prompt_token_ids, sampling, tenant=tenant, priority=priority,
                           slo_class=slo_class)
        bound = self.config.max_waiting
        if bound is not None and len(self.scheduler.waiting) >= bound:
            raise QueueFullError(len(self.scheduler.waiting), bound)
        req = Request(request_id, list(prompt_token_ids), sampling,
                      arrival_time=self.clock() if arrival_time is None else arrival_time,
                      tenant=tenant or "default", priority=priority, slo_class=slo_class)
        self.requests[request_id] = req
        self.scheduler.add(req)
        self.num_requests_added += 1
        return req

    def check_request(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams, *,
                      tenant: str = "default", priority: int = 0, slo_class: str = "interactive") -> None:
        """RequestError (naming the field) unless this engine would admit the request now, the waiting
        queue's room aside: its sampling and fields, a free id, and a prompt it can serve with
        `sampling`'s max_tokens (its tokens, the context, the pool). What `add_request` checks; MQTT checks a
        submission scheduled for later with it too, so that a bad one is refused in its reply."""
        sampling.validate()
        check_request_fields(request_id, tenant, priority, slo_class)
        if request_id in self.requests:
            if self.requests[request_id].is_finished:
                raise RequestError(f"request id {request_id!r} belongs to a finished request: finished ids stay "
                                   f"taken while the engine keeps the last {self.retain_finished:,} finished "
                                   "requests for look-up; use a new id")
            raise RequestError(f"request id {request_id!r} is already in use")
        if not prompt_token_ids:
            raise RequestError("prompt is empty: at least one token is needed")
        vocab = self.loaded.config.vocab_size
        if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= vocab:
            i = next(i for i, t in enumerate(prompt_token_ids) if not 0 <= t < vocab)
            raise RequestError(f"prompt_token_ids[{i}] = {prompt_token_ids[i]} is outside the model's vocabulary: "
                               f"token ids must lie in [0, {vocab - 1}]")
        if len(prompt_token_ids) >= self.max_model_len:
            raise RequestError(
                f"prompt has {len(prompt_token_ids)} tokens; the model's context is {self.max_model_len}, "
                "so at most {} prompt tokens leave room for one output token".format(self.max_model_len - 1)
            )
        longest = min(len(prompt_token_ids) + sampling.max_tokens, self.max_model_len)
        need = blocks_needed(longest, self.blocks.block_size)
        if need > self.blocks.num_blocks:
            raise RequestError(
                f"request needs up to {need} KV blocks ({longest} tokens) but the pool has "
                f"{self.blocks.num_blocks}: lower max_tokens or start with more --num-blocks"
            )

    def abort(self, request_id: str, reason: FinishReason = FinishReason.ABORT) -> Request | None:
        """Finish a request now, freeing its blocks; None if unknown or done. `reason` is `abort`
        unless the caller ended it for a reason of its own (a server that matched a stop string: `stop`)."""
        req = self.requests.get(request_id)
        if req is None or req.is_finished:
            return None
        self.scheduler.remove(req)
        self._finish(req, FinishReason(reason), self.clock())
        return req

    @property
    def has_unfinished(self) -> bool:
        """Requests wait or run, or an iteration in flight is still to be booked."""
        return self.scheduler.has_work or self._inflight is not None

    @property
    def num_unfinished(self) -> int:
        return len(self.scheduler.waiting) + len(self.scheduler.running)

    # -- live configuration ---------------------------------------------------------------------
    def update_config(self, changes: Mapping[str, Any], source: str = "api") -> LiveConfig:
        """Validate `changes` now (ConfigError names key, value and range); apply at the next step."""
        new = validate_changes(self._target, changes, self.bounds, validate_policy_params)
        self._target = new
        self._pending.append((dict(changes), new, source))
        return new

    @property
    def target_config(self) -> LiveConfig:
        return self._target

    def apply_pending_config(self, now: float | None = None) -> None:
        """Apply queued config changes now (call only between iterations)."""
        now = self.clock() if now is None else now
        for changes, new, source in self._pending:
            old = self.live
            self.live = new
            if (new.policy, dict(new.policy_params)) != (old.policy, dict(old.policy_params)):
                self.scheduler.set_policy(make_policy(new.policy, new.policy_params))
            self.scheduler.set_config(new)
            self.emit_event("config_change", now, changes=changes, applied_iteration=self.iteration,
                            source=source, version=new.version, config=new.to_dict())
        self._pending.clear()

    def clear_prefix_cache(self, source: str = "api") -> int:
        """Drop the prefix cache now (between iterations); returns the cached blocks freed."""
        freed = self.blocks.clear()
        self.emit_event("prefix_cache_cleared", freed_blocks=freed, source=source)
        return freed

    def prefix_cache_stats(self) -> dict[str, Any]:
        """Totals since start (tokens looked up / served from the cache), for metrics servers."""
        return self.blocks.prefix_cache_stats()

    def emit_event(self, kind: str, now: float | None = None, **data: Any) -> Event:
        event = Event(kind, self.clock() if now is None else now, self.iteration, data)
        self.sink("event", event)
        return event

    # -- the iteration --------------------------------------------------------------------------
    @property
    def overlapping(self) -> bool:
        """Whether the next iteration may be launched before the one in flight is booked: async
        scheduling is on and nothing needs host values at planning time (a drafter reads the tokens;
        static batching pads with finished slots), so speculating and static iterations stay synchronous."""
        return self.async_scheduling and not self.live.spec_k and self.live.batching == "continuous"

    def step(self) -> StepResult | None:
        """Run one iteration; None when there was nothing to compute (idle or a static batch forming).

        With overlapped iterations (`overlapping`), it launches iteration N+1 before booking N and
        returns N's result: N+1 was planned against the state N leaves (N's tokens are placeholders,
        fed to N+1 on the device) while N ran. Pending config changes apply before the next launch
        (`applied_iteration` is the first iteration planned under them); when they turn overlapping
        off, the iteration in flight is booked first and nothing new is launched in that call."""
        if self._pending:
            self.apply_pending_config()
        prev = self._inflight
        overlap = self.overlapping
        if prev is not None and not overlap:
            self._inflight = None
            return self._book(prev)
        launched = self._launch(prev)
        if prev is None:
            if launched is None:
                return None
            if not overlap:
                return self._book(launched)
            prev, launched = launched, self._launch(launched)  # fill the pipeline
        prev.overlapped = launched is not None
        self._inflight = launched
        return self._book(prev)

    def _launch(self, prev: "_InFlight | None") -> "_InFlight | None":
        """Schedule and launch the next iteration (None when nothing is scheduled); `prev`: the
        iteration still in flight, whose sampled tokens are placeholders here."""
        perf = self.perf
        t_start = perf()
        now = self.clock()
        plan = self.scheduler.schedule(now)
        t_sched = perf()
        for victim in plan.preempted:
            self.drafter.release(victim.request_id, finished=False)
            self.emit_event("preemption", now, request_id=victim.request_id, tenant=victim.tenant,
                            num_preemptions=victim.num_preemptions, reason="kv_cache_full")
        if plan.empty:
            return None
        if self.live.spec_k:  # the scheduler reserves draft positions only then
            drafting = [c for c in plan.chunks if c.num_draft]
            if drafting:
                self._fill_drafts(drafting)
        t_draft = perf()
        launched = self.runner.launch(plan, self.blocks, prev.launched if prev is not None else None)
        preemptions = []
        for chunk in plan.chunks:  # what the host knows already: positions computed, tokens coming
            r = chunk.request
            preemptions.append(r.num_preemptions)
            if not chunk.padding:
                r.num_computed_tokens += chunk.num_tokens
        for chunk in launched.chunks:
            chunk.request.add_placeholder()
        it = self.iteration
        self.iteration += 1
        return _InFlight(it, plan, launched, preemptions, self.live.version, schedule_time=t_sched - t_start,
                         draft_time=t_draft - t_sched, launch_time=perf() - t_start)

    def _book(self, flight: "_InFlight") -> StepResult:
        """Wait for an iteration's sampled tokens and book them: append, stop checks, finishes,
        prefix-cache commits, outputs and its telemetry record. A token of a request that finished
        or was aborted since the launch is discarded."""
        perf = self.perf
        t_start = perf()
        sampled = flight.launched.result()  # the iteration's one host sync
        t_waited = perf()
        now = self.clock()
        plan, it = flight.plan, flight.iteration
        timings = flight.launched.timings
        result = StepResult(it, plan=plan)
        policy = self.scheduler.policy
        commit = self.blocks.commit
        running = RequestStatus.RUNNING
        tenant_tokens: dict[str, int] = {}
        ttfts: list[float] = []
        itls: list[float] = []
        num_padding = 0
        for chunk, preemptions in zip(plan.chunks, flight.preemptions):
            if chunk.padding:
                num_padding += 1
                continue
            r = chunk.request
            tenant_tokens[r.tenant] = tenant_tokens.get(r.tenant, 0) + chunk.num_tokens
            if r.status is not running or r.num_preemptions != preemptions:
                continue  # finished, aborted or preempted since the launch: its blocks are gone
            if not chunk.num_draft:
                commit(r, chunk.start + chunk.num_tokens)
            prompt_part = max(0, min(chunk.start + chunk.num_tokens, r.num_prompt_tokens) - chunk.start)
            # A speculating chunk's output service is known only after verification (below).
            policy.on_tokens_computed(r, prompt_part, 1 if chunk.samples and not chunk.draft else 0)
        spec_proposed = spec_accepted = num_generated = 0
        logprobs_of = flight.launched.logprobs
        for chunk, tokens in sampled:
            r = chunk.request
            if r.status is RequestStatus.FINISHED:
                continue  # it stopped at the previous iteration, or was aborted: the token is discarded
            reason = None
            emitted: list[int] = []
            previous = r.token_times[-1] if r.token_times else None
            for token in tokens:
                r.append_token(token, now)
                emitted.append(token)
                reason = self._stop_reason(r, token)
                if reason is not None:
                    break
            num_generated += len(emitted)
            if previous is not None:  # one gap per delivery: accepted drafts arrive with their step's token
                itls.append(now - previous)
            if chunk.draft:  # accepted drafts that were kept (a stop among them drops the rest)
                accepted = min(len(tokens) - 1, len(emitted))
                r.spec_steps += 1
                r.spec_proposed += len(chunk.draft)
                r.spec_accepted += accepted
                spec_proposed += len(chunk.draft)
                spec_accepted += accepted
                policy.on_tokens_computed(r, 0, len(emitted))
            if chunk.num_draft:
                # The KV of the last token and of accepted drafts stays; rejected drafts' positions roll back.
                r.num_computed_tokens = min(r.num_computed_tokens, r.num_tokens - 1)
                if reason is None:
                    self.blocks.shrink(r.request_id, r.num_computed_tokens)
                    self.drafter.sync(r)
                commit(r, r.num_computed_tokens)  # only verified tokens' blocks are cached
            if r.first_token_time is None:
                r.first_token_time, r.first_token_iteration = now, it
                ttfts.append(now - r.arrival_time)
            if reason is not None:
                if r.status is running:
                    self.scheduler.finish(r)
                else:  # preempted while its last token was in flight
                    self.scheduler.remove(r)
                self._finish(r, reason, now, it)
                result.finished.append(r)
            logprobs = tops = None
            if r.sampling.logprobs and len(emitted) == 1 and r.request_id in logprobs_of:
                logprobs = [logprobs_of[r.request_id]]
                if r.sampling.top_logprobs:
                    tops = [flight.launched.top_logprobs[r.request_id]]
            result.outputs.append(RequestOutput(r.request_id, emitted, reason is not None,
                                                reason.value if reason else None, logprobs, tops))
        if self.check_invariants:
            self.blocks.check()
            self.drafter.check()
        t_end = perf()
        blocks = self.blocks
        queries, hits = blocks.prefix_cache_queries, blocks.prefix_cache_hits
        record = IterationRecord(
            iteration=it, time=now, step_time=flight.launch_time + (t_end - t_start),
            schedule_time=flight.schedule_time, draft_time=flight.draft_time,
            prepare_time=timings.prepare, forward_time=timings.forward, sample_time=timings.sample,
            num_prefill_tokens=plan.num_prefill_tokens,
            num_decode_tokens=plan.num_decode_tokens - num_padding,
            num_prefill_chunks=plan.num_prefill_chunks,
            num_requests_running=len(self.scheduler.running), num_requests_waiting=len(self.scheduler.waiting),
            num_preemptions=len(plan.preempted), kv_blocks_used=blocks.num_used,
            kv_blocks_total=blocks.num_blocks, kv_cache_usage=blocks.usage,
            config_version=flight.config_version, num_padding_tokens=num_padding,
            num_finished=len(result.finished), num_generated_tokens=num_generated, ttfts=ttfts,
            spec_proposed=spec_proposed, spec_accepted=spec_accepted,
            tenant_tokens=tenant_tokens, itls=itls,
            prefix_cache_queries=queries - self._prefix_counts[0], prefix_cache_hits=hits - self._prefix_counts[1],
            kv_blocks_cached=blocks.num_cached, kv_blocks_evictable=blocks.num_evictable,
            kv_blocks_free=blocks.num_empty, overlapped=flight.overlapped, sync_wait_time=t_waited - t_start,
        )
        self._prefix_counts = (queries, hits)
        result.record = record
        self.sink("iteration", record)
        return result

    def _fill_drafts(self, drafting: list) -> None:
        """Let the drafter fill the reserved draft positions; positions it left empty are not computed
        (their blocks go back with the rollback after verification)."""
        self.drafter.fill(drafting)
        for c in drafting:
            c.num_tokens -= c.num_draft - len(c.draft)

    def config_snapshot(self) -> dict[str, Any]:
        """The live config, its bounds and version (what MQTT retains on PREFIX/config)."""
        return {"config": self._target.to_dict(), "bounds": self.bounds.to_dict(), "version": self._target.version,
                "engine": {**{k: getattr(self.config, k) for k in START_KEYS}, "num_blocks": self.blocks.num_blocks,
                           "kv_pool_bytes": self.kv_cache.num_bytes}}

    def _stop_reason(self, r: Request, token: int) -> FinishReason | None:
        s = r.sampling
        known = r.num_known_tokens  # the tokens after a placeholder-free prefix (overlapped iterations)
        if r.num_output_tokens < s.min_tokens and known < self.max_model_len:
            return None  # neither EOS nor a stop token ends a request before min_tokens
        if not s.ignore_eos and token in self.loaded.eos_token_ids:
            return FinishReason.STOP
        if token in s.stop_token_ids:
            return FinishReason.STOP
        if r.reaches_length_limit(known, self.max_model_len):
            return FinishReason.LENGTH
        return None

    def _finish(self, r: Request, reason: FinishReason, now: float, iteration: int | None = None) -> None:
        """`iteration`: the one whose token finished it (default: the next one, for an abort between them)."""
        r.status = RequestStatus.FINISHED
        r.finish_reason = reason
        r.finish_time = now
        r.finish_iteration = self.iteration if iteration is None else iteration
        r.drop_placeholders()
        self.sampler.forget(r.request_id)
        self.drafter.release(r.request_id)
        self.sink("request", self.request_record(r))
        self._finished_ids.append(r.request_id)
        while len(self._finished_ids) > self.retain_finished:
            self.requests.pop(self._finished_ids.popleft(), None)

    def request_record(self, r: Request) -> RequestRecord:
        ttft, tpot = r.ttft, r.tpot
        e2e = (r.finish_time or r.arrival_time) - r.arrival_time
        itl_p50 = itl_p99 = itl_max = None
        gaps = np.diff(r.token_times)
        gaps = gaps[gaps > 0]  # tokens of one speculative step arrive together: one delivery
        if gaps.size:
            itl_p50, itl_p99 = (float(v) for v in np.percentile(gaps, (50, 99)))
            itl_max = float(gaps.max())
        queued_until = r.first_scheduled_time if r.first_scheduled_time is not None else r.finish_time
        return RequestRecord(
            request_id=r.request_id, tenant=r.tenant, slo_class=r.slo_class, priority=r.priority,
            prompt_tokens=r.num_prompt_tokens, output_tokens=r.num_output_tokens, arrival=r.arrival_time,
            queue_time=max(0.0, (queued_until or r.arrival_time) - r.arrival_time), ttft=ttft, tpot=tpot,
            itl_p50=itl_p50, itl_p99=itl_p99, itl_max=itl_max, e2e_latency=e2e,
            finish_reason=r.finish_reason.value if r.finish_reason else "abort",
            num_preemptions=r.num_preemptions,
            slo_met=r.finish_reason is not FinishReason.ABORT and slo_met(self.slo_targets, r.slo_class, ttft, tpot),
            first_token_iteration=r.first_token_iteration, finish_iteration=r.finish_iteration,
            finish=r.finish_time or 0.0, spec_proposed=r.spec_proposed, spec_accepted=r.spec_accepted,
            spec_steps=r.spec_steps, num_cached_tokens=r.num_cached_tokens, max_tokens=r.sampling.max_tokens,
            spec_acceptance_rate=r.spec_accepted / r.spec_proposed if r.spec_proposed else None,
            spec_mean_accepted=r.spec_accepted / r.spec_steps if r.spec_steps else None,
        )

    def run_until_done(self, max_iterations: int | None = None) -> None:
        """Step until every request finished (sleeping through static-batch waits)."""
        n = 0
        while self.has_unfinished:
            if self.step() is None:
                wait = self.scheduler.pending_static_wait(self.clock())
                if wait is None:
                    raise RuntimeError("engine has unfinished requests but scheduled nothing")
                self.sleep(min(wait, 0.05) + 1e-4)
            n += 1
            if max_iterations is not None and n >= max_iterations:
                break
