"""Start-time engine settings, the live configuration, its bounds and its validation — all from the
settings table (engine/settings.py).

The live configuration is what an operator may change while requests are in flight. Every change
goes through `validate_changes`, which either returns a whole new `LiveConfig` or raises a
`ConfigError` that names the key, the value and what is allowed (quoting the bound in force and
where it comes from), leaving the old one untouched. `resolve_configs` turns what the operator
gave (flags), a preset and the per-device defaults into the engine's configs, for every command.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from batchdeck.engine.settings import (ATTENTION_BACKENDS, BATCHING_MODES, BY_NAME, DRAFTERS, DTYPES, LIMITS,
                                       LIVE_KEYS, LIVE_SETTINGS, MIXING_MODES, PREEMPTION_MODES, START_KEYS,
                                       START_SETTINGS, ConfigError, defaults_for, flag_of, limit_note)

__all__ = ["ATTENTION_BACKENDS", "BATCHING_MODES", "DRAFTERS", "DTYPES", "LIVE_KEYS", "MIXING_MODES",
           "PREEMPTION_MODES", "ConfigBounds", "ConfigError", "EngineConfig", "LiveConfig", "resolve_configs",
           "validate_changes"]

_CPU = defaults_for("cpu")


def _d(name: str) -> Any:
    return _CPU[name]


@dataclass(frozen=True)
class EngineConfig:
    """Settings fixed when the engine starts (sizing, device, model). Defaults: the table's, on cpu."""

    model: str = _d("model")
    device: str = "cpu"  # resolve_configs picks cuda when present
    dtype: str = _d("dtype")
    block_size: int = _d("block_size")
    num_blocks: int | None = _d("num_blocks")  # None: derive from gpu_memory_fraction (CUDA) or a CPU default
    gpu_memory_fraction: float = _d("gpu_memory_fraction")
    max_num_seqs_limit: int = _d("max_num_seqs_limit")  # the largest max_num_seqs live config may ask for
    max_batched_tokens_limit: int = _d("max_batched_tokens_limit")  # the largest max_batched_tokens likewise
    max_model_len: int | None = _d("max_model_len")  # None: the model's context length
    attention_backend: str = _d("attention_backend")  # auto | torch | triton
    seed: int = _d("seed")
    spec_k_limit: int = _d("spec_k_limit")  # the largest speculation length live config may ask for
    drafter: str = _d("drafter")  # ngram (prompt lookup) | model (draft_model)
    draft_model: str | None = _d("draft_model")  # drafter=model: synthetic:<name> or a local directory
    max_waiting: int | None = _d("max_waiting")  # refuse new requests while this many wait (None: no bound)
    # CUDA only: capture the forward in CUDA graphs at start, for decode batches up to
    # max_num_seqs_limit rows and mixed iterations up to max_batched_tokens_limit tokens (so the
    # live-config bounds are exactly the captured maxima); an iteration that fits no graph runs eagerly.
    cuda_graphs: bool = _d("cuda_graphs")
    async_scheduling: bool = _d("async_scheduling")  # overlapped iterations (LLMEngine.step); on by default on cuda
    sim: str | None = _d("sim")  # a simulation profile (shipped name or path): engine/sim/engine.py runs it

    def validate(self) -> None:
        """Every field against the table, then the rules between fields."""
        for s in START_SETTINGS:
            s.check(getattr(self, s.name))
        if self.drafter == "model" and not self.draft_model:
            raise ConfigError("draft_model", self.draft_model,
                              "a model (synthetic:<name> or a local directory) when drafter=model")
        if self.draft_model and self.drafter != "model":
            raise ConfigError("drafter", self.drafter, "model when a draft model is given")


