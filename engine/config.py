"""Start-time engine settings, the live configuration, and its validation against start-time bounds.

The live configuration is what an operator may change while requests are in flight. Every change
goes through `validate_changes`, which either returns a whole new `LiveConfig` or raises a
`ConfigError` that names the key, the value and what is allowed, leaving the old one untouched.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

MIXING_MODES = ("stall-free", "prefill-first", "selective")
BATCHING_MODES = ("continuous", "static")
PREEMPTION_MODES = ("recompute", "drain")
DRAFTERS = ("ngram", "model")


class ConfigError(ValueError):
    """An invalid setting; `str()` says which key, which value and what is allowed."""

    def __init__(self, key: str, value: Any, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={value!r} is not allowed: {allowed}")


@dataclass(frozen=True)
class EngineConfig:
    """Settings fixed when the engine starts (sizing, device, model)."""

    model: str = "synthetic:tiny"
    device: str = "cpu"
    dtype: str = "float32"
    block_size: int = 16
    num_blocks: int | None = None  # None: derive from gpu_memory_fraction (CUDA) or a CPU default
    gpu_memory_fraction: float = 0.85
    max_num_seqs_limit: int = 256  # the largest max_num_seqs live config may ask for
    max_batched_tokens_limit: int = 8192  # the largest max_batched_tokens live config may ask for
    max_model_len: int | None = None  # None: the model's context length
    attention_backend: str = "auto"  # auto | torch | triton
    seed: int = 0
    spec_k_limit: int = 8  # the largest speculation length live config may ask for
    drafter: str = "ngram"  # speculative decoding's proposer: ngram (prompt lookup) | model (draft_model)
    draft_model: str | None = None  # drafter=model: synthetic:<name> or a local directory, the target's vocabulary
    max_waiting: int | None = None  # refuse new requests while this many wait (None: no bound)
    # CUDA only: capture the forward in CUDA graphs at start, for decode batches up to
    # max_num_seqs_limit rows and mixed iterations up to max_batched_tokens_limit tokens (so the
    # live-config bounds are exactly the captured maxima); an iteration that fits no graph runs eagerly.
    cuda_graphs: bool = True

    def validate(self) -> None:
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError("device", self.device, "one of cpu, cuda, cuda:N")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError("dtype", self.dtype, "one of float32, bfloat16, float16")
        if not isinstance(self.block_size, int) or not 1 <= self.block_size <= 1024:
            raise ConfigError("block_size", self.block_size, "an integer in [1, 1024]")
        if self.num_blocks is not None and (not isinstance(self.num_blocks, int) or self.num_blocks < 1):
            raise ConfigError("num_blocks", self.num_blocks, "an integer >= 1")
        if not 0.05 <= self.gpu_memory_fraction <= 0.98:
            raise ConfigError("gpu_memory_fraction", self.gpu_memory_fraction, "a number in [0.05, 0.98]")
        if self.drafter not in DRAFTERS:
            raise ConfigError("drafter", self.drafter, "one of " + ", ".join(DRAFTERS))
        if self.drafter == "model" and not self.draft_model:
            raise ConfigError("draft_model", self.draft_model,
                              "a model (synthetic:<name> or a local directory) when drafter=model")
        if self.draft_model and self.drafter != "model":
            raise ConfigError("drafter", self.drafter, "model when a draft model is given")
        if not isinstance(self.spec_k_limit, int) or not 0 <= self.spec_k_limit <= 64:
            raise ConfigError("spec_k_limit", self.spec_k_limit, "an integer in [0, 64]")
        if self.max_waiting is not None and (isinstance(self.max_waiting, bool) or not isinstance(self.max_waiting, int)
                                             or self.max_waiting < 1):
            raise ConfigError("max_waiting", self.max_waiting, "an integer >= 1 (or no bound)")
        if self.max_num_seqs_limit < 1:
            raise ConfigError("max_num_seqs_limit", self.max_num_seqs_limit, "an integer >= 1")
        if self.max_batched_tokens_limit < 1:
            raise ConfigError("max_batched_tokens_limit", self.max_batched_tokens_limit, "an integer >= 1")


@dataclass(frozen=True)
class ConfigBounds:
    """What live configuration may not exceed, fixed at start (pool size, captured buffers)."""

    max_num_seqs: int
    max_batched_tokens: int
    policies: tuple[str, ...]
    spec_k: int = 8

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_num_seqs": [1, self.max_num_seqs],
            "max_batched_tokens": [1, self.max_batched_tokens],
            "chunk_size": [1, "max_batched_tokens"],
            "policy": list(self.policies),
            "mixing": list(MIXING_MODES),
            "batching": list(BATCHING_MODES),
            "preemption": list(PREEMPTION_MODES),
            "selective_threshold": [1, 1 << 20],
            "static_timeout": [0.0, 3600.0],
            "spec_k": [0, self.spec_k],
        }


@dataclass(frozen=True)
class LiveConfig:
    """The settings an operator changes while the engine runs."""

    policy: str = "fcfs"
    policy_params: Mapping[str, Any] = field(default_factory=dict)
    mixing: str = "stall-free"
    batching: str = "continuous"
    max_num_seqs: int = 8
    max_batched_tokens: int = 512
    chunk_size: int = 256
    preemption: str = "recompute"
    selective_threshold: int = 512  # `selective` mixing: prompts at or above this run alone, in chunks
    static_timeout: float = 1.0  # `static` batching: a batch forms when full or after this long (s)
    spec_k: int = 0  # speculative decoding: draft tokens verified per decode step (0 = off)
    version: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["policy_params"] = dict(self.policy_params)
        return d


LIVE_KEYS = tuple(f.name for f in dataclasses.fields(LiveConfig) if f.name != "version")


def _int_in(key: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(key, value, f"an integer in [{lo}, {hi}]")
    if not lo <= value <= hi:
        raise ConfigError(key, value, f"an integer in [{lo}, {hi}]")
    return value


def _choice(key: str, value: Any, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ConfigError(key, value, "one of " + ", ".join(allowed))
    return value


def validate_changes(
    current: LiveConfig,
    changes: Mapping[str, Any],
    bounds: ConfigBounds,
    validate_policy_params=None,
) -> LiveConfig:
    """Return `current` with `changes` applied, or raise ConfigError; never a partial result.

    `validate_policy_params(policy_name, params) -> dict` checks a policy's own parameters
    (the policy registry provides it); a change naming `policy` starts that policy from its
    defaults plus any `policy_params` given, while `policy_params` alone are merged over the
    current policy's parameters.
    """
    if not isinstance(changes, Mapping) or not changes:
        raise ConfigError("changes", changes, "a non-empty object of live settings: " + ", ".join(LIVE_KEYS))
    unknown = [k for k in changes if k not in LIVE_KEYS]
    if unknown:
        raise ConfigError(str(unknown[0]), changes[unknown[0]], "a live setting: " + ", ".join(LIVE_KEYS))
    new: dict[str, Any] = {}
    for key, value in changes.items():
        if key == "policy":
            new[key] = _choice(key, value, bounds.policies)
        elif key == "mixing":
            new[key] = _choice(key, value, MIXING_MODES)
        elif key == "batching":
            new[key] = _choice(key, value, BATCHING_MODES)
        elif key == "preemption":
            new[key] = _choice(key, value, PREEMPTION_MODES)
        elif key == "max_num_seqs":
            new[key] = _int_in(key, value, 1, bounds.max_num_seqs)
        elif key == "max_batched_tokens":
            new[key] = _int_in(key, value, 1, bounds.max_batched_tokens)
        elif key == "chunk_size":
            new[key] = _int_in(key, value, 1, bounds.max_batched_tokens)
        elif key == "spec_k":
            new[key] = _int_in(key, value, 0, bounds.spec_k)
        elif key == "selective_threshold":
            new[key] = _int_in(key, value, 1, 1 << 20)
        elif key == "static_timeout":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 3600.0:
                raise ConfigError(key, value, "a number of seconds in [0, 3600]")
            new[key] = float(value)
        elif key == "policy_params":
            if not isinstance(value, Mapping):
                raise ConfigError(key, value, "an object of the policy's parameters")
            new[key] = dict(value)
    merged = dataclasses.replace(current, **new)
    if merged.chunk_size > merged.max_batched_tokens:
        raise ConfigError(
            "chunk_size", merged.chunk_size, f"an integer in [1, max_batched_tokens={merged.max_batched_tokens}]"
        )
    if validate_policy_params is not None and ("policy" in changes or "policy_params" in changes):
        if "policy" in changes:  # a (re)chosen policy starts from its defaults plus what is given
            params = new.get("policy_params", {})
        else:  # parameters alone are merged over the current ones: tuning one leaves the others be
            params = {**current.policy_params, **new["policy_params"]}
        merged = dataclasses.replace(merged, policy_params=validate_policy_params(merged.policy, params))
    return dataclasses.replace(merged, version=current.version + 1)
