"""Engine flags of every command that starts an engine, made from the settings table, and turning them
into the engine's configs (through the one resolver, `engine.config.resolve_configs`).

Every flag defaults to None ("not given"): the value then comes from a preset or the table's default
for the device, which `--help` shows for cpu and cuda. vLLM's names are accepted where the meaning is
the same (`--max-num-batched-tokens`, `--scheduling-policy`); `--enable-chunked-prefill` is accepted
and changes nothing (chunked prefill is always on).
"""
from __future__ import annotations

import argparse
import copy
import difflib
import json
from typing import Any

from batchdeck.engine.config import (ConfigBounds, ConfigError, EngineConfig, LiveConfig, resolve_configs,
                                     validate_changes)
from batchdeck.engine.settings import BY_NAME, SETTINGS, Setting


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc.msg}): {text!r}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def add_setting_flag(p: argparse.ArgumentParser, s: Setting) -> None:
    """The flag(s) of one table setting, defaulting to None (not given: the per-device default applies)."""
    kw: dict[str, Any] = {"dest": s.name, "default": None, "help": s.help_text()}
    if s.kind == "bool":
        kw["action"] = argparse.BooleanOptionalAction
    elif s.kind == "int":
        kw.update(type=_int, metavar="N")
    elif s.kind == "float":
        kw.update(type=_float, metavar="S" if s.unit == "seconds" else "X")
    elif s.kind == "object":
        kw.update(type=_json_object, metavar="JSON")
    elif s.kind == "choice":  # checked by the table (the same message as a live change), not by argparse
        kw["metavar"] = "{" + ",".join(s.choice_list()) + "}"
    p.add_argument(*s.flags, **kw)


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    """One flag per setting of the table (aliases included), all defaulting to None (not given)."""
    group = p.add_argument_group("engine settings (live ones can also be changed while it runs)")
    for s in SETTINGS:
        if s.flags:
            add_setting_flag(group, s)
    group.add_argument("--enable-chunked-prefill", action="store_true", dest="enable_chunked_prefill",
                       help="accepted for vLLM compatibility: chunked prefill is always on (for whole-prompt "
                            "prefill set --chunk-size to --max-batched-tokens)")


# The flags of add_engine_flags, by their setting names.
ENGINE_FLAG_DESTS = tuple(s.name for s in SETTINGS if s.flags)


def given_engine_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The engine settings given on the command line, by setting name (--draft-model alone implies
    drafter=model)."""
    given = {d: getattr(args, d) for d in ENGINE_FLAG_DESTS if getattr(args, d, None) is not None}
    if given.get("draft_model") and "drafter" not in given:
        given["drafter"] = "model"
    return given


def flags_default_to_none(p: argparse.ArgumentParser) -> None:
    """Every engine flag defaults to None already (kept for callers that asked for it)."""
    p.set_defaults(**{dest: None for dest in ENGINE_FLAG_DESTS})


def engine_configs(args: argparse.Namespace, preset: Any = None, *,
                   cuda_available: bool | None = None) -> tuple[EngineConfig, LiveConfig]:
    """(EngineConfig, LiveConfig) from the flags given, a preset (its settings under the flags) and the
    per-device defaults: the same resolution for every command."""
    if preset is None:
        return resolve_configs(given_engine_flags(args), cuda_available=cuda_available)
    return preset_engine_configs(preset, given_engine_flags(args), cuda_available=cuda_available)


def preset_settings(preset: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A preset's settings flattened by name (model, seed, engine:, config:) and its timeline's `set`s."""
    flat = {"model": preset.model, "seed": preset.seed, **preset.engine, **preset.config}
    return flat, [dict(e.set) for e in preset.timeline if e.set]


def preset_engine_configs(preset: Any, overrides: dict[str, Any] | None = None, *,
                          cuda_available: bool | None = None) -> tuple[EngineConfig, LiveConfig]:
    """The configs of the engine that plays `preset` under `overrides`, after checking its timeline
    against that engine (`check_timeline`)."""
    flat, sets = preset_settings(preset)
    cfg, live = resolve_configs(overrides, flat, sets, cuda_available=cuda_available)
    check_timeline(preset, cfg, live)
    return cfg, live


