"""Workload generation: turn a preset's stream specs into timed requests.

Open-loop streams (poisson, gamma, burst, trace) are generated lazily by `generate_open_loop`: it
returns an `OpenLoopWorkload` that draws requests one at a time, in arrival order, as they are
iterated (a stream of a million requests holds one in memory, not a million prompts); closed-loop
streams issue their next request when one finishes, through `ClosedLoopStream`.
Everything is deterministic from the preset seed and the stream's index: each stream draws
arrivals, lengths and token ids from its own `random.Random`, so changing one stream's lengths
leaves every arrival time (and every other stream) unchanged.

Prompt token ids are drawn in [0, 255], valid for any vocabulary of 256 tokens or more; callers
should submit these requests with `ignore_eos=True` so that outputs run to `max_tokens`.
Lengths are clamped so that prompt + output <= max_model_len (the prompt keeps up to
max_model_len - 1 tokens, the output gets what is left); `WorkloadItem.clamped` records it.
"""
from __future__ import annotations

import heapq
import itertools
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from batchdeck.presets.prefix_workloads import (MultiTurnStream, apply_shared_prefix, load_trace_hash_ids,
                                                with_trace_hash_ids)
from batchdeck.presets.trace_loader import load_trace

if TYPE_CHECKING:  # the spec dataclasses live in presets.schema; only their attributes are used here
    from batchdeck.presets.schema import ClosedLoopSpec, LengthDist, StreamSpec

TOKEN_ID_RANGE = 256  # prompt token ids are in [0, TOKEN_ID_RANGE)
OPEN_LOOP_KINDS = ("poisson", "gamma", "burst", "trace")


@dataclass(frozen=True)
class WorkloadItem:
    """One request to submit at `arrival` seconds after the run starts."""

    arrival: float
    prompt_token_ids: list[int]
    max_tokens: int
    tenant: str = "default"
    slo_class: str = "interactive"
    priority: int = 0
    stream_index: int = 0
    clamped: bool = False
    conversation: int | None = None  # multi-turn streams: which chat, and which of its turns
    turn: int = 0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


def stream_rng(seed: int, stream_index: int, purpose: str) -> random.Random:
    """The generator for one purpose (arrivals, lengths, tokens) of one stream; string seeds are stable."""
    return random.Random(f"batchdeck:{seed}:{stream_index}:{purpose}")


def lognormal_mu(mean: float, sigma: float) -> float:
    """The `mu` of a lognormal whose mean is `mean` (mean = exp(mu + sigma^2 / 2))."""
    return math.log(mean) - sigma * sigma / 2.0


def sample_length(dist: int | "LengthDist", rng: random.Random) -> int:
    """Draw one token count (an int >= 1) from an int or a LengthDist."""
    if isinstance(dist, int):
        return max(1, dist)
    kind = dist.dist
    if kind == "constant":
        value = float(dist.value)
    elif kind == "uniform":
        value = float(rng.randint(int(dist.min), int(dist.max)))
    elif kind == "lognormal":
        value = rng.lognormvariate(lognormal_mu(dist.mean, dist.sigma), dist.sigma)
    elif kind == "normal":
        value = rng.gauss(dist.mean, dist.std)
    else:
        raise ValueError(f"unknown length distribution {kind!r}")
    n = round(value)
    if dist.min is not None:
        n = max(n, int(dist.min))
    if dist.max is not None:
        n = min(n, int(dist.max))
    return max(1, n)


def clamp_lengths(prompt_len: int, output_len: int, max_model_len: int) -> tuple[int, int, bool]:
    """Fit prompt + output into `max_model_len`: (prompt, output, whether anything was cut)."""
    if max_model_len < 2:
        raise ValueError(f"max_model_len must be >= 2, got {max_model_len}")
    prompt = max(1, min(prompt_len, max_model_len - 1))
    output = max(1, min(output_len, max_model_len - prompt))
    return prompt, output, (prompt, output) != (prompt_len, output_len)


def make_item(
    arrival: float,
    prompt_len: int,
    output_len: int,
    spec: "StreamSpec",
    stream_index: int,
    token_rng: random.Random,
    max_model_len: int,
) -> WorkloadItem:
    """A WorkloadItem with random prompt ids, lengths clamped to the model's context."""
    prompt_len, output_len, clamped = clamp_lengths(prompt_len, output_len, max_model_len)
    return WorkloadItem(
        arrival=float(arrival),
        prompt_token_ids=list(token_rng.randbytes(prompt_len)),
        max_tokens=output_len,
        tenant=spec.tenant,
        slo_class=spec.slo_class,
        priority=spec.priority,
        stream_index=stream_index,
        clamped=clamped,
    )


