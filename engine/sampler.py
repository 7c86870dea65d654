"""Batched sampling on the model's device: greedy, temperature, top-k, top-p, per-request seeds.

Sampling uses the exponential-race form of the Gumbel trick: token = argmax(p / E), E ~ Exp(1).
A seeded request draws its noise from its own generator, so its tokens do not depend on which
other requests share the batch. The only host sync is reading the sampled ids (`sample_ids` leaves
them on the device, for overlapped iterations, unless a row asks for logprobs): per-row parameters
reach the device through pinned, non-blocking copies, and an all-greedy batch is one argmax on the
logits as they come (bf16 -> float32 is exact, so argmax is the same without the upcast).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from batchdeck.engine.request import SamplingParams


def host_to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small per-row tensor on `device` without a blocking copy (pinned + non_blocking on CUDA)."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


TopLogprobs = tuple[tuple[int, float], ...]  # (token id, log-probability), most likely first


class Sampled(NamedTuple):
    ids: torch.Tensor  # int64 [S], left on the device
    logprobs: dict[str, float]  # request id -> the sampled token's log-probability (rows that ask)
    top_logprobs: dict[str, TopLogprobs]  # request id -> its most likely tokens (rows with top_logprobs)


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0):
        self.device = device
        self._generator = torch.Generator(device=device)
        self._generator.manual_seed(seed)
        self._request_generators: dict[str, torch.Generator] = {}

    def forget(self, request_id: str) -> None:
        self._request_generators.pop(request_id, None)

    def generator_for(self, request_id: str, seed: int | None) -> torch.Generator:
        """The request's own generator when it has a seed, else the engine's."""
        return self._generator if seed is None else self._generator_for(request_id, seed)

    def _generator_for(self, request_id: str, seed: int) -> torch.Generator:
        gen = self._request_generators.get(request_id)
        if gen is None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(seed)
            self._request_generators[request_id] = gen
        return gen

    def sample_ids(self, logits: torch.Tensor, request_ids: list[str], params: list[SamplingParams],
                   greedy_ids: torch.Tensor | None = None) -> Sampled:
        """The sampled ids and, for the rows whose params ask, log-probabilities under the model's
        distribution (before temperature): the sampled token's, and the `top_logprobs` most likely
        tokens'. No host sync unless a row asks for log-probabilities. `greedy_ids`: the argmax of
        every row of `logits`, when already computed (a decode CUDA graph's)."""
        if not params:
            return Sampled(torch.zeros(0, dtype=torch.int64, device=logits.device), {}, {})
        ids = self._sample(logits, request_ids, params, greedy_ids)
        if not any(p.logprobs for p in params):
            return Sampled(ids, {}, {})
        return Sampled(ids, *self._logprobs(logits, ids, request_ids, params))

    @staticmethod
    def _logprobs(logits: torch.Tensor, ids: torch.Tensor, request_ids: list[str],
                  params: list[SamplingParams]) -> tuple[dict[str, float], dict[str, TopLogprobs]]:
        rows = [i for i, p in enumerate(params) if p.logprobs]
        log_probs = torch.log_softmax(logits[rows].float(), dim=-1)
        values = log_probs.gather(1, ids[rows].unsqueeze(1)).squeeze(1).tolist()
        tops: dict[str, TopLogprobs] = {}
        k = max(params[i].top_logprobs for i in rows)
        if k:
            best, best_ids = log_probs.topk(min(k, log_probs.shape[-1]), dim=-1)
            for i, lps, tids in zip(rows, best.tolist(), best_ids.tolist()):
                if params[i].top_logprobs:
                    n = params[i].top_logprobs
                    tops[request_ids[i]] = tuple(zip(tids[:n], lps[:n]))
        return {request_ids[i]: v for i, v in zip(rows, values)}, tops

    def _sample(self, logits: torch.Tensor, request_ids: list[str], params: list[SamplingParams],
                greedy_ids: torch.Tensor | None = None) -> torch.Tensor:
        if greedy_ids is None:
            greedy_ids = logits.argmax(dim=-1)  # bf16 -> float32 is exact: the same argmax either way
        if all(p.greedy for p in params):
            return greedy_ids
        logits = logits.float()
        probs = self._filtered_probs(logits, params)
        noise = torch.empty_like(probs).exponential_(generator=self._generator)
        for row, (rid, p) in enumerate(zip(request_ids, params)):
            if p.seed is not None and not p.greedy:
                noise[row].exponential_(generator=self._generator_for(rid, p.seed))
        sampled = (probs / noise).argmax(dim=-1)
        is_greedy = host_to_device([p.greedy for p in params], torch.bool, logits.device)
        return torch.where(is_greedy, greedy_ids, sampled)

    @staticmethod
    def _filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        dev = logits.device
        vocab = logits.shape[-1]
        temps = host_to_device([1.0 if p.greedy else p.temperature for p in params], torch.float32, dev)
        logits = logits / temps.unsqueeze(1)
        top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
        top_p = [p.top_p for p in params]
        if min(top_k) < vocab or min(top_p) < 1.0:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            ranks = torch.arange(vocab, device=dev).unsqueeze(0)
            drop = ranks >= host_to_device(top_k, torch.int64, dev).unsqueeze(1)
            sorted_probs = sorted_logits.softmax(dim=-1)
            before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass strictly ahead of each token
            drop |= before >= host_to_device(top_p, torch.float32, dev).unsqueeze(1)
            drop[:, 0] = False
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
        return logits.softmax(dim=-1)