@dataclass(frozen=True)
class ConfigBounds:
    """What live configuration may not exceed, fixed at start (pool size, captured buffers).

    One upper bound per live setting bounded by a start-time limit (`LIMITS`), named after the
    live setting; `limited_by` says which of them the KV pool caps below the limit
    ({"max_num_seqs": "num_blocks"}); `policies` and `policy_params` come from the policies registry.
    """

    max_num_seqs: int = _d("max_num_seqs_limit")
    max_batched_tokens: int = _d("max_batched_tokens_limit")
    policies: tuple[str, ...] = ()
    spec_k: int = _d("spec_k_limit")
    limited_by: Mapping[str, str] = field(default_factory=dict)
    policy_params: Mapping[str, Any] = field(default_factory=dict)  # policy -> {param: {default, low, high, ...}}

    @classmethod
    def for_engine(cls, config: "EngineConfig", num_blocks: int | None, policies: Iterable[str] = (),
                   policy_params: Mapping[str, Any] | None = None) -> "ConfigBounds":
        """The bounds of an engine with `config` and a pool of `num_blocks` (None: not known yet)."""
        uppers: dict[str, int] = {}
        limited_by: dict[str, str] = {}
        for name, limit in LIMITS.items():
            uppers[name] = getattr(config, limit)
            if BY_NAME[name].pool_capped and num_blocks is not None and num_blocks < uppers[name]:
                uppers[name] = num_blocks
                limited_by[name] = "num_blocks"
        return cls(policies=tuple(policies), limited_by=limited_by, policy_params=dict(policy_params or {}),
                   **uppers)

    def upper(self, name: str, live: Mapping[str, Any] | None = None) -> Any:
        """The upper bound in force for live setting `name` (another live setting's value from `live`)."""
        s = BY_NAME[name]
        if name in LIMITS:
            return getattr(self, name)
        ref = s.bound_ref
        if ref is not None:
            return (live or {}).get(ref, ref)
        return s.high

    def choices(self, name: str) -> tuple[str, ...] | None:
        s = BY_NAME[name]
        if s.kind != "choice":
            return None
        return s.choice_list(self.policies if name == "policy" and self.policies else None)

    def check(self, name: str, value: Any, live: Mapping[str, Any] | None = None) -> Any:
        """`value` for live setting `name`, checked against the bound in force; ConfigError names it."""
        s = BY_NAME[name]
        high = self.upper(name, live)
        note = limit_note(name, self.limited_by.get(name), high) if s.bound_ref else ""
        return s.check(value, high=high, note=note, choices=self.choices(name))

    def to_dict(self) -> dict[str, Any]:
        """The JSON form published in the retained `config` message (read back by `from_dict`)."""
        out: dict[str, Any] = {}
        for s in LIVE_SETTINGS:
            if s.kind == "choice":
                out[s.name] = list(self.choices(s.name))
            elif s.kind == "object":
                out[s.name] = {k: dict(v) for k, v in self.policy_params.items()}
            else:
                out[s.name] = [s.low, self.upper(s.name)]
        out["limited_by"] = dict(self.limited_by)
        return out

    @classmethod
    def from_dict(cls, bounds: Mapping[str, Any]) -> "ConfigBounds":
        """The bounds from their JSON form (`to_dict`); what is missing takes the table's cpu default."""
        kw: dict[str, Any] = {}
        for name in LIMITS:
            value = bounds.get(name)
            if isinstance(value, (list, tuple)) and len(value) == 2 and isinstance(value[1], int) \
                    and not isinstance(value[1], bool):
                kw[name] = value[1]
        policies = bounds.get("policy")
        limited_by = bounds.get("limited_by")
        params = bounds.get("policy_params")
        return cls(policies=tuple(policies) if isinstance(policies, (list, tuple)) and policies else (),
                   limited_by=dict(limited_by) if isinstance(limited_by, Mapping) else {},
                   policy_params=dict(params) if isinstance(params, Mapping) else {}, **kw)


@dataclass(frozen=True)
class LiveConfig:
    """The settings an operator changes while the engine runs. Defaults: the table's, on cpu."""

    policy: str = _d("policy")
    policy_params: Mapping[str, Any] = field(default_factory=dict)
    mixing: str = _d("mixing")
    batching: str = _d("batching")
    max_num_seqs: int = _d("max_num_seqs")
    max_batched_tokens: int = _d("max_batched_tokens")
    chunk_size: int = _d("chunk_size")
    preemption: str = _d("preemption")
    selective_threshold: int = _d("selective_threshold")  # `selective` mixing: prompts at or above this run alone
    static_timeout: float = _d("static_timeout")  # `static` batching: a batch forms when full or after this long (s)
    spec_k: int = _d("spec_k")  # speculative decoding: draft tokens verified per decode step (0 = off)
    prefix_caching: bool = _d("prefix_caching")  # reuse cached prompt blocks (off drops the cache)
    version: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["policy_params"] = dict(self.policy_params)
        return d