def _renewal_arrivals(spec: Any, rng: random.Random) -> Iterator[float]:
    """Arrival times of a poisson or gamma renewal process, up to `duration` or `count` requests, lazily."""
    if spec.kind == "gamma":
        shape = 1.0 / (spec.cv * spec.cv)
        scale = 1.0 / (spec.rate * shape)

        def gap() -> float:
            return rng.gammavariate(shape, scale)
    else:

        def gap() -> float:
            return rng.expovariate(spec.rate)

    n = 0
    t = 0.0
    while True:
        t += gap()
        if spec.count is not None and n >= spec.count:
            return
        if spec.duration is not None and t >= spec.duration:
            return
        n += 1
        yield t


def _trace_path(spec: Any, base_dir: Path | None) -> Path:
    """A trace stream's file: a relative path is taken from `base_dir` (the preset's folder)."""
    path = Path(spec.path)
    return base_dir / path if base_dir is not None and not path.is_absolute() else path


def _trace_rows(spec: Any, base_dir: Path | None) -> list[tuple[float, int, int]]:
    return load_trace(_trace_path(spec, base_dir), spec.columns, spec.time_unit, spec.time_scale, spec.length_scale,
                      spec.start, spec.limit)


def read_trace_files(streams: Sequence["StreamSpec"], base_dir: str | Path | None = None) -> None:
    """Read every trace file of `streams` (rows and, where named, block hash ids) and discard them: a bad
    file or row fails here, naming its line, before a run builds its engine or opens its recording."""
    base = Path(base_dir) if base_dir is not None else None
    for spec in streams:
        if spec.kind != "trace":
            continue
        _trace_rows(spec, base)
        if spec.hash_ids:
            load_trace_hash_ids(_trace_path(spec, base), spec.columns["time"], spec.hash_ids, spec.time_unit,
                                spec.start, spec.limit)


def _stream_items(
    spec: Any, stream_index: int, seed: int, max_model_len: int, rows: list[tuple[float, int, int]] | None,
    base_dir: Path | None = None,
) -> Iterator[WorkloadItem]:
    """One open-loop stream's requests in arrival order, drawn as they are asked for (`rows`: a trace's),
    with the stream's prefix structure (a trace's block hash ids, a shared system prompt) applied."""
    items = _plain_stream_items(spec, stream_index, seed, max_model_len, rows)
    if spec.kind == "trace" and spec.hash_ids:
        items = with_trace_hash_ids(items, spec, _trace_path(spec, base_dir), seed, stream_index)
    return apply_shared_prefix(items, spec.prefix, seed, stream_index, max_model_len)


def _plain_stream_items(
    spec: Any, stream_index: int, seed: int, max_model_len: int, rows: list[tuple[float, int, int]] | None
) -> Iterator[WorkloadItem]:
    tokens = stream_rng(seed, stream_index, "tokens")
    if spec.kind == "trace":
        for t, n_in, n_out in rows or ():
            yield make_item(t, n_in, n_out, spec, stream_index, tokens, max_model_len)
        return
    if spec.kind == "burst":
        arrivals: Iterator[float] = itertools.repeat(float(spec.at), spec.count)
    elif spec.kind in ("poisson", "gamma"):
        arrivals = _renewal_arrivals(spec, stream_rng(seed, stream_index, "arrivals"))
    else:
        raise ValueError(f"stream {stream_index}: kind {spec.kind!r} is not open-loop ({', '.join(OPEN_LOOP_KINDS)})")
    lengths = stream_rng(seed, stream_index, "lengths")
    for t in arrivals:
        n_in = sample_length(spec.input_tokens, lengths)
        n_out = sample_length(spec.output_tokens, lengths)
        yield make_item(t, n_in, n_out, spec, stream_index, tokens, max_model_len)


def _stream_count(spec: Any, stream_index: int, seed: int, rows: list[tuple[float, int, int]] | None) -> int:
    """How many requests a stream makes, without drawing lengths or prompts."""
    if spec.kind == "trace":
        return len(rows or ())
    if spec.kind == "burst" or spec.duration is None:
        return spec.count
    return sum(1 for _ in _renewal_arrivals(spec, stream_rng(seed, stream_index, "arrivals")))


