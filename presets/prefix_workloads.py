"""Workloads whose prompts share prefixes: shared system prompts, multi-turn chats, traces with block hashes.

Deterministic like the other streams (engine-independent random streams per stream and purpose):
- `apply_shared_prefix`: a stream's `prefix` puts one of `variants` system prompts of `tokens`
  tokens before the prompts of a `share` of its requests (drawn per request from the stream's
  "prefix" generator, so arrivals and lengths stay what they were without it);
- `MultiTurnStream`: chats whose every turn resends the history (earlier prompts and the answers
  the engine actually gave) plus a new user message, after an exponential think time;
- `hash_id_prompts`: Mooncake-style traces give each request the hash ids of its 512-token blocks;
  equal ids become equal token blocks (at the same position in the prompt), so the trace's prefix
  sharing is replayed exactly, at any `length_scale`.
"""
from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

from batchdeck.presets.trace_loader import TraceError, _get, _parse_time, _rows, per_file_version

if TYPE_CHECKING:
    from batchdeck.presets.schema import MultiTurnSpec, SharedPrefixSpec
    from batchdeck.presets.workload_streams import WorkloadItem


def _rng(seed: int, stream_index: int, purpose: str) -> random.Random:
    return random.Random(f"batchdeck:{seed}:{stream_index}:{purpose}")


def system_prompts(spec: "SharedPrefixSpec", seed: int, stream_index: int) -> list[list[int]]:
    """The stream's `variants` system prompts, `tokens` ids in [0, 255] each."""
    rng = _rng(seed, stream_index, "system-prompts")
    return [list(rng.randbytes(spec.tokens)) for _ in range(spec.variants)]


def apply_shared_prefix(items: Iterable["WorkloadItem"], spec: "SharedPrefixSpec | None", seed: int,
                        stream_index: int, max_model_len: int, draws: random.Random | None = None
                        ) -> Iterator["WorkloadItem"]:
    """`items` (drawn lazily) with a system prompt before a `share` of them (the prompt keeps room
    for one output token; the output is cut to fit the context, marking the item `clamped`)."""
    if spec is None:
        yield from items
        return
    prompts = system_prompts(spec, seed, stream_index)
    draws = draws or _rng(seed, stream_index, "prefix")
    for item in items:
        pick, variant = draws.random(), draws.randrange(len(prompts))
        if pick >= spec.share:
            yield item
            continue
        prompt = (prompts[variant] + item.prompt_token_ids)[:max_model_len - 1]
        max_tokens = max(1, min(item.max_tokens, max_model_len - len(prompt)))
        clamped = item.clamped or len(prompt) < len(prompts[variant]) + item.num_prompt_tokens or \
            max_tokens < item.max_tokens
        yield replace(item, prompt_token_ids=prompt, max_tokens=max_tokens, clamped=clamped)


class MultiTurnStream:
    """Chats that each send their next turn when the previous one is answered (after a think time).

    Same interface as `ClosedLoopStream` (`initial`, `on_finished`, `issued`, `exhausted`, `spec`):
    the player submits each item at its `arrival` and calls `on_finished(now, item, output_token_ids)`.
    """

    def __init__(self, spec: "MultiTurnSpec", stream_index: int, seed: int, max_model_len: int):
        from batchdeck.presets.workload_streams import sample_length

        self.spec = spec
        self.stream_index = stream_index
        self.max_model_len = max_model_len
        self.issued = 0
        self._sample_length = sample_length
        self._lengths = _rng(seed, stream_index, "lengths")
        self._tokens = _rng(seed, stream_index, "tokens")
        self._think = _rng(seed, stream_index, "think")
        self._turns: dict[int, int] = {}  # conversation -> turns issued
        starts = _rng(seed, stream_index, "arrivals")
        t, self._starts = 0.0, []
        for _ in range(spec.conversations):
            self._starts.append(t)
            if spec.rate:
                t += starts.expovariate(spec.rate)
        self._system = system_prompts(spec.prefix, seed, stream_index) if spec.prefix else []
        prefix_draws = _rng(seed, stream_index, "prefix")
        self._prefix_of = [self._pick_system(prefix_draws) for _ in range(spec.conversations)]

    def _pick_system(self, draws: random.Random) -> list[int]:
        if not self._system:
            return []
        pick, variant = draws.random(), draws.randrange(len(self._system))
        return self._system[variant] if pick < self.spec.prefix.share else []

    @property
    def exhausted(self) -> bool:
        return self.issued >= self.spec.count

    def _turn(self, conversation: int, history: list[int], now: float) -> "WorkloadItem | None":
        from batchdeck.presets.workload_streams import WorkloadItem

        n_user = self._sample_length(self.spec.user_tokens, self._lengths)
        n_out = self._sample_length(self.spec.output_tokens, self._lengths)
        prompt = history + list(self._tokens.randbytes(n_user))
        if len(prompt) >= self.max_model_len:
            return None  # the chat outgrew the context: it ends here
        turn = self._turns.get(conversation, 0)
        self._turns[conversation] = turn + 1
        self.issued += 1
        max_tokens = min(n_out, self.max_model_len - len(prompt))
        return WorkloadItem(arrival=now, prompt_token_ids=prompt, max_tokens=max_tokens, tenant=self.spec.tenant,
                            slo_class=self.spec.slo_class, priority=self.spec.priority,
                            stream_index=self.stream_index, clamped=max_tokens < n_out,
                            conversation=conversation, turn=turn)

    def initial(self) -> list["WorkloadItem"]:
        """Every chat's first turn, at its start time."""
        items = []
        for c, t in enumerate(self._starts):
            item = self._turn(c, list(self._prefix_of[c]), t)
            if item is not None:
                items.append(item)
        return items

    def on_finished(self, now: float, previous: "WorkloadItem | None" = None,
                    output_token_ids: Sequence[int] = ()) -> "WorkloadItem | None":
        """The chat's next turn: its history (the previous prompt and answer) plus a new message,
        `think_time` (exponential mean) after `now`; None once it had all its turns."""
        if previous is None or previous.conversation is None:
            raise ValueError("a multi-turn stream needs the finished turn and its answer")
        c = previous.conversation
        if self._turns.get(c, 0) >= self.spec.turns:
            return None
        think = self._think.expovariate(1.0 / self.spec.think_time) if self.spec.think_time > 0 else 0.0
        return self._turn(c, list(previous.prompt_token_ids) + list(output_token_ids), now + think)


