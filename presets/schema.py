"""The preset file format: a workload plus a timeline of live config changes, checked on load.

`load_preset(path)` / `parse_preset(text, source_name)` return a `Preset` or raise a `PresetError`
whose message names the file, the key path (e.g. `workload[1].rate`), the YAML line, and what is
allowed. Line numbers come from the composed YAML node tree, walked once into a path -> line index.

A preset is a small file, so the YAML is held to it before anything is built: at most
`MAX_YAML_DEPTH` levels of nesting and `MAX_YAML_NODES` nodes once aliases are expanded (a
"billion laughs" file is refused in milliseconds), no key twice in one mapping, UTF-8 text. What a
preset asks the engine for is bounded too (requests per stream, token counts, seconds), with the
allowed range in the error.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from batchdeck.engine.config import ConfigBounds, ConfigError, EngineConfig, LiveConfig, validate_changes
from batchdeck.engine.settings import BY_NAME, LIMITS, START_KEYS
from batchdeck.engine.request import SLO_CLASSES
from batchdeck.presets.trace_loader import COLUMN_ROLES, TIME_UNITS, TraceError, trace_columns

TOP_KEYS = ("name", "description", "model", "engine", "config", "workload", "timeline", "seed")
STREAM_KINDS = ("poisson", "gamma", "burst", "closed-loop", "trace", "multi-turn")
LENGTH_DISTS = ("constant", "uniform", "lognormal", "normal")
COMMON_STREAM_KEYS = ("kind", "tenant", "slo_class", "priority", "prefix")
STREAM_KEYS: dict[str, tuple[str, ...]] = {
    "poisson": ("rate", "duration", "count", "input_tokens", "output_tokens"),
    "gamma": ("rate", "cv", "duration", "count", "input_tokens", "output_tokens"),
    "burst": ("at", "count", "input_tokens", "output_tokens"),
    "closed-loop": ("concurrency", "duration", "count", "input_tokens", "output_tokens"),
    "trace": ("path", "columns", "time_unit", "time_scale", "length_scale", "start", "limit", "hash_ids",
              "hash_block_tokens"),
    "multi-turn": ("conversations", "turns", "rate", "user_tokens", "output_tokens", "think_time"),
}
PREFIX_KEYS = ("tokens", "share", "variants")
DIST_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {  # dist -> (required, optional)
    "constant": (("value",), ()),
    "uniform": (("min", "max"), ()),
    "lognormal": (("mean", "sigma"), ("min", "max")),
    "normal": (("mean", "std"), ("min", "max")),
}
TIMELINE_KEYS = ("at", "at_iteration", "set", "pause", "resume")
ENGINE_KEYS = tuple(k for k in START_KEYS if k not in ("model", "seed"))  # `engine:` keys, from the settings table

KeyPath = tuple[str | int, ...]

MAX_YAML_DEPTH = 64  # nesting levels; presets use about 5
MAX_YAML_NODES = 100_000  # nodes with every alias expanded; presets have a few hundred
MAX_REQUESTS_PER_STREAM = 1_000_000  # count, trace limit, and rate x duration
MAX_TOKENS = 1_048_576  # input / output tokens of one request (2**20)
MAX_SECONDS = 86_400.0  # durations, arrival offsets, timeline times: one day
MAX_RATE = 100_000.0  # requests per second
MAX_CONCURRENCY = 10_000  # closed-loop clients
MAX_CV = 100.0  # gamma coefficient of variation
MAX_SIGMA = 10.0  # lognormal sigma (exp(10) is already a factor of 22,000)
MAX_SCALE = 1e6  # trace time_scale / length_scale
MAX_ITERATION = 10**9  # timeline at_iteration
MAX_TRACE_START = 365 * 86_400.0  # trace start offset: a year of trace
MAX_TURNS = 10_000  # turns per multi-turn chat (the context ends a chat long before)
MAX_PREFIX_VARIANTS = 10_000  # distinct shared system prompts per stream
MAX_PREFIX_TOKENS_TOTAL = 1 << 24  # tokens of all of a stream's system prompts together (held in memory)
INT64 = 2**63  # seeds lie in [-INT64, INT64 - 1]
INT32 = 2**31  # priorities lie in [-INT32, INT32 - 1]


class PresetError(ValueError):
    """An invalid preset: `str()` reads `FILE, line N: KEY.PATH: problem (what is allowed)`."""

    def __init__(self, source: str, key: str, line: int | None, problem: str):
        self.source, self.key, self.line, self.problem = source, key, line, problem
        where = f"{source}, line {line}" if line is not None else source
        super().__init__(f"{where}: {key}: {problem}" if key else f"{where}: {problem}")


@dataclass(frozen=True)
class LengthDist:
    """A token-count distribution; `dist` is constant | uniform | lognormal | normal.

    lognormal's `mean` is the mean of the distribution itself (not of its log).
    """

    dist: str
    value: int | None = None
    min: int | None = None
    max: int | None = None
    mean: float | None = None
    sigma: float | None = None
    std: float | None = None


Length = int | LengthDist


@dataclass(frozen=True, kw_only=True)
class StreamSpec:
    """Fields every stream has; see the per-kind subclasses."""

    kind: str
    tenant: str = "default"
    slo_class: str = "interactive"
    priority: int = 0
    prefix: "SharedPrefixSpec | None" = None  # a shared system prompt before a share of the prompts


@dataclass(frozen=True, kw_only=True)
class PoissonSpec(StreamSpec):
    kind: str = "poisson"
    rate: float
    input_tokens: Length
    output_tokens: Length
    duration: float | None = None
    count: int | None = None


@dataclass(frozen=True, kw_only=True)
class GammaSpec(StreamSpec):
    kind: str = "gamma"
    rate: float
    input_tokens: Length
    output_tokens: Length
    cv: float = 1.0
    duration: float | None = None
    count: int | None = None


@dataclass(frozen=True, kw_only=True)
class BurstSpec(StreamSpec):
    kind: str = "burst"
    count: int
    input_tokens: Length
    output_tokens: Length
    at: float = 0.0


@dataclass(frozen=True, kw_only=True)
class ClosedLoopSpec(StreamSpec):
    kind: str = "closed-loop"
    concurrency: int
    input_tokens: Length
    output_tokens: Length
    duration: float | None = None
    count: int | None = None


@dataclass(frozen=True, kw_only=True)
class TraceSpec(StreamSpec):
    kind: str = "trace"
    path: Path  # resolved against the preset file's directory
    columns: Mapping[str, str]
    time_unit: str = "s"
    time_scale: float = 1.0
    length_scale: float = 1.0
    start: float = 0.0
    limit: int | None = None
    hash_ids: str | None = None  # column of per-request block hash ids (Mooncake's `hash_ids`)
    hash_block_tokens: int = 512  # tokens per hash-id block (before length_scale)


@dataclass(frozen=True)
class SharedPrefixSpec:
    """A system prompt of `tokens` tokens put before the prompts of a `share` of a stream's requests;
    `variants` distinct system prompts, each request with one drawn uniformly."""

    tokens: int
    share: float = 1.0
    variants: int = 1


@dataclass(frozen=True, kw_only=True)
class MultiTurnSpec(StreamSpec):
    """`conversations` chats of `turns` turns: each turn resends the whole history (the earlier
    prompts and answers) plus a new user message, `think_time` seconds (exponential, this mean)
    after the previous answer. Conversations start at `rate` per second (Poisson; all at 0 without
    a rate). A `prefix` puts a shared system prompt before a share of the conversations."""

    kind: str = "multi-turn"
    conversations: int
    turns: int
    user_tokens: Length
    output_tokens: Length
    rate: float | None = None
    think_time: float = 0.0

    @property
    def count(self) -> int:
        return self.conversations * self.turns

    @property
    def concurrency(self) -> int:
        return self.conversations


@dataclass(frozen=True)
class TimelineEntry:
    """One scripted action: at `at` seconds or iteration `at_iteration`, `set` live keys, `pause` or `resume`."""

    at: float | None = None
    at_iteration: int | None = None
    set: dict[str, Any] | None = None
    pause: float | None = None
    resume: bool = False


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    model: str
    engine: dict[str, Any]
    config: dict[str, Any]
    workload: list[StreamSpec]
    timeline: list[TimelineEntry]
    seed: int
    path: Path | None = None

    @property
    def base_dir(self) -> Path | None:
        """The preset file's folder, which its relative trace paths are taken from (None: not from a file)."""
        return self.path.resolve().parent if self.path is not None else None