assert tuple(f.name for f in dataclasses.fields(LiveConfig) if f.name != "version") == LIVE_KEYS
assert tuple(f.name for f in dataclasses.fields(EngineConfig)) == START_KEYS


def validate_changes(
    current: LiveConfig,
    changes: Mapping[str, Any],
    bounds: ConfigBounds,
    validate_policy_params=None,
) -> LiveConfig:
    """Return `current` with `changes` applied, or raise ConfigError; never a partial result.

    Each changed setting is checked in the table's order against the bound in force: a bound by
    another live setting is that setting's value after the change (`chunk_size` after a
    `max_batched_tokens` in the same change); lowering a setting below one it bounds is refused
    on the setting that was changed. `validate_policy_params(policy_name, params) -> dict` checks a
    policy's own parameters (the policy registry provides it); a change naming `policy` starts that
    policy from its defaults plus any `policy_params` given, while `policy_params` alone are merged
    over the current policy's parameters.
    """
    if not isinstance(changes, Mapping) or not changes:
        raise ConfigError("changes", changes, "a non-empty object of live settings: " + ", ".join(LIVE_KEYS))
    unknown = [k for k in changes if k not in LIVE_KEYS]
    if unknown:
        raise ConfigError(str(unknown[0]), changes[unknown[0]], "a live setting: " + ", ".join(LIVE_KEYS))
    merged = current.to_dict()
    new: dict[str, Any] = {}
    for s in LIVE_SETTINGS:
        if s.name in changes:
            new[s.name] = merged[s.name] = bounds.check(s.name, changes[s.name], merged)
    for s in LIVE_SETTINGS:  # a setting lowered below one it bounds (max_batched_tokens under chunk_size)
        ref = s.bound_ref
        if ref in new and s.name not in new and ref in LIVE_KEYS and merged[s.name] > merged[ref]:
            ceiling = bounds.upper(ref, merged)
            raise ConfigError(ref, merged[ref], f"an integer in [{merged[s.name]}, {ceiling}] (at least the live "
                                                f"{s.name}; lower {s.name} in the same change)")
    result = dataclasses.replace(current, **new)
    if validate_policy_params is not None and ("policy" in changes or "policy_params" in changes):
        if "policy" in changes:  # a (re)chosen policy starts from its defaults plus what is given
            params = new.get("policy_params", {})
        else:  # parameters alone are merged over the current ones: tuning one leaves the others be
            params = {**current.policy_params, **new["policy_params"]}
        result = dataclasses.replace(result, policy_params=validate_policy_params(result.policy, params))
    return dataclasses.replace(result, version=current.version + 1)


# ---------------------------------------------------------------------------------------------
# Flags + preset + per-device defaults -> configs


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _origin(name: str, value: Any, given: Mapping[str, Any], preset: Mapping[str, Any]) -> str:
    if name in given:
        return f"{flag_of(name)} {value}"
    if name in preset:
        return f"the preset's {name}: {value}"
    return f"{name} {value} (its default)"