def block_tokens(seed: int, hash_id: int, n: int) -> list[int]:
    """The `n` token ids standing for block `hash_id` (the same for every request that names it)."""
    return list(random.Random(f"batchdeck:{seed}:hash-block:{hash_id}").randbytes(n))


def hash_id_prompts(rows: Sequence[Sequence[int]], lengths: Sequence[int], block_tokens_n: int, seed: int,
                    filler: random.Random) -> list[list[int]]:
    """Prompts of `lengths[i]` tokens made of the blocks `rows[i]` names, in order (`block_tokens_n`
    tokens each); a prompt longer than its blocks is filled with fresh tokens, a shorter one is cut."""
    cache: dict[int, list[int]] = {}
    return [hash_id_prompt(ids, n, block_tokens_n, seed, filler, cache) for ids, n in zip(rows, lengths)]


def hash_id_prompt(ids: Sequence[int], n: int, block_tokens_n: int, seed: int, filler: random.Random,
                   cache: dict[int, list[int]]) -> list[int]:
    """One prompt of `n` tokens from the blocks `ids` names (`cache`: blocks made so far)."""
    prompt: list[int] = []
    for h in ids:
        if len(prompt) >= n:
            break
        if h not in cache:
            cache[h] = block_tokens(seed, h, block_tokens_n)
        prompt.extend(cache[h])
    prompt = prompt[:n]
    if len(prompt) < n:
        prompt.extend(filler.randbytes(n - len(prompt)))
    return prompt


def _parse_hash_ids(path: Path, lineno: int, column: str, cell: Any) -> list[int]:
    value = cell
    if isinstance(cell, str):  # CSV: "[1, 2, 3]" or "1 2 3"
        text = cell.strip().strip("[]").replace(",", " ")
        try:
            value = [int(v) for v in text.split()]
        except ValueError:
            value = None
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise TraceError(f"{path}: line {lineno}, column {column!r}: cannot parse {cell!r} as a list of "
                         "integer block hash ids")
    return value


def load_trace_hash_ids(path: str | Path, time_column: str, hash_column: str, time_unit: str = "s",
                        start: float = 0.0, limit: int | None = None) -> list[list[int]]:
    """Each kept row's block hash ids, in the order `load_trace` keeps rows (by arrival, ties in
    file order, from `start` seconds after the first row, at most `limit`)."""
    parsed = _sorted_hash_ids(Path(path), time_column, hash_column, time_unit)
    if not parsed:
        return []
    t_first = parsed[0][0]
    kept = [list(ids) for t, ids in parsed if t - t_first >= start]
    return kept[:limit] if limit is not None else kept


@per_file_version
def _sorted_hash_ids(path: Path, time_column: str, hash_column: str, time_unit: str
                     ) -> tuple[tuple[float, tuple[int, ...]], ...]:
    parsed = []
    for lineno, record in _rows(path):
        t = _parse_time(path, lineno, time_column, _get(path, lineno, record, time_column), time_unit)
        parsed.append((t, tuple(_parse_hash_ids(path, lineno, hash_column, _get(path, lineno, record, hash_column)))))
    parsed.sort(key=lambda row: row[0])
    return tuple(parsed)


def with_trace_hash_ids(items: Iterable["WorkloadItem"], spec: Any, path: Path, seed: int, stream_index: int
                        ) -> Iterator["WorkloadItem"]:
    """Trace items (drawn lazily) whose prompts follow the trace's block hash ids (spec.hash_ids names
    the column; the ids are read when the first item is asked for)."""
    rows = load_trace_hash_ids(path, spec.columns["time"], spec.hash_ids, spec.time_unit, spec.start, spec.limit)
    n_block = max(1, round(spec.hash_block_tokens * spec.length_scale))
    filler, cache = _rng(seed, stream_index, "hash-filler"), {}
    for it, ids in zip(items, rows):
        yield replace(it, prompt_token_ids=hash_id_prompt(ids, it.num_prompt_tokens, n_block, seed, filler, cache))