# ---------------------------------------------------------------------------------------------
# YAML -> (data, path -> line index)


def _index_lines(node: yaml.Node, path: KeyPath, out: dict[KeyPath, int], source: str) -> None:
    """Record the 1-based line of every mapping key and sequence item under `node`; refuse a key given
    twice in one mapping (YAML would keep the last silently). Depth and size are bounded by `_check_shape`."""
    if isinstance(node, yaml.MappingNode):
        first_line: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node.value)
            child = path + (key,)
            line = key_node.start_mark.line + 1
            if isinstance(key_node, yaml.ScalarNode) and key != "<<":  # `<<` merges are meant to be overridden
                if key in first_line:
                    raise PresetError(source, format_key(child), line,
                                      f"duplicate key {key!r}: first at line {first_line[key]}, again at line {line}; "
                                      "give each key once")
                first_line[key] = line
            out.setdefault(child, line)
            _index_lines(value_node, child, out, source)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out.setdefault(path + (i,), item.start_mark.line + 1)
            _index_lines(item, path + (i,), out, source)


def _check_shape(text: str, source: str) -> None:
    """Bound nesting depth and the node count with aliases expanded, from the event stream (no recursion,
    nothing expanded), before the YAML is composed into a tree."""
    expanded_size: dict[str, int] = {}  # anchor -> nodes of its subtree, aliases inside expanded
    open_nodes: list[list[Any]] = [[None, 0]]  # [anchor, nodes so far] per open collection; [0] is the stream
    total = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            if len(open_nodes) > MAX_YAML_DEPTH:
                raise PresetError(source, "", event.start_mark.line + 1,
                                  f"YAML nested more than {MAX_YAML_DEPTH} levels deep; a preset needs about 5")
            open_nodes.append([event.anchor, 1])
            added = 1
        elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            anchor, size = open_nodes.pop()
            if anchor is not None:
                expanded_size[anchor] = size
            open_nodes[-1][1] += size
            continue
        elif isinstance(event, yaml.ScalarEvent):
            if event.anchor is not None:
                expanded_size[event.anchor] = 1
            open_nodes[-1][1] += 1
            added = 1
        elif isinstance(event, yaml.AliasEvent):
            added = expanded_size.get(event.anchor, 1)
            open_nodes[-1][1] += added
        else:
            continue
        total += added
        if total > MAX_YAML_NODES:
            raise PresetError(source, "", event.start_mark.line + 1,
                              f"YAML expands to more than {MAX_YAML_NODES:,} nodes (aliases of aliases?); "
                              "a preset has a few hundred")


