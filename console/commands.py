"""Command-palette commands: every live setting as `key value`, plus the console's actions.

`candidates(query, config, bounds)` is pure: it parses what was typed (`policy sjf`,
`max_num_seqs 16`, `chunk-size 256`, `preemption drain`), validates a typed value against the
engine's bounds exactly as the engine will (engine.config.validate_changes), and returns what the
palette offers. A value that does not validate is offered as a refusal that says why; choosing it
shows that reason and applies nothing. `SettingsProvider` turns candidates into palette hits.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from textual.command import DiscoveryHit, Hit, Hits, Provider

from batchdeck.engine.config import ConfigBounds, ConfigError, LiveConfig, validate_changes
from batchdeck.engine.settings import BY_NAME, LIMITS, LIVE_SETTINGS, PANEL_KINDS
from batchdeck.policies.base import ParamSpec, check_policy_params

from batchdeck.console.request_view import SORT_KEYS

# From the settings table: every live setting is a palette command; the scalar ones are config-panel fields.
SETTINGS = tuple(s.name for s in LIVE_SETTINGS)
PANEL_SETTINGS = tuple(s.name for s in LIVE_SETTINGS if s.kind in PANEL_KINDS)
INT_SETTINGS = tuple(s.name for s in LIVE_SETTINGS if s.kind == "int")
FLOAT_SETTINGS = tuple(s.name for s in LIVE_SETTINGS if s.kind == "float")
_LIVE_FIELDS = frozenset(f.name for f in dataclasses.fields(LiveConfig))
MEANING = {s.name: s.meaning for s in LIVE_SETTINGS}
BOOL_SETTINGS = tuple(s.name for s in LIVE_SETTINGS if s.kind == "bool")
# Clearing the prefix cache is turning it off then on (off drops the cache), two changes in order.
CLEAR_PREFIX_CACHE = ({"prefix_caching": False}, {"prefix_caching": True})

# name, action (an App action), help
ACTIONS: tuple[tuple[str, str, str], ...] = (
    ("pause engine", "pause", "stop iterating; requests stay queued (the log shows the iteration)"),
    ("resume engine", "resume", "continue iterating"),
    ("submit burst", "burst", "submit a burst of requests (tenant 'console')"),
    ("abort selected request", "abort_selected", "abort the request under the cursor in the request table"),
    ("freeze display", "freeze", "stop repainting so you can read; telemetry is still collected"),
    ("config panel", "config", "open the config panel: every live setting with its bounds"),
    ("help", "help", "every key and palette command"),
    ("filter requests", "filter_requests", "show only matching requests: tenant=… class=… state=… id=… or a word"),
    *((f"sort requests by {label}", f"sort_by('{key}')", f"order the request table by {label}")
      for key, label in SORT_KEYS.items()),
    ("autoscale batch chart", "autoscale", "batch chart y axis: the token budget, or the tallest column shown"),
)


# vLLM's names for live settings (the flags' aliases in the settings table): max_num_batched_tokens, ...
_ALIASES = {flag.lstrip("-").replace("-", "_"): s.name for s in LIVE_SETTINGS for flag in s.flags[1:]}


def normalize_key(word: str) -> str:
    key = word.strip().lower().replace("-", "_")
    return _ALIASES.get(key, key)


def choices(key: str, bounds: Mapping[str, Any] | None) -> tuple[str, ...] | None:
    """The allowed values of a choice (the engine's published ones) or true/false setting, None for any other."""
    if key in BOOL_SETTINGS:
        return ("true", "false")
    return ConfigBounds.from_dict(bounds or {}).choices(key)


def describe_bounds(key: str, config: Mapping[str, Any] | None, bounds: Mapping[str, Any] | None) -> str:
    """What a setting allows, for the palette's help and the config panel (the bound in force)."""
    opts = choices(key, bounds)
    if opts is not None:
        return " | ".join(opts)
    s = BY_NAME[key]
    if s.kind == "object":
        return "a JSON object of the policy's parameters"
    if key in LIMITS and not isinstance((bounds or {}).get(key), (list, tuple)):  # the engine's bound not known yet
        return f"an integer ≥ {s.low}"
    hi = ConfigBounds.from_dict(bounds or {}).upper(key, config or {})
    fmt = (lambda v: f"{v:g}") if s.kind == "float" else str
    unit = " s" if s.unit == "seconds" else ""
    # a setting that bounds another (max_batched_tokens, over chunk_size) cannot go below that one's value
    under = [(o.name, (config or {}).get(o.name)) for o in LIVE_SETTINGS if o.bound_ref == key]
    low = max([s.low] + [v for _, v in under if isinstance(v, (int, float))])
    return f"{fmt(low)}..{hi if isinstance(hi, str) else fmt(hi)}{unit}"


def live_config(config: Mapping[str, Any] | None) -> LiveConfig:
    return LiveConfig(**{k: v for k, v in (config or {}).items() if k in _LIVE_FIELDS})


def parse_value(key: str, text: str) -> Any:
    """The typed value for `key` from what was typed; raises ConfigError saying what is expected."""
    return BY_NAME[key].parse_text(text)


def validate(changes: Mapping[str, Any], config: Mapping[str, Any] | None, bounds: Mapping[str, Any] | None) -> str | None:
    """None if the engine would accept `changes` on top of `config`, else why not (as the engine says it)."""
    parsed = ConfigBounds.from_dict(bounds or {})
    try:
        validate_changes(live_config(config), changes, parsed, _published_params_check(parsed.policy_params))
    except ConfigError as exc:
        return str(exc)
    except (ValueError, TypeError) as exc:
        return str(exc)
    return None


def _published_params_check(published: Mapping[str, Any]):
    """Policy parameters checked against the specs the engine published with its bounds, as it checks them;
    None (the engine alone checks) when it published none."""
    if not published:
        return None
    specs = {policy: {k: ParamSpec.from_dict(v) for k, v in (params or {}).items()}
             for policy, params in published.items()}
    return lambda policy, params: check_policy_params(policy, specs, params)


@dataclass(frozen=True)
class Candidate:
    text: str  # what the palette shows and matches against
    help: str
    changes: dict[str, Any] | None = None  # a validated live change
    error: str | None = None  # a refusal: why the typed value cannot be applied
    action: str | None = None  # an App action name
    sequence: tuple[dict[str, Any], ...] = ()  # live changes sent one after the other
    exact: bool = False  # the query named this command completely


def candidates(query: str, config: Mapping[str, Any] | None, bounds: Mapping[str, Any] | None) -> list[Candidate]:
    """What the palette offers for `query` (see the module docstring)."""
    words = query.split()
    out: list[Candidate] = []
    if words and normalize_key(words[0]) in SETTINGS and len(words) >= 2:
        key = normalize_key(words[0])
        raw = " ".join(words[1:])
        now = (config or {}).get(key)
        opts = choices(key, bounds)
        if opts is not None and raw not in opts:
            partial = [o for o in opts if o.startswith(raw)]
            if partial:  # still typing: offer the matching values
                return [_setting(key, o, now, bounds, config) for o in partial]
        if opts is not None and raw not in opts and key not in BOOL_SETTINGS:  # a bool's refusal: parse_value's
            return [Candidate(f"{key} {raw}", f"refused: {key}={raw!r} is not allowed: one of " + ", ".join(opts),
                              error=f"{key}={raw!r} is not allowed: one of " + ", ".join(opts), exact=True)]
        try:
            value = parse_value(key, raw)
        except ConfigError as exc:
            return [Candidate(f"{key} {raw}", f"refused: {exc}", error=str(exc), exact=True)]
        error = validate({key: value}, config, bounds)
        if error is not None:
            return [Candidate(f"{key} {raw}", f"refused: {error}", error=error, exact=True)]
        return [dataclasses.replace(_setting(key, value, now, bounds, config), exact=True)]
    for key in SETTINGS:
        opts = choices(key, bounds)
        now = (config or {}).get(key)
        if opts is not None:
            out.extend(_setting(key, o, now, bounds, config) for o in opts)
        else:
            meaning = f": {MEANING[key]}"
            out.append(Candidate(f"{key} <{describe_bounds(key, config, bounds)}>",
                                 f"type `{key} N` to set it (now {now}){meaning}; "
                                 f"allowed {describe_bounds(key, config, bounds)}"))
    out.extend(Candidate(name, help, action=action) for name, action, help in ACTIONS)
    if (config or {}).get("prefix_caching", True):
        out.append(Candidate("clear prefix cache", "drop every cached KV block (prefix_caching off, then on again)",
                             sequence=CLEAR_PREFIX_CACHE))
    else:  # off, nothing is cached; the off-then-on pair would have turned caching on
        out.append(Candidate("clear prefix cache", "refused: prefix caching is off, so nothing is cached",
                             error="prefix caching is off, so nothing is cached (turn it on with "
                                   "`prefix_caching true`)"))
    return out


def _setting(key: str, value: Any, now: Any, bounds: Mapping[str, Any] | None, config: Mapping[str, Any] | None) -> Candidate:
    typed = parse_value(key, value) if key in BOOL_SETTINGS and isinstance(value, str) else value
    current = " (current)" if typed == now else ""
    return Candidate(f"{key} {value}", f"set {key} to {value} at the next iteration{current}; now {now}; "
                                       f"allowed {describe_bounds(key, config, bounds)}", changes={key: typed})


class SettingsProvider(Provider):
    """The console's palette commands. The app supplies `palette_context()` (config, bounds),
    `request_changes(changes, origin)` and `refuse(message)`."""

    def _context(self) -> tuple[Mapping[str, Any] | None, Mapping[str, Any] | None]:
        ctx = getattr(self.app, "palette_context", None)
        return ctx() if ctx is not None else (None, None)

    def _callback(self, c: Candidate):
        app = self.app
        if c.error is not None:
            return lambda: app.refuse(c.error, origin="palette", typed=c.text)  # the recording keeps what was typed
        if c.changes is not None:
            return lambda: app.request_changes(c.changes, origin="palette")
        if c.action is not None:
            return lambda: app.run_action(c.action)
        if c.sequence:
            return lambda: [app.request_changes(ch, origin="palette") for ch in c.sequence]
        return lambda: app.notify(c.help, title=c.text, timeout=6)

    async def discover(self) -> Hits:
        config, bounds = self._context()
        for c in candidates("", config, bounds):
            if c.action is not None or c.sequence or c.text.startswith(
                    ("policy ", "max_num_seqs", "chunk_size", "batching ", "spec_k", "prefix_caching ")):
                yield DiscoveryHit(c.text, self._callback(c), help=c.help)

    async def search(self, query: str) -> Hits:
        config, bounds = self._context()
        matcher = self.matcher(query)
        for c in candidates(query, config, bounds):
            if c.exact:
                score = 1.0
            else:
                score = matcher.match(c.text)
                if score <= 0:
                    continue
            yield Hit(score, matcher.highlight(c.text) if not c.exact else c.text, self._callback(c),
                      text=c.text, help=c.help)
