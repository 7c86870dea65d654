"""The simulated executor: stands where `ModelRunner` stands (same `launch(plan, blocks, prev)`), computes
no tensors, and lets the iteration last what the cost model says.

Output tokens are deterministic stand-ins, a function of the request id and the position (never an
EOS or a stop token, so a request runs to its `max_tokens`, as `ignore_eos` workloads do). A
speculating chunk's drafts (the real drafter's proposals) are verified against those stand-ins: a
draft is accepted when it equals the stand-in at its position, or else with the profile's
`spec_acceptance` chance (a deterministic draw); the first rejection emits the stand-in and stops,
as rejection sampling does, so acceptance, rollback and KV accounting run as on the GPU.

Iterations are launched as the engine launches them on its device (`launch`), so overlapped
iterations (async scheduling) run here as there: on a GPU (`device_async`) an iteration launched while
another is in flight starts on the simulated device when that one ends, and the engine's clock
reaches its end when the engine waits for its tokens (`SimLaunchedStep.result`), so an iteration
planned during the previous one's run admits only what had arrived by then; on a CPU the launch
computes the iteration, so the clock moves at the launch.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

from batchdeck.engine.model_runner import LaunchedStep, StepTimings
from batchdeck.engine.sim.cost_model import CostModel
from batchdeck.engine.step_plan import StepPlan

_MIX = 0x9E3779B1


@dataclass
class SimLaunchedStep(LaunchedStep):
    """A simulated iteration in flight: its tokens are known; the clock reaches `end` when they are read."""

    end: float = 0.0
    clock: Any = None

    def result(self):
        self.clock.wait_until(self.end)
        return super().result()


class SimExecutor:
    def __init__(self, cost: CostModel, clock: Any, vocab_size: int, avoid: tuple[int, ...] = (),
                 spec_acceptance: float = 0.0, seed: int = 0, device_async: bool = True):
        self.cost = cost
        self.clock = clock
        self.vocab = vocab_size
        self.avoid = frozenset(avoid)
        self.spec_acceptance = spec_acceptance
        self.seed = seed
        self._keys: dict[str, int] = {}
        self.iterations = 0
        self.simulated_seconds = 0.0
        # The engine waited for work before this iteration (it was idle): the iteration also lasts the
        # profile's wake after that long idle (`CostModel.wake_after`, idle since the device went free),
        # the time a real engine takes to wake up for an arrival.
        self.waking = False
        self.device_async = device_async
        self._device_free = float("-inf")  # when the simulated device finishes what was launched

    def restart(self) -> None:
        """The engine's clock restarted: nothing is in flight on the device."""
        self._device_free = float("-inf")

    def _key(self, request_id: str) -> int:
        k = self._keys.get(request_id)
        if k is None:
            if len(self._keys) > 100_000:
                self._keys.clear()
            k = self._keys[request_id] = zlib.crc32(request_id.encode()) ^ self.seed
        return k

    def token_at(self, request, position: int) -> int:
        """The stand-in token at `position` of `request`."""
        t = ((self._key(request.request_id) + position * _MIX) & 0x7FFFFFFF) % self.vocab
        stops = request.sampling.stop_token_ids
        while t in self.avoid or (stops and t in stops):
            t = (t + 1) % self.vocab
        return t

    def _accepts(self, request, position: int) -> bool:
        if not self.spec_acceptance:
            return False
        h = ((self._key(request.request_id) * 31 + position * 0x85EBCA6B) & 0xFFFFFF) / float(1 << 24)
        return h < self.spec_acceptance

    def launch(self, plan: StepPlan, blocks: Any, prev: Any = None) -> SimLaunchedStep:
        """Enqueue the iteration on the simulated device (see the module docstring); `prev`, the
        iteration in flight, needs nothing here (its tokens are known already)."""
        now = self.clock()
        dt = self.cost.plan_seconds(plan.chunks)
        if self.waking:
            dt += self.cost.wake_after(now - self._device_free)  # inf before the first iteration
            self.waking = False
        sampled = self._sample(plan)
        end = (max(now, self._device_free) if self.device_async else now) + dt
        self._device_free = end
        if not self.device_async:
            self.clock.wait_until(end)
        self.iterations += 1
        self.simulated_seconds += dt
        return SimLaunchedStep([c for c, _ in sampled], StepTimings(forward=dt), tokens=[t for _, t in sampled],
                               end=end, clock=self.clock)

    def _sample(self, plan: StepPlan) -> list[tuple[Any, list[int]]]:
        out = []
        token_at = self.token_at
        for c in plan.chunks:
            if not c.samples:
                continue
            r = c.request
            pos = r.num_tokens  # the position of the token this step produces (after those in flight)
            if c.draft:
                tokens = []
                for d in c.draft:
                    want = token_at(r, pos)
                    if d == want or self._accepts(r, pos):
                        tokens.append(d)
                        pos += 1
                    else:
                        tokens.append(want)
                        break
                else:
                    tokens.append(token_at(r, pos))
                out.append((c, tokens))
            else:
                out.append((c, [token_at(r, pos)]))
        return out


class SimSampler:
    """The engine's sampler hooks, with nothing to sample (no log-probabilities: token values are not modelled)."""

    def forget(self, request_id: str) -> None:
        return None


class SimKVPool:
    """The KV pool's size, as the simulated device would have it (no memory is allocated)."""

    def __init__(self, num_blocks: int, block_size: int, bytes_per_block: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.num_bytes = num_blocks * bytes_per_block