def _simulated(sim: str, given: dict[str, Any], preset: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A simulated engine's settings: the profile's model, dtype, block size and KV pool (a preset's
    sizing for its own device does not apply; what the operator gives still does), on no device; unless
    given, async scheduling as the profile's engine ran it when calibrated (off for a profile that does
    not say: those were measured before iterations overlapped), since its iteration costs are that
    engine's."""
    from batchdeck.engine.sim.profile import load_profile

    p = load_profile(sim)
    preset = {k: v for k, v in preset.items() if k not in ("model", "device", "dtype", "block_size", "num_blocks")}
    for key, value in (("model", p.model), ("device", "cpu"), ("dtype", p.dtype)):
        if key in given and given[key] != value:
            raise ConfigError(key, given[key], f"{value}: the profile {sim} fixes it")
    block = given.get("block_size", p.block_size)
    pool = given.get("num_blocks", max(1, p.num_blocks * p.block_size // block) if isinstance(block, int) and block > 0
                     else p.num_blocks)
    if "async_scheduling" not in preset:
        preset["async_scheduling"] = bool(p.fit.get("async_scheduling", False))
    return {**given, "model": p.model, "device": "cpu", "dtype": p.dtype, "block_size": block, "num_blocks": pool,
            "sim": sim}, preset


def resolve_configs(given: Mapping[str, Any] | None = None, preset: Mapping[str, Any] | None = None,
                    timeline: Iterable[Mapping[str, Any]] = (), *,
                    cuda_available: bool | None = None) -> tuple[EngineConfig, LiveConfig]:
    """(EngineConfig, LiveConfig) from what the operator gave, a preset and the defaults, for every command.

    given: settings from the command line (None values are not given); preset: a preset's settings
    flattened (model, seed, its `engine:` and `config:` keys); timeline: the live changes the preset
    will make (its `set:` entries). Precedence: given > preset > the table's default for the device
    (device: given, else cuda when present). Derived: chunk_size follows a max_batched_tokens below
    its default; --draft-model alone implies drafter=model; an unset limit (max_num_seqs_limit,
    max_batched_tokens_limit, spec_k_limit) is raised to fit every value asked for. Raises
    ConfigError naming what was wrong and where it came from (a flag, the preset or a default).
    """
    given = {k: v for k, v in (given or {}).items() if v is not None}
    preset = {k: v for k, v in (preset or {}).items() if v is not None}
    unknown = sorted(set(given) - set(BY_NAME))
    if unknown:
        raise ValueError(f"unknown override(s) {', '.join(unknown)}: allowed engine settings "
                         f"{', '.join(START_KEYS)} and live settings {', '.join(LIVE_KEYS)}")
    sim = given.get("sim") or preset.get("sim")
    if sim:
        given, preset = _simulated(sim, given, preset)
    chosen = {**preset, **given}
    if chosen.get("draft_model") and "drafter" not in chosen:
        chosen["drafter"] = "model"
    if "device" in chosen:
        BY_NAME["device"].check(chosen["device"])
        if str(chosen["device"]).startswith("cuda"):
            available = _cuda_available() if cuda_available is None else cuda_available
            if not available:
                raise ConfigError("device", chosen["device"], "cpu: torch finds no CUDA device on this machine")
        device = chosen["device"]
    else:
        device = "cuda" if (_cuda_available() if cuda_available is None else cuda_available) else "cpu"
    defaults = defaults_for("cuda" if sim else device)  # a simulated engine stands for a GPU
    values = {name: chosen.get(name, default) for name, default in defaults.items()}
    values["device"] = device
    if "max_batched_tokens" in chosen and "chunk_size" not in chosen \
            and isinstance(values["max_batched_tokens"], int):
        values["chunk_size"] = min(defaults["chunk_size"], values["max_batched_tokens"])
    wanted = [values, *[t for t in timeline if t]]
    for name, limit in LIMITS.items():
        if limit in chosen:
            continue
        ceiling = BY_NAME[limit].high
        asked = [w[name] for w in wanted if isinstance(w.get(name), int) and not isinstance(w.get(name), bool)]
        for value in asked:
            if value > ceiling:
                raise ConfigError(name, value, BY_NAME[name].allowed(ceiling, f"{limit} goes up to {ceiling}"))
        values[limit] = max([defaults[limit], *asked])
    cfg = EngineConfig(**{k: values[k] for k in START_KEYS})
    cfg.validate()
    nb = cfg.num_blocks
    if nb is not None and isinstance(values["max_num_seqs"], int) and values["max_num_seqs"] > nb:
        if "max_num_seqs" in chosen:
            raise ConfigError("max_num_seqs", values["max_num_seqs"],
                              f"an integer in [1, {nb}] ({_origin('num_blocks', nb, given, preset)}: the KV pool "
                              f"has {nb} blocks and each running request holds at least one)")
        raise ConfigError("num_blocks", nb,
                          f"at least {values['max_num_seqs']}: each running request holds at least one KV block "
                          f"and max_num_seqs is {values['max_num_seqs']} by default on {device}; give "
                          f"{flag_of('num_blocks')} {values['max_num_seqs']} or more, or "
                          f"{flag_of('max_num_seqs')} {nb} or less")
    bounds = ConfigBounds.for_engine(cfg, nb, BY_NAME["policy"].choice_list())
    live = validate_changes(LiveConfig(), {k: values[k] for k in LIVE_KEYS}, bounds)
    return cfg, dataclasses.replace(live, version=0)