class OpenLoopWorkload(Sequence[WorkloadItem]):
    """The open-loop requests of a workload, sorted by (arrival, stream index), generated lazily.

    Iterating draws them from the seeded generators one at a time -- the same items on every pass.
    Trace files are read when the workload is made (a bad file fails then, not mid-run).
    `len()` counts them without building prompts (cached). Indexing walks forward from the last
    index asked for, so `items[i]` with i = 0, 1, 2, ... costs O(1) each; going back restarts the
    walk; a slice is a list. Equal to any sequence holding the same items.
    """

    def __init__(self, streams: Sequence["StreamSpec"], seed: int, max_model_len: int, base_dir: Path | None):
        self.streams = [(i, s) for i, s in enumerate(streams) if s.kind in OPEN_LOOP_KINDS]
        self.seed, self.max_model_len = seed, max_model_len
        self.base_dir = base_dir
        self._rows = {i: _trace_rows(s, base_dir) for i, s in self.streams if s.kind == "trace"}
        self._len: int | None = None
        self._cursor: tuple[int, WorkloadItem, Iterator[WorkloadItem]] | None = None

    def __iter__(self) -> Iterator[WorkloadItem]:
        per_stream = [_stream_items(s, i, self.seed, self.max_model_len, self._rows.get(i), self.base_dir)
                      for i, s in self.streams]
        return heapq.merge(*per_stream, key=lambda item: (item.arrival, item.stream_index))

    def __len__(self) -> int:
        if self._len is None:
            self._len = sum(_stream_count(s, i, self.seed, self._rows.get(i)) for i, s in self.streams)
        return self._len

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):  # a list of the items, drawn afresh
            r = range(len(self))[index]
            if r.step > 0:
                return list(itertools.islice(iter(self), r.start, r.stop, r.step))
            return list(self)[index]
        if index < 0:
            index += len(self)
        if index < 0:
            raise IndexError("workload index out of range")
        if self._cursor is None or index < self._cursor[0]:
            it = iter(self)
            self._cursor = (-1, None, it)  # type: ignore[arg-type]
        at, item, it = self._cursor
        while at < index:
            try:
                item = next(it)
            except StopIteration:
                raise IndexError("workload index out of range") from None
            at += 1
        self._cursor = (at, item, it)
        return item

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence):
            return NotImplemented
        return all(a == b for a, b in itertools.zip_longest(self, other, fillvalue=object()))

    def __repr__(self) -> str:
        return f"OpenLoopWorkload({len(self.streams)} streams, seed={self.seed})"


def generate_open_loop(
    streams: Sequence["StreamSpec"], seed: int, max_model_len: int, base_dir: str | Path | None = None
) -> OpenLoopWorkload:
    """All requests of the open-loop streams (closed-loop ones are skipped), sorted by arrival, lazily.

    `stream_index` is the stream's position in `streams` (pass the preset's whole workload list).
    Relative trace paths are resolved against `base_dir` (schema-loaded presets hold absolute ones).
    """
    return OpenLoopWorkload(streams, seed, max_model_len, Path(base_dir) if base_dir is not None else None)


class ClosedLoopStream:
    """`concurrency` clients that each send a new request as soon as their previous one finishes.

    The stream stops issuing once `duration` seconds have passed (a finish at or after it issues
    nothing) or `count` requests have been issued in total (the initial ones included).
    """

    def __init__(self, spec: "ClosedLoopSpec", stream_index: int, seed: int, max_model_len: int):
        self.spec = spec
        self.stream_index = stream_index
        self.max_model_len = max_model_len
        self.issued = 0
        self._lengths = stream_rng(seed, stream_index, "lengths")
        self._tokens = stream_rng(seed, stream_index, "tokens")
        self._seed = seed
        self._prefix_draws = stream_rng(seed, stream_index, "prefix")

    def _next(self, now: float) -> WorkloadItem:
        self.issued += 1
        n_in = sample_length(self.spec.input_tokens, self._lengths)
        n_out = sample_length(self.spec.output_tokens, self._lengths)
        item = make_item(now, n_in, n_out, self.spec, self.stream_index, self._tokens, self.max_model_len)
        return next(apply_shared_prefix([item], self.spec.prefix, self._seed, self.stream_index, self.max_model_len,
                                        self._prefix_draws))

    def _can_issue(self, now: float) -> bool:
        if self.spec.count is not None and self.issued >= self.spec.count:
            return False
        return self.spec.duration is None or now < self.spec.duration

    @property
    def exhausted(self) -> bool:
        """True once `count` requests have been issued (a duration-bound stream only knows at finish time)."""
        return self.spec.count is not None and self.issued >= self.spec.count

    def initial(self) -> list[WorkloadItem]:
        """The first request of every client, all at t = 0 (fewer if `count` is smaller)."""
        items = []
        for _ in range(self.spec.concurrency):
            if not self._can_issue(0.0):
                break
            items.append(self._next(0.0))
        return items

    def on_finished(self, now: float, previous: WorkloadItem | None = None,
                    output_token_ids: Sequence[int] = ()) -> WorkloadItem | None:
        """The finishing client's next request, arriving at `now`, or None once the stream is done
        (`previous` and its answer matter to multi-turn streams only)."""
        return self._next(now) if self._can_issue(now) else None


def closed_loop_streams(streams: Sequence["StreamSpec"], seed: int, max_model_len: int
                        ) -> list["ClosedLoopStream | MultiTurnStream"]:
    """A ClosedLoopStream for every closed-loop spec and a MultiTurnStream for every multi-turn spec
    in `streams` (indices are positions in `streams`): the streams whose next request waits for an answer."""
    out: list[ClosedLoopStream | MultiTurnStream] = []
    for index, spec in enumerate(streams):
        if spec.kind == "closed-loop":
            out.append(ClosedLoopStream(spec, index, seed, max_model_len))
        elif spec.kind == "multi-turn":
            out.append(MultiTurnStream(spec, index, seed, max_model_len))
    return out


def count_clamped(items: Sequence[WorkloadItem]) -> int:
    """How many items had their lengths cut to fit the model's context."""
    return sum(1 for item in items if item.clamped)
