"""The one table of engine settings: every setting's name, type, default (per device), bounds, whether
it is live, its command-line flag(s) and what it means.

Everything else is derived from `SETTINGS`: the `EngineConfig` / `LiveConfig` defaults
(engine/config.py), start-time and live validation with its error text (`check`), the bounds
published in the retained `config` message (`ConfigBounds.to_dict`), the argparse flags of every
command that starts an engine (engine/service/flags.py), the console's palette and config panel,
replay's `--set` and the preset schema's `engine:` / `config:` keys. Adding a setting means one entry
here plus the mechanism that uses it.

A numeric bound is a number, or the name of another setting that bounds it:
- a start-time limit (`max_num_seqs <= max_num_seqs_limit`, `spec_k <= spec_k_limit`): the engine's
  value is published in its bounds; `pool_capped` settings are further capped by the KV pool
  (each running request holds at least one block, so `max_num_seqs <= num_blocks`);
- a live setting (`chunk_size <= max_batched_tokens`): the live value in force, after the change.
A limit left unset is raised to fit every value asked for (flags, preset, timeline), up to its own
ceiling; see `engine.config.resolve_configs`.

Choices come from their registries: the mode tuples below (the mechanisms that implement them
branch on these names) and, for `policy`, the policies registry (passed in through the bounds;
`policy_names()` for help text, imported when asked so the core does not import it at load).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

# -- registries of the engine's own modes (the scheduler, model runner and drafter branch on them)
MIXING_MODES = ("stall-free", "prefill-first", "selective")
BATCHING_MODES = ("continuous", "static")
PREEMPTION_MODES = ("recompute", "drain")
DRAFTERS = ("ngram", "model")
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_BACKENDS = ("auto", "torch", "triton")
DEVICES = ("cpu", "cuda")  # and cuda:N

CPU_KV_POOL_BYTES = 512 * 1024 * 1024  # the KV pool's size on CPU when num_blocks is not given


class ConfigError(ValueError):
    """An invalid setting; `str()` says which key, which value and what is allowed."""

    def __init__(self, key: str, value: Any, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        shown = repr(value)
        if len(shown) > 60:  # a 400-digit number is described, not echoed
            shown = f"{shown[:12]}... ({len(shown)} characters)"
        super().__init__(f"{key}={shown} is not allowed: {allowed}")


def policy_names() -> tuple[str, ...]:
    """The scheduling policies' registry (policies/__init__.py); imported on call, not at load."""
    from batchdeck.policies import policy_names as registered

    return registered()


_SAME = object()