def check_timeline(preset: Any, cfg: EngineConfig, live: LiveConfig) -> None:
    """Each timeline `set`, in file order on top of the last, as the engine that plays it will check
    it: from the live settings it really starts with (its device's defaults, the flags, --set), not the
    CPU defaults the file was checked against. A change it would refuse mid-run is refused now."""
    from batchdeck.policies import validate_policy_params  # the registry loads the policies: only when a preset plays

    bounds = ConfigBounds.for_engine(cfg, cfg.num_blocks, BY_NAME["policy"].choice_list())
    for i, entry in enumerate(preset.timeline):
        if not entry.set:
            continue
        try:
            live = validate_changes(live, entry.set, bounds, validate_policy_params)
        except ConfigError as exc:
            where = str(preset.path) if getattr(preset, "path", None) else f"preset {preset.name!r}"
            when = f"at {entry.at:g} s" if entry.at is not None else f"at iteration {entry.at_iteration}"
            # the entry's settings and those bounding them or bounded by them (the settings table's bound_ref)
            shown = [s.name for s in SETTINGS if s.name in entry.set or s.bound_ref in entry.set
                     or any(BY_NAME[k].bound_ref == s.name for k in entry.set if k in BY_NAME)]
            before = ", ".join(f"{k}={getattr(live, k)}" for k in shown if hasattr(live, k))
            raise ValueError(f"{where}: timeline[{i}] ({when}) set {dict(entry.set)} would be refused by this "
                             f"engine: {exc} (its settings before that entry: {before})") from None


def build_engine(args: argparse.Namespace, **kwargs):
    """The engine the flags describe (a simulated one with --sim; pass `clock=` to pick its time)."""
    from batchdeck.engine.sim.engine import make_engine

    cfg, live = engine_configs(args)
    return make_engine(cfg, live, **kwargs)


def explain(exc: ConfigError, args: argparse.Namespace | None) -> str:
    """A refusal as the operator reads it: the flag they gave first, when the refused setting came from one."""
    message = str(exc)
    s = BY_NAME.get(exc.key)
    if args is None or s is None or not s.flags or getattr(args, s.name, None) is None:
        return message
    return f"{s.flag} {getattr(args, s.name)}: {message}"


# ---------------------------------------------------------------------------------------------
# The parser every command uses: no prefix matching, and a near miss names the closest flag


class Parser(argparse.ArgumentParser):
    """argparse without abbreviations; an unknown flag is refused by the subcommand that got it, with
    that subcommand's usage and the closest valid flag."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        # An unknown flag is named first, even when a required one is missing too (a typo of a required
        # flag would otherwise only say it is missing): one pass with nothing required, then the real one.
        required = [a for p in self._parsers() for a in p._actions if a.required and a.option_strings]
        for action in required:
            action.required = False
        try:
            ns, extras = self.parse_known_args(args, copy.copy(namespace))
        finally:
            for action in required:
                action.required = True
        if extras:
            target = self._chosen_subparser(ns) or self
            target.error(target.unknown_message(extras))
        return super().parse_args(args, namespace)

    def _parsers(self) -> list[argparse.ArgumentParser]:
        """This parser and every subcommand's, recursively."""
        out: list[argparse.ArgumentParser] = [self]
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    out.extend(sub._parsers() if isinstance(sub, Parser) else [sub])
        return out

    def _chosen_subparser(self, ns: argparse.Namespace) -> "Parser | None":
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                chosen = action.choices.get(getattr(ns, action.dest, None) or "")
                if isinstance(chosen, Parser):
                    return chosen._chosen_subparser(ns) or chosen
        return None

    def unknown_message(self, extras: list[str]) -> str:
        known = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
        hints = []
        for word in extras:
            if word.startswith("-"):
                close = difflib.get_close_matches(word.split("=", 1)[0], known, n=1, cutoff=0.6)
                if close:
                    hints.append(f"{word.split('=', 1)[0]}: did you mean {close[0]}?")
        return "unrecognized arguments: " + " ".join(extras) + ("; " + "; ".join(hints) if hints else "")
