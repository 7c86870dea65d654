"""`SimulatedEngine`: the real `LLMEngine` (scheduler, policies, block manager, live config,
speculation accounting, telemetry) over the simulated executor; `make_engine` picks it when the
engine config names a profile (`EngineConfig.sim`)."""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch

from batchdeck.engine.block_manager import BlockManager
from batchdeck.engine.config import ConfigError, EngineConfig, LiveConfig
from batchdeck.engine.llm_engine import LLMEngine
from batchdeck.engine.sim.clock import PacedClock, VirtualClock
from batchdeck.engine.sim.executor import SimExecutor, SimKVPool, SimSampler
from batchdeck.engine.sim.profile import SimProfile, load_profile
from batchdeck.engine.tokenizer import ByteTokenizer


class SimulatedEngine(LLMEngine):
    """`clock`: a `VirtualClock` (as fast as the CPU allows; the caller drives idle time, see
    engine/service/virtual_loop.py) or a `PacedClock` (the default: wall time x speed)."""

    def __init__(self, config: EngineConfig, live: LiveConfig | None = None, *,
                 profile: "SimProfile | str | None" = None, clock: "VirtualClock | PacedClock | None" = None,
                 **kwargs: Any):
        self.profile = load_profile(profile if profile is not None else config.sim)
        clock = clock if clock is not None else PacedClock(1.0)
        kwargs.pop("loaded", None)
        kwargs.pop("draft_loaded", None)
        super().__init__(config, live, clock=clock, **kwargs)
        self.perf = clock  # step timings are simulated seconds
        self.time_rate = clock.rate
        self.simulation = self.profile.summary()

    def _init_executor(self, loaded: Any, draft_loaded: Any) -> int:
        cfg, p = self.config, self.profile
        if cfg.drafter == "model":
            raise ConfigError("drafter", cfg.drafter, "ngram on a simulated engine (a draft model's cost is not modelled)")
        self.device = torch.device("cpu")
        self.max_model_len = min(p.max_model_len, cfg.max_model_len or p.max_model_len)
        self.loaded = SimpleNamespace(config=SimpleNamespace(vocab_size=p.vocab_size), tokenizer=ByteTokenizer(),
                                      name=p.model, max_model_len=p.max_model_len, eos_token_ids=p.eos_token_ids)
        self.draft_loaded = None
        per_block = p.kv_bytes_per_block * cfg.block_size // p.block_size
        num_blocks = cfg.num_blocks or max(1, p.num_blocks * p.block_size // cfg.block_size)
        self.kv_cache = SimKVPool(num_blocks, cfg.block_size, per_block)
        self.blocks = BlockManager(num_blocks, cfg.block_size)
        self.backend = None
        self.sampler = SimSampler()
        cost = p.cost.for_limits(cfg.max_num_seqs_limit, cfg.max_batched_tokens_limit)
        self.runner = SimExecutor(cost, self.clock, p.vocab_size, p.eos_token_ids, p.spec_acceptance, cfg.seed,
                                  device_async=not p.device_name.startswith("CPU"))
        return num_blocks

    def add_request(self, *args: Any, **kwargs: Any):
        idle = not self.has_unfinished
        request = super().add_request(*args, **kwargs)
        if idle:
            self.runner.waking = True  # a real engine waits for work here: its next iteration starts late
        return request

    def step(self):
        result = super().step()
        if result is None:
            self.runner.waking = True
        return result

    def restart_clock(self) -> None:
        super().restart_clock()
        self.runner.restart()  # what ended on the old clock is not in the new one's future

    def sleep(self, seconds: float) -> None:
        self.clock.sleep(seconds)

    def config_snapshot(self) -> dict[str, Any]:
        snap = super().config_snapshot()
        snap["engine"].update(model=self.profile.model, device=self.profile.label(), dtype=self.profile.dtype,
                              simulation=self.simulation)
        return snap


def make_engine(config: EngineConfig, live: LiveConfig | None = None, **kwargs: Any) -> LLMEngine:
    """An `LLMEngine`, or a `SimulatedEngine` when `config.sim` names a profile (kwarg `profile`, a
    SimProfile or name, picks one too)."""
    if config.sim or kwargs.get("profile") is not None:
        return SimulatedEngine(config, live, **kwargs)
    kwargs.pop("profile", None)
    return LLMEngine(config, live, **kwargs)