@dataclass(frozen=True)
class Setting:
    """One engine setting. `kind`: int | float | str | bool | choice | object | device."""

    name: str
    kind: str
    meaning: str
    default: Any = None  # on cpu (and every device without its own)
    cuda_default: Any = _SAME
    live: bool = False
    low: float | None = None
    high: float | str | None = None  # a number, or the name of the setting that bounds it
    pool_capped: bool = False  # also at most the KV pool's blocks (each running request holds one)
    optional: bool = False  # None is allowed; `none_means` says what it then does
    none_means: str = ""
    choices: tuple[str, ...] | Callable[[], tuple[str, ...]] | None = None
    flags: tuple[str, ...] = ()  # the first is ours; the others are aliases (vLLM's names)
    unit: str = ""

    @property
    def flag(self) -> str:
        return self.flags[0]

    def default_for(self, device: str) -> Any:
        if str(device).startswith("cuda") and self.cuda_default is not _SAME:
            return self.cuda_default
        return self.default

    @property
    def per_device(self) -> bool:
        return self.cuda_default is not _SAME and self.cuda_default != self.default

    def choice_list(self, bounds_choices: Iterable[str] | None = None) -> tuple[str, ...]:
        if bounds_choices is not None:
            return tuple(bounds_choices)
        return tuple(self.choices() if callable(self.choices) else (self.choices or ()))

    @property
    def bound_ref(self) -> str | None:
        """The setting named as this one's upper bound, if any."""
        return self.high if isinstance(self.high, str) else None

    def allowed(self, high: Any = None, note: str = "", choices: Iterable[str] | None = None) -> str:
        """What is allowed, as an error message says it (`high`: the upper bound in force)."""
        high = self.high if high is None else high
        if self.kind in ("choice",):
            text = "one of " + ", ".join(self.choice_list(choices))
        elif self.kind == "device":
            text = "one of cpu, cuda, cuda:N"
        elif self.kind == "bool":
            text = "true or false"
        elif self.kind == "object":
            text = "an object of the policy's parameters"
        elif self.kind == "str":
            text = "a non-empty string"
        else:
            noun = "an integer" if self.kind == "int" else ("a number of " + self.unit if self.unit else "a number")
            fmt = (lambda v: str(v)) if self.kind == "int" else (lambda v: f"{v:g}")
            if self.low is not None and high is not None and not isinstance(high, str):
                text = f"{noun} in [{fmt(self.low)}, {fmt(high)}]"
            elif self.low is not None:
                text = f"{noun} >= {fmt(self.low)}"
            else:
                text = noun
        if note:
            text += f" ({note})"
        if self.optional:
            text += f" (or none: {self.none_means})"
        return text

    def check(self, value: Any, high: Any = None, note: str = "", choices: Iterable[str] | None = None) -> Any:
        """`value` checked and normalized (a float setting's int becomes a float), or ConfigError."""
        if value is None and self.optional:
            return None
        high = self.high if high is None else high
        bad = ConfigError(self.name, value, self.allowed(high, note, choices))
        kind = self.kind
        if kind == "choice":
            if not isinstance(value, str) or value not in self.choice_list(choices):
                raise bad
            return value
        if kind == "device":
            if not isinstance(value, str) or not (value in DEVICES or (value.startswith("cuda:")
                                                                        and value[5:].isdigit())):
                raise bad
            return value
        if kind == "bool":
            if not isinstance(value, bool):
                raise bad
            return value
        if kind == "object":
            if not isinstance(value, Mapping):
                raise bad
            return dict(value)
        if kind == "str":
            if not isinstance(value, str) or not value.strip():
                raise bad
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        if kind == "int" and not isinstance(value, int):
            raise bad
        if kind == "float":
            try:
                value = float(value)
            except OverflowError:  # an integer beyond the float range (JSON carries 10**400 exactly)
                raise bad from None
            if not math.isfinite(value):
                raise bad
        if self.low is not None and value < self.low:
            raise bad
        if high is not None and not isinstance(high, str) and value > high:
            raise bad
        return value

    def parse_text(self, text: str) -> Any:
        """The typed value of what an operator typed (palette, config panel, `--set`); ConfigError if it
        is not even of the right type (the bounds are checked by `check`)."""
        import json

        text = text.strip()
        if self.optional and text.lower() in ("none", "null", ""):
            return None
        try:
            if self.kind == "int":
                return int(text)
            if self.kind == "float":
                return float(text[:-1] if self.unit == "seconds" and text.endswith("s") else text)
            if self.kind == "bool":
                low = text.lower()
                if low in ("true", "yes", "on", "1"):
                    return True
                if low in ("false", "no", "off", "0"):
                    return False
                raise ValueError(text)
            if self.kind == "object":
                value = json.loads(text)
                if not isinstance(value, dict):
                    raise ValueError(text)
                return value
        except ValueError:
            noun = {"int": "an integer", "float": "a number" + (" of " + self.unit if self.unit else ""),
                    "bool": "true or false", "object": "a JSON object"}[self.kind]
            raise ConfigError(self.name, text, noun) from None
        return text

    def help_text(self) -> str:
        """`--help` for the flag: the meaning, live or start-time, the default on each device."""
        parts = [self.meaning]
        if self.kind in ("int", "float"):
            hi = self.high if not isinstance(self.high, str) else f"--{self.high.replace('_', '-')}"
            if self.pool_capped:
                hi = f"{hi} and the KV pool's blocks"
            if self.low is not None and hi is not None:
                parts.append(f"in [{self.low:g}, {hi}]")
            elif self.low is not None:
                parts.append(f">= {self.low:g}")
        parts.append("live setting" if self.live else "start-time")
        parts.append(_default_text(self))
        if len(self.flags) > 1:
            parts.append("vLLM's " + ", ".join(self.flags[1:]) + " is accepted too")
        return "; ".join(parts).replace("%", "%%")


def _default_text(s: Setting) -> str:
    def show(v: Any) -> str:
        if v is None:
            return s.none_means or "none"
        if isinstance(v, bool):
            return "on" if v else "off"
        return str(v)

    if s.per_device:
        return f"default: {show(s.default)} on cpu, {show(s.cuda_default)} on cuda"
    return f"default: {show(s.default)}"