def _compose(text: str, source: str) -> tuple[Any, dict[KeyPath, int]]:
    loader = yaml.SafeLoader(text)
    try:
        _check_shape(text, source)
        node = loader.get_single_node()
        if node is None:
            return None, {(): 1}
        lines: dict[KeyPath, int] = {(): node.start_mark.line + 1}
        _index_lines(node, (), lines, source)
        return loader.construct_document(node), lines
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark is not None else None
        raise PresetError(source, "", line, f"invalid YAML: {e.problem or e}") from None
    except yaml.reader.ReaderError as e:
        line = text.count("\n", 0, e.position) + 1
        raise PresetError(source, "", line, f"invalid YAML: character {e.character!r} is not allowed") from None
    except yaml.YAMLError as e:
        raise PresetError(source, "", None, f"invalid YAML: {e}") from None
    finally:
        loader.dispose()


def format_key(path: KeyPath) -> str:
    """('workload', 1, 'rate') -> 'workload[1].rate'."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# ---------------------------------------------------------------------------------------------
# Checking helpers, bound to one file


@dataclass(frozen=True)
class _Checker:
    source: str
    lines: dict[KeyPath, int]

    def line(self, path: KeyPath) -> int | None:
        while path not in self.lines and path:
            path = path[:-1]
        return self.lines.get(path)

    def error(self, path: KeyPath, problem: str) -> PresetError:
        return PresetError(self.source, format_key(path), self.line(path), problem)

    def mapping(self, value: Any, path: KeyPath, what: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.error(path, f"must be a mapping of {what}, got {_describe(value)}")
        return value

    def known_keys(self, m: Mapping[str, Any], path: KeyPath, allowed: tuple[str, ...], what: str) -> None:
        for key in m:
            if key not in allowed:
                raise self.error(path + (key,), f"unknown {what} key {key!r}; allowed: {', '.join(allowed)}")

    def require(self, m: Mapping[str, Any], path: KeyPath, key: str, what: str) -> Any:
        if key not in m:
            raise self.error(path, f"missing required key {key!r} ({what})")
        return m[key]

    def number(self, value: Any, path: KeyPath, *, minimum: float = -math.inf, exclusive: bool = False,
               maximum: float = math.inf) -> float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and isinstance(value, int):
            ok = abs(value) < 2**1023  # a float can hold it (a 400-digit integer is refused, not an OverflowError)
        if ok:
            ok = math.isfinite(value) and (value > minimum if exclusive else value >= minimum) and value <= maximum
        if not ok:
            if maximum < math.inf:
                bound = f"in ({minimum:g}, {maximum:g}]" if exclusive else f"in [{minimum:g}, {maximum:g}]"
            else:
                bound = f"> {minimum:g}" if exclusive else (f">= {minimum:g}" if minimum > -math.inf else "finite")
            raise self.error(path, f"must be a number {bound}, got {_describe(value)}")
        return float(value)

    def integer(self, value: Any, path: KeyPath, *, minimum: int | None = None, maximum: int | None = None) -> int:
        if (isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum)
                or (maximum is not None and value > maximum)):
            if maximum is not None:
                bound = f" in [{minimum if minimum is not None else '-inf'}, {maximum}]"
            else:
                bound = f" >= {minimum}" if minimum is not None else ""
            raise self.error(path, f"must be an integer{bound}, got {_describe(value)}")
        return value

    def string(self, value: Any, path: KeyPath, *, nonempty: bool = False) -> str:
        if not isinstance(value, str) or (nonempty and not value.strip()):
            raise self.error(path, f"must be a {'non-empty ' if nonempty else ''}string, got {_describe(value)}")
        return value

    def choice(self, value: Any, path: KeyPath, allowed: tuple[str, ...], what: str) -> str:
        if not isinstance(value, str) or value not in allowed:
            raise self.error(path, f"unknown {what} {value!r}; allowed: {', '.join(allowed)}")
        return value


def _describe(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**30:
        return f"an integer of {len(str(abs(value))) if abs(value) < 10**4000 else 'over 4000'} digits"
    text = repr(value)
    if len(text) > 80:
        text = text[:60] + f"... ({len(text)} characters)"
    return f"{text} ({type(value).__name__})"


# ---------------------------------------------------------------------------------------------
# Sections


def _length(c: _Checker, value: Any, path: KeyPath) -> Length:
    if isinstance(value, int) and not isinstance(value, bool):
        return c.integer(value, path, minimum=1, maximum=MAX_TOKENS)
    if not isinstance(value, dict):
        raise c.error(
            path, f"must be an integer >= 1 or a mapping with dist: {', '.join(LENGTH_DISTS)}; got {_describe(value)}"
        )
    dist = c.choice(c.require(value, path, "dist", "one of " + ", ".join(LENGTH_DISTS)), path + ("dist",),
                    LENGTH_DISTS, "dist")
    required, optional = DIST_KEYS[dist]
    c.known_keys(value, path, ("dist",) + required + optional, f"{dist} dist")
    for key in required:
        c.require(value, path, key, f"{dist} takes {', '.join(required + optional)}")
    kw: dict[str, Any] = {}
    for key in ("value", "min", "max"):
        if key in value:
            kw[key] = c.integer(value[key], path + (key,), minimum=1, maximum=MAX_TOKENS)
    if "mean" in value:
        kw["mean"] = c.number(value["mean"], path + ("mean",), minimum=0, exclusive=True, maximum=MAX_TOKENS)
    if "sigma" in value:
        kw["sigma"] = c.number(value["sigma"], path + ("sigma",), minimum=0, maximum=MAX_SIGMA)
    if "std" in value:
        kw["std"] = c.number(value["std"], path + ("std",), minimum=0, maximum=MAX_TOKENS)
    if "min" in kw and "max" in kw and kw["min"] > kw["max"]:
        raise c.error(path + ("max",), f"must be >= min ({kw['min']}), got {kw['max']}")
    return LengthDist(dist=dist, **kw)


def _duration_or_count(c: _Checker, s: Mapping[str, Any], path: KeyPath, rate: float | None = None) -> dict[str, Any]:
    has_d, has_c = "duration" in s, "count" in s
    if has_d == has_c:
        problem = "has both 'duration' and 'count'" if has_d else "needs 'duration' (seconds) or 'count' (requests)"
        raise c.error(path + (("count",) if has_d else ()), f"{problem}; give exactly one")
    if not has_d:
        return {"count": c.integer(s["count"], path + ("count",), minimum=1, maximum=MAX_REQUESTS_PER_STREAM)}
    duration = c.number(s["duration"], path + ("duration",), minimum=0, exclusive=True, maximum=MAX_SECONDS)
    if rate is not None and rate * duration > MAX_REQUESTS_PER_STREAM:
        raise c.error(path + ("duration",),
                      f"rate x duration asks for about {rate * duration:,.0f} requests; at most "
                      f"{MAX_REQUESTS_PER_STREAM:,} per stream (lower the rate or the duration)")
    return {"duration": duration}


def _trace_path(c: _Checker, value: Any, path: KeyPath, base_dir: Path) -> Path:
    rel = Path(c.string(value, path, nonempty=True))
    full = rel if rel.is_absolute() else base_dir / rel
    if not full.is_file():
        raise c.error(path, f"trace file not found: {full} (paths are relative to the preset file)")
    if full.suffix.lower() not in (".csv", ".jsonl", ".ndjson"):
        raise c.error(path, f"trace file must be .csv or .jsonl, got {full.name}")
    return full


def _stream(c: _Checker, raw: Any, path: KeyPath, base_dir: Path) -> StreamSpec:
    s = c.mapping(raw, path, "stream settings")
    kind = c.choice(c.require(s, path, "kind", "one of " + ", ".join(STREAM_KINDS)), path + ("kind",),
                    STREAM_KINDS, "stream kind")
    c.known_keys(s, path, COMMON_STREAM_KEYS + STREAM_KEYS[kind], f"{kind} stream")
    kw: dict[str, Any] = {}
    if "tenant" in s:
        kw["tenant"] = c.string(s["tenant"], path + ("tenant",), nonempty=True)
    if "slo_class" in s:
        kw["slo_class"] = c.choice(s["slo_class"], path + ("slo_class",), SLO_CLASSES, "slo_class")
    if "priority" in s:
        kw["priority"] = c.integer(s["priority"], path + ("priority",), minimum=-INT32, maximum=INT32 - 1)
    if "prefix" in s:
        kw["prefix"] = _shared_prefix(c, s["prefix"], path + ("prefix",))
    if kind == "multi-turn":
        return _multi_turn(c, s, path, kw)

    if kind != "trace":
        for key in ("input_tokens", "output_tokens"):
            kw[key] = _length(c, c.require(s, path, key, "an integer or a length dist"), path + (key,))
    if kind in ("poisson", "gamma"):
        kw["rate"] = c.number(c.require(s, path, "rate", "requests per second"), path + ("rate",),
                              minimum=0, exclusive=True, maximum=MAX_RATE)
        if kind == "gamma" and "cv" in s:
            kw["cv"] = c.number(s["cv"], path + ("cv",), minimum=0, exclusive=True, maximum=MAX_CV)
        kw.update(_duration_or_count(c, s, path, kw["rate"]))
        return (PoissonSpec if kind == "poisson" else GammaSpec)(**kw)
    if kind == "burst":
        kw["count"] = c.integer(c.require(s, path, "count", "requests sent at once"), path + ("count",), minimum=1,
                                maximum=MAX_REQUESTS_PER_STREAM)
        if "at" in s:
            kw["at"] = c.number(s["at"], path + ("at",), minimum=0, maximum=MAX_SECONDS)
        return BurstSpec(**kw)
    if kind == "closed-loop":
        kw["concurrency"] = c.integer(c.require(s, path, "concurrency", "number of clients"),
                                      path + ("concurrency",), minimum=1, maximum=MAX_CONCURRENCY)
        kw.update(_duration_or_count(c, s, path))
        return ClosedLoopSpec(**kw)

    # trace
    kw["path"] = _trace_path(c, c.require(s, path, "path", "a CSV or JSONL file"), path + ("path",), base_dir)
    cols = c.mapping(c.require(s, path, "columns", "time, input, output column names"), path + ("columns",),
                     "column names (time, input, output)")
    c.known_keys(cols, path + ("columns",), COLUMN_ROLES, "columns")
    for role in COLUMN_ROLES:
        c.string(c.require(cols, path + ("columns",), role, "the file's column name"), path + ("columns", role),
                 nonempty=True)
    try:
        have = trace_columns(kw["path"])
    except (TraceError, OSError, UnicodeDecodeError) as e:
        raise c.error(path + ("path",), f"cannot read trace: {e}") from None
    for role in COLUMN_ROLES:
        if cols[role] not in have:
            raise c.error(path + ("columns", role),
                          f"column {cols[role]!r} not in {kw['path'].name}; it has: {', '.join(map(str, have))}")
    kw["columns"] = dict(cols)
    if "time_unit" in s:
        kw["time_unit"] = c.choice(s["time_unit"], path + ("time_unit",), TIME_UNITS, "time_unit")
    for key in ("time_scale", "length_scale"):
        if key in s:
            kw[key] = c.number(s[key], path + (key,), minimum=0, exclusive=True, maximum=MAX_SCALE)
    if "start" in s:
        kw["start"] = c.number(s["start"], path + ("start",), minimum=0, maximum=MAX_TRACE_START)
    if "limit" in s:
        kw["limit"] = c.integer(s["limit"], path + ("limit",), minimum=1, maximum=MAX_REQUESTS_PER_STREAM)
    if "hash_ids" in s:
        kw["hash_ids"] = c.string(s["hash_ids"], path + ("hash_ids",), nonempty=True)
        if kw["hash_ids"] not in have:
            raise c.error(path + ("hash_ids",),
                          f"column {kw['hash_ids']!r} not in {kw['path'].name}; it has: {', '.join(map(str, have))}")
    if "hash_block_tokens" in s:
        kw["hash_block_tokens"] = c.integer(s["hash_block_tokens"], path + ("hash_block_tokens",), minimum=1,
                                            maximum=MAX_TOKENS)
    return TraceSpec(**kw)


def _shared_prefix(c: _Checker, raw: Any, path: KeyPath) -> SharedPrefixSpec:
    p = c.mapping(raw, path, "shared prefix settings (tokens, share, variants)")
    c.known_keys(p, path, PREFIX_KEYS, "prefix")
    tokens = c.integer(c.require(p, path, "tokens", "system prompt length in tokens"), path + ("tokens",), minimum=1,
                       maximum=MAX_TOKENS)
    share = c.number(p["share"], path + ("share",), minimum=0, maximum=1) if "share" in p else 1.0
    variants = (c.integer(p["variants"], path + ("variants",), minimum=1, maximum=MAX_PREFIX_VARIANTS)
                if "variants" in p else 1)
    if tokens * variants > MAX_PREFIX_TOKENS_TOTAL:
        raise c.error(path + ("variants",), f"{variants:,} system prompts of {tokens:,} tokens are "
                      f"{tokens * variants:,} tokens; at most {MAX_PREFIX_TOKENS_TOTAL:,} together "
                      "(fewer variants or shorter prompts)")
    return SharedPrefixSpec(tokens=tokens, share=share, variants=variants)


def _multi_turn(c: _Checker, s: Mapping[str, Any], path: KeyPath, kw: dict[str, Any]) -> MultiTurnSpec:
    kw["conversations"] = c.integer(c.require(s, path, "conversations", "number of chats"),
                                    path + ("conversations",), minimum=1, maximum=MAX_REQUESTS_PER_STREAM)
    kw["turns"] = c.integer(c.require(s, path, "turns", "turns per chat"), path + ("turns",), minimum=1,
                            maximum=MAX_TURNS)
    if kw["conversations"] * kw["turns"] > MAX_REQUESTS_PER_STREAM:
        raise c.error(path + ("turns",), f"{kw['conversations']:,} conversations x {kw['turns']:,} turns are "
                      f"{kw['conversations'] * kw['turns']:,} requests; at most {MAX_REQUESTS_PER_STREAM:,} "
                      "per stream (fewer conversations or turns)")
    for key in ("user_tokens", "output_tokens"):
        kw[key] = _length(c, c.require(s, path, key, "an integer or a length dist"), path + (key,))
    if "rate" in s:
        kw["rate"] = c.number(s["rate"], path + ("rate",), minimum=0, exclusive=True, maximum=MAX_RATE)
    if "think_time" in s:
        kw["think_time"] = c.number(s["think_time"], path + ("think_time",), minimum=0, maximum=MAX_SECONDS)
    return MultiTurnSpec(**kw)


def _engine(c: _Checker, raw: Any) -> dict[str, Any]:
    path: KeyPath = ("engine",)
    e = c.mapping(raw if raw is not None else {}, path, "EngineConfig fields")
    for key in e:
        if key in ("model", "seed"):
            raise c.error(path + (key,), f"set {key!r} at the top level of the preset, not under engine")
    c.known_keys(e, path, ENGINE_KEYS, "engine")
    for key, value in e.items():
        try:
            BY_NAME[key].check(value)
        except ConfigError as err:
            raise c.error(path + (key,), str(err)) from None
    try:
        EngineConfig(**e).validate()
    except ConfigError as err:
        raise c.error(path + (err.key,), str(err)) from None
    return dict(e)


def _config_error(c: _Checker, path: KeyPath, changes: Mapping[str, Any], err: ConfigError) -> PresetError:
    key_path = path + (err.key,) if err.key in changes else path
    return c.error(key_path, str(err))


def _timeline_entry(c: _Checker, raw: Any, path: KeyPath, live: LiveConfig, bounds: ConfigBounds
                    ) -> tuple[TimelineEntry, LiveConfig]:
    t = c.mapping(raw, path, "a timeline action")
    c.known_keys(t, path, TIMELINE_KEYS, "timeline")
    if ("at" in t) == ("at_iteration" in t):
        problem = "has both 'at' and 'at_iteration'" if "at" in t else "needs 'at' (seconds) or 'at_iteration'"
        raise c.error(path + (("at_iteration",) if "at" in t else ()), f"{problem}; give exactly one")
    at = c.number(t["at"], path + ("at",), minimum=0, maximum=MAX_SECONDS) if "at" in t else None
    at_it = (c.integer(t["at_iteration"], path + ("at_iteration",), minimum=0, maximum=MAX_ITERATION)
             if "at_iteration" in t else None)
    actions = [k for k in ("set", "pause", "resume") if k in t]
    if len(actions) != 1:
        problem = f"has {', '.join(repr(a) for a in actions)}" if actions else "has no action"
        raise c.error(path + ((actions[-1],) if actions else ()),
                      f"{problem}; give exactly one of set: {{...}}, pause: SECONDS, resume: true")
    entry_kw: dict[str, Any] = {"at": at, "at_iteration": at_it}
    if "set" in t:
        changes = c.mapping(t["set"], path + ("set",), "live settings")
        try:
            live = validate_changes(live, changes, bounds)
        except ConfigError as err:
            raise _config_error(c, path + ("set",), changes, err) from None
        entry_kw["set"] = dict(changes)
    elif "pause" in t:
        entry_kw["pause"] = c.number(t["pause"], path + ("pause",), minimum=0, exclusive=True, maximum=MAX_SECONDS)
    else:
        if t["resume"] is not True:
            raise c.error(path + ("resume",), f"must be true, got {_describe(t['resume'])}")
        entry_kw["resume"] = True
    return TimelineEntry(**entry_kw), live


def bounds_for(engine: Mapping[str, Any]) -> ConfigBounds:
    """The live-config bounds a preset is checked against: the engine's own limits when it sets them,
    else the most each limit can be raised to (an unset limit is raised to fit what the preset asks
    for; see engine.config.resolve_configs), and the pool when `num_blocks` is set."""
    limits = {lim: engine[lim] if engine.get(lim) is not None else BY_NAME[lim].high for lim in LIMITS.values()}
    return ConfigBounds.for_engine(dataclasses.replace(EngineConfig(), **limits), engine.get("num_blocks"),
                                   BY_NAME["policy"].choice_list())


# ---------------------------------------------------------------------------------------------
# Entry points


def parse_preset(text: str, source_name: str = "<preset>", base_dir: str | Path | None = None) -> Preset:
    """Parse and check preset YAML. Trace paths resolve against `base_dir` (default: the source's directory)."""
    data, lines = _compose(text, source_name)
    c = _Checker(source_name, lines)
    top = c.mapping(data, (), "preset settings (" + ", ".join(TOP_KEYS) + ")")
    c.known_keys(top, (), TOP_KEYS, "top-level")
    base = Path(base_dir) if base_dir is not None else Path(source_name).resolve().parent

    name = c.string(c.require(top, (), "name", "the preset's name"), ("name",), nonempty=True)
    description = c.string(top.get("description", "") or "", ("description",))
    model = c.string(top.get("model", "synthetic:tiny"), ("model",), nonempty=True)
    seed = c.integer(top.get("seed", 0), ("seed",), minimum=-INT64, maximum=INT64 - 1)
    engine = _engine(c, top.get("engine"))
    bounds = bounds_for(engine)

    config = c.mapping(top.get("config") if top.get("config") is not None else {}, ("config",),
                       "live settings (LiveConfig keys)")
    live = LiveConfig()
    if config:
        try:
            live = validate_changes(live, config, bounds)
        except ConfigError as err:
            raise _config_error(c, ("config",), config, err) from None

    raw_workload = c.require(top, (), "workload", "a list of streams")
    if not isinstance(raw_workload, list) or not raw_workload:
        raise c.error(("workload",), f"must be a non-empty list of streams, got {_describe(raw_workload)}")
    workload = [_stream(c, s, ("workload", i), base) for i, s in enumerate(raw_workload)]

    raw_timeline = top.get("timeline") if top.get("timeline") is not None else []  # {} or false is refused below
    if not isinstance(raw_timeline, list):
        raise c.error(("timeline",), f"must be a list of actions, got {_describe(raw_timeline)}")
    timeline = []
    for i, raw in enumerate(raw_timeline):  # `set`s are checked in file order, each on top of the last
        entry, live = _timeline_entry(c, raw, ("timeline", i), live, bounds)
        timeline.append(entry)

    path = Path(source_name) if Path(source_name).is_file() else None
    return Preset(name=name, description=description, model=model, engine=engine, config=dict(config),
                  workload=workload, timeline=timeline, seed=seed, path=path)


def load_preset(path: str | Path) -> Preset:
    """Read and check a preset file."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise PresetError(str(p), "", None, f"cannot read preset: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise PresetError(str(p), "", line, f"not valid UTF-8: byte 0x{data[e.start]:02x} at column {column}; "
                                            "save the preset as UTF-8") from None
    return dataclasses.replace(parse_preset(text, str(p), p.resolve().parent), path=p)