SETTINGS: tuple[Setting, ...] = (
    # -- start-time: the model, the device, the pool and the limits the live settings stay within
    Setting("model", "str", "the model: synthetic:<name>, a local Hugging Face model directory, or a hub id "
            "(ORG/NAME) already in the local Hugging Face cache ($HF_HUB_CACHE or $HF_HOME/hub; nothing is "
            "downloaded)",
            default="synthetic:tiny", flags=("--model",)),
    Setting("device", "device", "the torch device: cpu, cuda or cuda:N", default=None, optional=True,
            none_means="cuda when present, else cpu", flags=("--device",)),
    Setting("dtype", "choice", "the weights' and KV cache's dtype", default="float32", cuda_default="bfloat16",
            choices=DTYPES, flags=("--dtype",)),
    Setting("block_size", "int", "tokens per KV block", default=16, low=1, high=1024, flags=("--block-size",)),
    Setting("num_blocks", "int", "KV blocks in the pool", default=None, low=1, optional=True,
            none_means="sized from memory: --gpu-memory-fraction of free GPU memory on cuda, 512 MiB on cpu",
            flags=("--num-blocks",)),
    Setting("gpu_memory_fraction", "float", "the KV pool's share of free GPU memory (when --num-blocks is not given)",
            default=0.85, low=0.05, high=0.98, flags=("--gpu-memory-fraction",)),
    Setting("max_num_seqs_limit", "int",
            "the largest max_num_seqs live config may ask for (CUDA graphs are captured up to it); "
            "unset, it is raised to fit what the flags and preset ask for",
            default=256, low=1, high=4096, flags=("--max-num-seqs-limit",)),
    Setting("max_batched_tokens_limit", "int",
            "the largest max_batched_tokens live config may ask for (CUDA graphs are captured up to it); "
            "unset, it is raised to fit what the flags and preset ask for",
            default=8192, low=1, high=65536, flags=("--max-batched-tokens-limit",)),
    Setting("max_model_len", "int", "the longest sequence (prompt + output) served", default=None, low=2,
            optional=True, none_means="the model's context length", flags=("--max-model-len",)),
    Setting("attention_backend", "choice", "the paged-attention kernels (auto: triton on CUDA when importable)",
            default="auto", choices=ATTENTION_BACKENDS, flags=("--attention-backend",)),
    Setting("seed", "int", "seed for synthetic weights and unseeded sampling", default=0, low=0,
            flags=("--seed",)),
    Setting("spec_k_limit", "int",
            "the largest spec_k live config may ask for (0 leaves speculation off and captures no verify graphs); "
            "unset, it is raised to fit --spec-k",
            default=8, low=0, high=64, flags=("--spec-k-limit",)),
    Setting("drafter", "choice", "speculative decoding's proposer: ngram (prompt lookup) or model (--draft-model)",
            default="ngram", choices=DRAFTERS, flags=("--drafter",)),
    Setting("draft_model", "str", "drafter=model: synthetic:<name> or a local directory sharing the target's "
            "vocabulary (given alone, it implies --drafter model)", default=None, optional=True,
            none_means="no draft model", flags=("--draft-model",)),
    Setting("max_waiting", "int", "refuse new requests while this many wait", default=None, low=1, optional=True,
            none_means="no bound", flags=("--max-waiting",)),
    Setting("cuda_graphs", "bool", "capture the forward in CUDA graphs at start (CUDA only; "
            "--no-cuda-graphs runs eagerly, like vLLM's --enforce-eager)", default=True, flags=("--cuda-graphs",)),
    Setting("async_scheduling", "bool", "overlapped iterations: schedule and launch iteration N+1 while N runs on "
            "the device, then book N (its next inputs are read on the device; speculating and static-batch "
            "iterations run one at a time). On cpu, where every op waits for its result, it only delays outputs "
            "by an iteration", default=False, cuda_default=True, flags=("--async-scheduling",)),
    Setting("sim", "str", "simulate instead of running the model: a calibration profile (a shipped name such as "
            "h200-qwen3-0.6b, or a JSON file from `batchdeck calibrate`); the model, dtype and KV pool are the "
            "profile's and the defaults those of cuda; no tensors are computed", default=None, optional=True,
            none_means="run the model", flags=("--sim",)),
    # -- live: what an operator changes while requests are in flight
    Setting("policy", "choice", "scheduling policy: the order waiting requests are admitted in and who is preempted",
            default="fcfs", live=True, choices=policy_names, flags=("--policy", "--scheduling-policy")),
    Setting("policy_params", "object", "the policy's own parameters as a JSON object, e.g. '{\"aging_s\": 10}'",
            default={}, live=True, flags=("--policy-params",)),
    Setting("mixing", "choice", "how prefill chunks and decodes share an iteration", default="stall-free", live=True,
            choices=MIXING_MODES, flags=("--mixing",)),
    Setting("batching", "choice", "continuous (iteration-level) or static batching", default="continuous",
            live=True, choices=BATCHING_MODES, flags=("--batching",)),
    Setting("max_num_seqs", "int", "the running cap: requests in one iteration", default=8, cuda_default=256,
            live=True, low=1, high="max_num_seqs_limit", pool_capped=True, flags=("--max-num-seqs",)),
    Setting("max_batched_tokens", "int", "the token budget of one iteration", default=512, cuda_default=8192,
            live=True, low=1, high="max_batched_tokens_limit",
            flags=("--max-batched-tokens", "--max-num-batched-tokens")),
    Setting("chunk_size", "int", "the largest prefill chunk of one request in one iteration (chunked prefill "
            "is always on; chunk_size = max_batched_tokens prefills whole prompts up to the budget)",
            default=256, cuda_default=2048, live=True, low=1, high="max_batched_tokens", flags=("--chunk-size",)),
    Setting("preemption", "choice", "what lowering max_num_seqs below the running count does: recompute (preempt the "
            "excess, which restart later) or drain (let them finish, admitting none meanwhile)", default="recompute", live=True,
            choices=PREEMPTION_MODES, flags=("--preemption",)),
    Setting("selective_threshold", "int", "selective mixing: prompts of at least this many tokens run alone, "
            "in chunks", default=512, live=True, low=1, high=1 << 20, flags=("--selective-threshold",)),
    Setting("static_timeout", "float", "static batching: a batch forms when full or after this long",
            default=1.0, live=True, low=0.0, high=3600.0, unit="seconds", flags=("--static-timeout",)),
    Setting("spec_k", "int", "speculative decoding: draft tokens verified per decode step (0 = off)", default=0,
            live=True, low=0, high="spec_k_limit", flags=("--spec-k",)),
    Setting("prefix_caching", "bool", "reuse the KV of cached full prompt blocks (automatic prefix caching; "
            "turning it off drops the cache)", default=True, live=True, flags=("--prefix-caching", "--enable-prefix-caching")),
)

BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}
LIVE_SETTINGS: tuple[Setting, ...] = tuple(s for s in SETTINGS if s.live)
START_SETTINGS: tuple[Setting, ...] = tuple(s for s in SETTINGS if not s.live)
LIVE_KEYS: tuple[str, ...] = tuple(s.name for s in LIVE_SETTINGS)
START_KEYS: tuple[str, ...] = tuple(s.name for s in START_SETTINGS)
# live settings bounded by a start-time limit: {"max_num_seqs": "max_num_seqs_limit", ...}
LIMITS: dict[str, str] = {s.name: s.high for s in LIVE_SETTINGS
                          if isinstance(s.high, str) and not BY_NAME[s.high].live}
PANEL_KINDS = ("int", "float", "choice", "bool")  # shown as a field in the console's config panel


def setting(name: str) -> Setting:
    try:
        return BY_NAME[name]
    except KeyError:
        raise ConfigError(name, "?", "a setting: " + ", ".join(BY_NAME)) from None


def defaults_for(device: str) -> dict[str, Any]:
    """Every setting's default on `device` ("cpu", "cuda", "cuda:N"), by name."""
    return {s.name: s.default_for(device) for s in SETTINGS}


def flag_of(name: str) -> str | None:
    s = BY_NAME.get(name)
    return s.flag if s is not None and s.flags else None


def limit_note(name: str, limited_by: str | None, value: Any) -> str:
    """Why a live setting's upper bound is what it is (the suffix of its refusal)."""
    s = BY_NAME[name]
    if limited_by == "num_blocks":
        return f"the KV pool has {value} blocks and each running request holds at least one"
    ref = s.bound_ref
    if ref is None:
        return ""
    if BY_NAME[ref].live:
        return f"the live {ref}"
    return f"{ref}, fixed at start"
