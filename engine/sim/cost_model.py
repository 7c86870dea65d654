"""Iteration time by regime: what one turn of the engine's loop costs, as a function of its shape.

The time a simulated iteration lasts is what virtual time must advance by between two iteration
starts of a busy real engine: scheduling, input preparation, the forward (a CUDA-graph replay padded
to its bucket, or an eager forward), sampling, bookkeeping and telemetry. `batchdeck calibrate`
fits it to the gaps between the real engine's iterations (engine/sim/calibrate.py).

Two regimes, each a linear model of its own features with non-negative coefficients:

- `decode` (every row computes one token): `constant`; `rows` (host work is O(rows)); `padded_rows`
  (the decode CUDA-graph bucket the rows pad to, from `decode_buckets`; the rows themselves when no
  bucket fits or none were captured), so the cost moves in steps as the engine's does; `context`
  (the KV the rows read, sum of (ctx + 1), in thousands of tokens: what bounds the attention kernel
  when its programs fill the GPU); `max_context` (the longest row's ctx + 1 over the KV slices the
  decode kernel splits each row into, in thousands: what bounds it when rows x KV heads are fewer
  than the GPU runs at once, as every program runs concurrently and the kernel ends with its
  longest one; a batch of mixed lengths then costs what its longest row costs, not its mean).
- `mixed` (some row computes several tokens: prefill chunks, speculative verification):
  `constant`; `eager` (1 when the iteration fits no mixed bucket of `token_buckets`, which were
  captured: it runs without a graph); `tokens` (all tokens computed); `padded_tokens` (the token
  bucket they pad to, or the tokens when eager); `prefill_tokens` (tokens of multi-token rows);
  `attention` (their attention work, sum of n * (ctx + (n + 1) / 2), in millions); `decode_rows`
  and `decode_context` (the one-token rows riding along, context in thousands); `rows`;
  `decode_max_context` (their longest, as `max_context`); `prefill_max_context` (the longest key walk
  of a multi-token row, its ctx + n, in thousands: a chunk of a long prompt is attended by few
  programs, each walking every key before it, so a 128-token chunk at 2k context can cost more than
  a 512-token one at the start of a prompt).

`decode_splits` ({"kv_heads", "num_sms", "max_splits"}, recorded by a calibration on the Triton
attention backend): how many KV slices the decode kernel gives each (row, KV head) at a row count
(`decode_splits` of engine/attention/decode_splits.py, the Triton backend's rule, over the rows the
graph bucket pads to); absent, one slice.

`host` (optional, {"decode": {...}, "mixed": {...}} over the same features): the host's own work per
iteration. With overlapped iterations on a GPU the host books one iteration and plans the next while
the device runs, so an iteration lasts the longer of the two: the regime coefficients then price the
device (fitted on the iterations the host waited for) and an iteration costs max(host, device). A
linear sum cannot do this: at a few dozen short rows the host bounds the iteration and the KV the
rows read costs nothing, at long contexts the device bounds it and the host's work hides.

`attention_max` (optional; GPU calibrations set it with `host`): the device's mixed iterations price
their prefill attention as max(`attention` term, `prefill_max_context` term) instead of the sum. The
attention kernel's time is the larger of its work over the GPU (many programs) and its longest key
walk (few programs, each walking every key before its chunk); a sum counts a short chunk deep into a
long prompt twice.

`idle_wake_s`: what an iteration after an idle wait adds (the engine waking for an arrival).
`idle_wake_by_idle`: optional [[idle seconds, wake seconds], ...] by how long the engine was idle
(a calibration's spaced requests at several gaps, in case a longer idle wakes slower: on the H200
it did not);
between two measured idles the wake is interpolated in log(idle), outside them the nearest holds.
Without it, every wake is `idle_wake_s`.

The profile's `cost` is {"format": "regimes/1", "decode": {...}, "mixed": {...}, "decode_buckets":
[...], "token_buckets": [...], "max_rows": N, "idle_wake_s": s, "cuda_graphs": bool, "decode_splits":
{...}} (with graphs, a simulated engine takes the buckets its own limits give: `for_limits`). A
coefficient a profile does not name is 0, so a profile written before a feature existed predicts as
before. A profile of the first format (five coefficients `constant, prefill_tokens, prefill_attention,
decode_rows, decode_context` for every iteration) still loads: it becomes the same model in both
regimes, without buckets.
"""
from __future__ import annotations

import bisect
import copy
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from batchdeck.engine.attention.decode_splits import decode_splits as split_count

COST_FORMAT = "regimes/1"
MAX_WAKE_S = 10.0  # an idle wake this long (s) or longer is refused as a measurement error
DECODE_FEATURES = ("constant", "rows", "padded_rows", "context", "max_context")
MIXED_FEATURES = ("constant", "eager", "tokens", "padded_tokens", "prefill_tokens", "attention", "decode_rows",
                  "decode_context", "rows", "decode_max_context", "prefill_max_context")
SPLIT_KEYS = ("kv_heads", "num_sms", "max_splits")
REGIMES = {"decode": DECODE_FEATURES, "mixed": MIXED_FEATURES}
_ATTN, _WALK = MIXED_FEATURES.index("attention"), MIXED_FEATURES.index("prefill_max_context")
LEGACY_FEATURES = ("constant", "prefill_tokens", "prefill_attention", "decode_rows", "decode_context")


@dataclass(frozen=True)
class IterationShape:
    """What an iteration computes, as the cost model sees it (before bucket padding)."""

    prefill_tokens: int = 0  # tokens of multi-token rows
    prefill_attention: float = 0.0  # sum n * (ctx + (n + 1) / 2) over those rows, in millions
    decode_rows: int = 0  # one-token rows
    decode_context: float = 0.0  # sum (ctx + 1) over decode rows, in thousands
    prefill_rows: int = 0
    decode_max_context: float = 0.0  # the longest decode row's ctx + 1, in thousands
    prefill_max_context: float = 0.0  # the longest multi-token row's ctx + n, in thousands

    @property
    def rows(self) -> int:
        return self.decode_rows + self.prefill_rows

    @property
    def tokens(self) -> int:
        return self.prefill_tokens + self.decode_rows

    @property
    def decode_only(self) -> bool:
        return self.prefill_rows == 0

    @classmethod
    def of_rows(cls, rows: Iterable[tuple[int, int]]) -> "IterationShape":
        """From (context, new tokens) per row."""
        pt = dr = pr = 0
        pa = dc = 0.0
        mx = -1
        walk = 0
        for ctx, n in rows:
            if n == 1:
                dr += 1
                dc += ctx + 1
                if ctx > mx:
                    mx = ctx
            else:
                pr += 1
                pt += n
                pa += n * (ctx + (n + 1) / 2)
                if ctx + n > walk:
                    walk = ctx + n
        return cls(pt, pa / 1e6, dr, dc / 1e3, pr, (mx + 1) / 1e3, walk / 1e3)

    @classmethod
    def of_chunks(cls, chunks) -> "IterationShape":
        return cls.of_rows((c.start, c.num_tokens) for c in chunks)


def _coefficients(d: Mapping[str, Any], names: Sequence[str], where: str) -> tuple[float, ...]:
    if not isinstance(d, Mapping):
        raise ValueError(f"cost model: {where} must be an object of coefficients, got {d!r}")
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise ValueError(f"cost model: unknown {where} feature(s) {', '.join(unknown)}; known: {', '.join(names)}")
    out = []
    for k in names:
        v = d.get(k, 0.0)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not np.isfinite(v):
            raise ValueError(f"cost model: {where} coefficient {k}={v!r} is not a finite number")
        out.append(float(v))
    return tuple(out)


def _splits(v: Any) -> dict[str, int] | None:
    if v is None:
        return None
    if (not isinstance(v, Mapping) or set(v) != set(SPLIT_KEYS)
            or any(not isinstance(v[k], int) or isinstance(v[k], bool) or v[k] < 1 for k in SPLIT_KEYS)):
        raise ValueError(f"cost model: decode_splits must be an object of positive integers "
                         f"{', '.join(SPLIT_KEYS)}, got {v!r}")
    return {k: int(v[k]) for k in SPLIT_KEYS}


def _buckets(v: Any, where: str) -> tuple[int, ...]:
    if not isinstance(v, (list, tuple)) or any(not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in v):
        raise ValueError(f"cost model: {where} must be a list of positive integers, got {v!r}")
    return tuple(sorted(set(v)))


@dataclass(frozen=True)
class CostModel:
    """`coefficients`: the profile's `cost` object (either format; see the module docstring)."""

    coefficients: dict[str, Any]
    _decode: tuple[float, ...] = field(init=False, repr=False, compare=False)
    _mixed: tuple[float, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        c = self.coefficients
        if not isinstance(c, Mapping):
            raise ValueError(f"cost model: expected an object, got {c!r}")
        if "format" not in c:  # the first format: one linear model for every iteration
            lc = _coefficients(c, LEGACY_FEATURES, "cost")
            const, pt, pa, dr, dc = lc
            c = {"format": COST_FORMAT, "decode": {"constant": const, "rows": dr, "context": dc},
                 "mixed": {"constant": const, "prefill_tokens": pt, "attention": pa, "decode_rows": dr,
                           "decode_context": dc}, "decode_buckets": [], "token_buckets": [], "max_rows": 0,
                 "idle_wake_s": 0.0, "legacy": dict(zip(LEGACY_FEATURES, lc))}
        elif c["format"] != COST_FORMAT:
            raise ValueError(f"cost model: format {c['format']!r}, expected {COST_FORMAT!r}")
        for regime in REGIMES:
            if regime not in c:
                raise ValueError(f"cost model: missing {regime!r} coefficients")
        known = {"format", "decode", "mixed", "decode_buckets", "token_buckets", "max_rows", "idle_wake_s", "legacy",
                 "cuda_graphs", "decode_splits", "idle_wake_by_idle", "host", "attention_max"}
        unknown = sorted(set(c) - known)
        if unknown:
            raise ValueError(f"cost model: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        dec = _coefficients(c["decode"], DECODE_FEATURES, "decode")
        mix = _coefficients(c["mixed"], MIXED_FEATURES, "mixed")
        db = _buckets(c.get("decode_buckets", []), "decode_buckets")
        tb = _buckets(c.get("token_buckets", []), "token_buckets")
        max_rows = c.get("max_rows", 0)
        if not isinstance(max_rows, int) or isinstance(max_rows, bool) or max_rows < 0:
            raise ValueError(f"cost model: max_rows must be an integer >= 0, got {max_rows!r}")
        wake = c.get("idle_wake_s", 0.0)
        if not isinstance(wake, (int, float)) or isinstance(wake, bool) or not 0.0 <= wake < MAX_WAKE_S:
            raise ValueError(f"cost model: idle_wake_s must be in [0, {MAX_WAKE_S:g}) seconds, got {wake!r}")
        object.__setattr__(self, "coefficients", {
            **{k: v for k, v in c.items() if k not in REGIMES}, "decode": dict(zip(DECODE_FEATURES, dec)),
            "mixed": dict(zip(MIXED_FEATURES, mix)), "decode_buckets": list(db), "token_buckets": list(tb),
            "max_rows": max_rows, "idle_wake_s": float(wake), "cuda_graphs": bool(c.get("cuda_graphs", bool(db or tb)))})
        bands = _wake_bands(c.get("idle_wake_by_idle"))
        if bands:
            self.coefficients["idle_wake_by_idle"] = [list(b) for b in bands]
        else:
            self.coefficients.pop("idle_wake_by_idle", None)
        object.__setattr__(self, "_wake_bands", bands)
        object.__setattr__(self, "_wake_idles", [b[0] for b in bands])
        splits = _splits(c.get("decode_splits"))
        if splits is not None:
            self.coefficients["decode_splits"] = splits
        else:
            self.coefficients.pop("decode_splits", None)
        object.__setattr__(self, "_decode", dec)
        object.__setattr__(self, "_mixed", mix)
        host = c.get("host")
        if host is not None:
            if not isinstance(host, Mapping) or set(host) != set(REGIMES):
                raise ValueError(f"cost model: host must be {{'decode': {{...}}, 'mixed': {{...}}}}, got {host!r}")
            hd = _coefficients(host["decode"], DECODE_FEATURES, "host decode")
            hm = _coefficients(host["mixed"], MIXED_FEATURES, "host mixed")
            self.coefficients["host"] = {"decode": dict(zip(DECODE_FEATURES, hd)), "mixed": dict(zip(MIXED_FEATURES, hm))}
        else:
            hd = hm = None
            self.coefficients.pop("host", None)
        object.__setattr__(self, "_host_decode", hd)
        object.__setattr__(self, "_host_mixed", hm)
        amax = c.get("attention_max", False)
        if not isinstance(amax, bool):
            raise ValueError(f"cost model: attention_max must be true or false, got {amax!r}")
        if amax:
            self.coefficients["attention_max"] = True
        else:
            self.coefficients.pop("attention_max", None)
        object.__setattr__(self, "_attention_max", amax)
        # padded rows per row count (index r), for the hot path
        pad = list(range((db[-1] if db else 0) + 1))
        for r in range(len(pad)):
            i = bisect.bisect_left(db, r)
            pad[r] = db[i] if i < len(db) else r
        object.__setattr__(self, "_pad_rows", pad)
        object.__setattr__(self, "_token_buckets", tb)
        # 1 / the decode kernel's KV slices for the rows it runs (index: rows), up to the first row count
        # it no longer splits at (decode_splits falls with the rows), for the hot path
        sp = self.coefficients.get("decode_splits")
        inv = [1.0]
        while sp is not None and split_count(len(inv), **sp) > 1:
            inv.append(1.0 / split_count(len(inv), **sp))
        object.__setattr__(self, "_inv_splits", inv)

    def for_limits(self, max_rows: int, max_tokens: int) -> "CostModel":
        """The model as an engine started with these limits runs it: CUDA graphs are captured up to
        the limits (engine/cuda_graphs.py), so the buckets follow them when the calibration used graphs."""
        if not self.coefficients["cuda_graphs"]:
            return self
        from batchdeck.engine.cuda_graphs import decode_buckets, token_buckets

        return CostModel({**self.to_dict(), "decode_buckets": decode_buckets(min(max_rows, max_tokens)),
                          "token_buckets": token_buckets(max_tokens), "max_rows": int(max_rows)})

    @property
    def idle_wake_s(self) -> float:
        return self.coefficients["idle_wake_s"]

    def wake_after(self, idle_s: float | None) -> float:
        """What the first iteration after `idle_s` seconds idle adds (None: idle since the start, taken
        as the longest measured idle)."""
        bands = self._wake_bands
        if not bands:
            return self.coefficients["idle_wake_s"]
        if idle_s is None or idle_s >= bands[-1][0]:
            return bands[-1][1]
        if idle_s <= bands[0][0]:
            return bands[0][1]
        i = bisect.bisect_right(self._wake_idles, idle_s)
        (x0, y0), (x1, y1) = bands[i - 1], bands[i]
        f = (math.log(idle_s) - math.log(x0)) / (math.log(x1) - math.log(x0))
        return y0 + f * (y1 - y0)

    @property
    def legacy(self) -> bool:
        return "legacy" in self.coefficients

    # -- features ---------------------------------------------------------------------------------
    def padded_rows(self, rows: int) -> int:
        pad = self._pad_rows
        return pad[rows] if rows < len(pad) else rows

    def split_share(self, rows: int) -> float:
        """1 / the KV slices per row of the decode kernel running `rows` rows (the rows of its graph
        bucket, padding included; 1.0 without `decode_splits`)."""
        inv = self._inv_splits
        return inv[rows] if rows < len(inv) else 1.0

    def mixed_bucket(self, tokens: int, rows: int) -> int | None:
        """The mixed graph bucket an iteration of `tokens` over `rows` replays (None: it runs eagerly);
        a bucket of tb tokens holds min(max_rows, tb) rows (engine/cuda_graphs.py)."""
        tb = self._token_buckets
        i = bisect.bisect_left(tb, tokens)
        max_rows = self.coefficients["max_rows"]
        while i < len(tb):
            if min(max_rows, tb[i]) >= rows:
                return tb[i]
            i += 1
        return None

    def features(self, s: IterationShape) -> tuple[str, tuple[float, ...]]:
        """(regime, feature values in that regime's order)."""
        if s.decode_only:
            return "decode", (1.0, float(s.decode_rows), float(self.padded_rows(s.decode_rows)), s.decode_context,
                              s.decode_max_context * self.split_share(self.padded_rows(s.decode_rows)))
        t = s.tokens
        b = self.mixed_bucket(t, s.rows) if self._token_buckets else None
        eager = 1.0 if (self._token_buckets and b is None) else 0.0
        kernel_rows = s.rows if b is None else min(self.coefficients["max_rows"], b)  # the bucket's rows
        return "mixed", (1.0, eager, float(t), float(b if b is not None else t), float(s.prefill_tokens),
                         s.prefill_attention, float(s.decode_rows), s.decode_context, float(s.rows),
                         s.decode_max_context * self.split_share(kernel_rows), s.prefill_max_context)

    # -- prediction -----------------------------------------------------------------------------
    def device_and_host(self, shape: IterationShape) -> tuple[str, float, float | None]:
        """(regime, the device's cost, the host's cost or None without a host model), unclipped."""
        regime, x = self.features(shape)
        c = self._decode if regime == "decode" else self._mixed
        t = sum(a * b for a, b in zip(c, x))
        if self._attention_max and regime == "mixed":
            work, walk = c[_ATTN] * x[_ATTN], c[_WALK] * x[_WALK]
            t -= min(work, walk)  # the larger of the two, not their sum
        h = self._host_decode if regime == "decode" else self._host_mixed
        return regime, t, (None if h is None else sum(a * b for a, b in zip(h, x)))

    def predict(self, shape: IterationShape) -> float:
        _, t, host = self.device_and_host(shape)
        if host is not None and host > t:
            t = host
        return t if t > 0.0 else 0.0

    def plan_seconds(self, chunks) -> float:
        """The modelled duration of a plan's chunks (the hot path: one pass, no objects for decode steps)."""
        pt = dr = pr = 0
        pa = dc = 0.0
        mx = -1
        walk = 0
        for ch in chunks:
            n = ch.num_tokens
            if n == 1:
                dr += 1
                start = ch.start
                dc += start + 1
                if start > mx:
                    mx = start
            else:
                pr += 1
                pt += n
                start = ch.start
                pa += n * (start + (n + 1) / 2)
                if start + n > walk:
                    walk = start + n
        if not pr:
            c0, c_rows, c_pad, c_ctx, c_max = self._decode
            pad = self._pad_rows
            padded = pad[dr] if dr < len(pad) else dr
            h = self._host_decode
            ctx_k = dc * 1e-3
            # the longest row's walk, as the kernel's programs share it out (one split_share per iteration)
            longest = (mx + 1) * 1e-3 * self.split_share(padded) if c_max or (h is not None and h[4]) else 0.0
            t = c0 + c_rows * dr + c_pad * padded + c_ctx * ctx_k + c_max * longest
            if h is not None:
                host = h[0] + h[1] * dr + h[2] * padded + h[3] * ctx_k + h[4] * longest
                if host > t:
                    t = host
            return t if t > 0.0 else 0.0
        return self.predict(IterationShape(pt, pa / 1e6, dr, dc / 1e3, pr, (mx + 1) / 1e3, walk / 1e3))

    # -- the analytic model's two quantities ------------------------------------------------------
    def decode_iteration_seconds(self, rows: int, mean_context: float) -> float:
        """A decode-only iteration of `rows` rows at `mean_context` tokens each."""
        return self.predict(IterationShape(decode_rows=rows, decode_context=rows * mean_context / 1e3,
                                           decode_max_context=mean_context / 1e3))

    def prefill_seconds(self, tokens: float, chunk: int | None = None) -> float:
        """What a prompt of `tokens` adds to the iterations that compute it, in chunks of `chunk`
        (default one chunk): each chunk's mixed-iteration cost beyond the constant of the model that
        prices it (the device's, or the host's where it is the larger)."""
        if tokens < 1:
            return 0.0
        chunk = int(max(1, chunk or tokens))
        total, done = 0.0, 0
        while done < tokens:
            n = int(min(chunk, tokens - done))
            if n < 2:
                n = 2
            _, device, host = self.device_and_host(IterationShape(
                prefill_tokens=n, prefill_attention=n * (done + (n + 1) / 2) / 1e6, prefill_rows=1,
                prefill_max_context=(done + n) / 1e3))
            if host is not None and host > device:
                total += host - self._host_mixed[0]
            else:
                total += device - self._mixed[0]
            done += n
        return max(0.0, total)

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self.coefficients)  # nested (host, bands): a caller's edit never reaches the model


# -- fitting --------------------------------------------------------------------------------------------
def nonnegative_lstsq(x: np.ndarray, y: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
    """Weighted least squares with every coefficient >= 0 (an active set: a feature that would get a
    negative coefficient is dropped and the rest refitted)."""
    w = np.ones_like(y) if w is None else w
    active = [i for i in range(x.shape[1]) if np.any(x[:, i] != 0)]
    coef = np.zeros(x.shape[1])
    while active:
        xa = x[:, active] * w[:, None]
        scale = np.abs(xa).max(axis=0)
        scale[scale == 0] = 1.0
        sol, *_ = np.linalg.lstsq(xa / scale, y * w, rcond=None)
        sol = sol / scale
        if np.all(sol >= 0):
            coef[:] = 0
            coef[active] = sol
            break
        active.remove(active[int(np.argmin(sol))])
    return coef


def _wake_bands(raw: Any) -> tuple[tuple[float, float], ...]:
    """`idle_wake_by_idle` checked: pairs [idle_s > 0, wake_s in [0, MAX_WAKE_S)], strictly increasing idle."""
    if raw is None:
        return ()
    if not isinstance(raw, (list, tuple)):
        raise ValueError(f"cost model: idle_wake_by_idle must be a list of [idle_s, wake_s] pairs, got {raw!r}")
    out: list[tuple[float, float]] = []
    for i, pair in enumerate(raw):
        ok = (isinstance(pair, (list, tuple)) and len(pair) == 2
              and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in pair))
        if (not ok or not 0 < pair[0] < math.inf or not 0.0 <= pair[1] < MAX_WAKE_S
                or (out and pair[0] <= out[-1][0])):
            raise ValueError(f"cost model: idle_wake_by_idle[{i}] = {pair!r}: need [idle_s > 0 and finite, "
                             f"wake_s in [0, {MAX_WAKE_S:g})] with idle_s increasing")
        out.append((float(pair[0]), float(pair[1])))
    return tuple(out)


# A host that waited at least this long for an iteration's tokens was bound by the device then.
DEVICE_BOUND_WAIT_S = 2e-4
MIN_SPLIT_SAMPLES = 50  # per regime, for a max(host, device) fit


def _fit_relative(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    coef = nonnegative_lstsq(x, y, 1.0 / y)
    for _ in range(3):  # weights 1 / predicted: relative error, without pulling toward the fast samples
        pred = np.maximum(x @ coef, 0.05 * y.mean())
        coef = nonnegative_lstsq(x, y, 1.0 / pred)
    return coef


def _fit_max_pair(x: np.ndarray, y: np.ndarray, a: int, b: int, rounds: int = 8) -> np.ndarray:
    """Coefficients of sum(c·x) with columns a and b entering as max(c_a·x_a, c_b·x_b): alternately
    give each sample the term that dominates it (first by the larger of x_a, x_b relative to their
    means) and refit; the coefficients of the round with the lowest mean relative error (a term no
    sample takes gets 0, and the model then has the other alone)."""
    best: tuple[float, np.ndarray] | None = None
    coef = None
    for _ in range(rounds):
        if coef is None:
            use_a = x[:, a] / max(float(x[:, a].mean()), 1e-12) >= x[:, b] / max(float(x[:, b].mean()), 1e-12)
        else:
            use_a = coef[a] * x[:, a] >= coef[b] * x[:, b]
        xm = x.copy()
        xm[~use_a, a] = 0.0
        xm[use_a, b] = 0.0
        coef = _fit_relative(xm, y)
        pred = x @ coef - np.minimum(coef[a] * x[:, a], coef[b] * x[:, b])  # the larger of the two, not their sum
        err = float(np.mean(np.abs(pred - y) / y))
        if best is None or err < best[0]:
            best = (err, coef)
    return best[1]


def fit(shapes: Sequence[IterationShape], seconds: Sequence[float], *, decode_buckets: Sequence[int] = (),
        token_buckets: Sequence[int] = (), max_rows: int = 0, idle_wake_s: float = 0.0,
        decode_splits: Mapping[str, int] | None = None, sync_waits: Sequence[float] | None = None) -> CostModel:
    """Fit each regime by least squares on the relative error, coefficients >= 0. The weights are
    1 / predicted seconds (iterated from 1 / measured): weighting by the measured time itself would
    pull the fit toward the iterations that happened to run fast, and a simulated latency is a sum of
    iteration times, which must come out right on average.
    A regime without samples takes the other's coefficients where the features mean the same.
    `sync_waits` (how long the host waited for each iteration's tokens, overlapped iterations on a
    GPU): the `host` model is fitted to gap - wait on every iteration and the regime's device model to
    the gaps of the iterations the host waited for (>= DEVICE_BOUND_WAIT_S), and an iteration costs
    the larger, and the device's mixed attention as the larger of its work and its longest walk
    (`attention_max`); when either regime has fewer than MIN_SPLIT_SAMPLES such iterations, one
    linear model."""
    if len(shapes) != len(seconds) or not shapes:
        raise ValueError(f"fit needs as many timings as shapes (got {len(shapes)} shapes, {len(seconds)} timings)")
    y_all = np.asarray(seconds, dtype=np.float64)
    if not np.all(y_all > 0):
        raise ValueError("fit: every timing must be > 0 seconds")
    splits = dict(decode_splits) if decode_splits else None
    skeleton = CostModel({"format": COST_FORMAT, "decode": {}, "mixed": {}, "decode_buckets": list(decode_buckets),
                          "token_buckets": list(token_buckets), "max_rows": int(max_rows), "decode_splits": splits})
    rows: dict[str, list[tuple[float, ...]]] = {"decode": [], "mixed": []}
    ys: dict[str, list[float]] = {"decode": [], "mixed": []}
    waits: dict[str, list[float]] = {"decode": [], "mixed": []}
    if sync_waits is not None and len(sync_waits) != len(shapes):
        raise ValueError(f"fit: {len(sync_waits)} waits for {len(shapes)} shapes")
    for i, (s, y) in enumerate(zip(shapes, y_all)):
        regime, x = skeleton.features(s)
        rows[regime].append(x)
        ys[regime].append(float(y))
        waits[regime].append(float(sync_waits[i]) if sync_waits is not None else 0.0)
    split = sync_waits is not None and all(
        sum(w >= DEVICE_BOUND_WAIT_S for w in waits[r]) >= MIN_SPLIT_SAMPLES for r in REGIMES)
    coefs: dict[str, dict[str, float]] = {}
    host: dict[str, dict[str, float]] = {}
    for regime, names in REGIMES.items():
        if not rows[regime]:
            continue
        x, y = np.array(rows[regime]), np.array(ys[regime])
        if split:
            w = np.array(waits[regime])
            bound = w >= DEVICE_BOUND_WAIT_S
            dev = (_fit_max_pair(x[bound], y[bound], _ATTN, _WALK) if regime == "mixed"
                   else _fit_relative(x[bound], y[bound]))
            coefs[regime] = dict(zip(names, (float(v) for v in dev)))
            h = np.maximum(y - w, 1e-6)
            host[regime] = dict(zip(names, (float(v) for v in _fit_relative(x, h))))
        else:
            coefs[regime] = dict(zip(names, (float(v) for v in _fit_relative(x, y))))
    if "decode" not in coefs:
        m = coefs["mixed"]
        coefs["decode"] = {"constant": m["constant"], "rows": m["rows"] + m["decode_rows"],
                           "context": m["decode_context"], "max_context": m["decode_max_context"]}
    if "mixed" not in coefs:
        d = coefs["decode"]
        coefs["mixed"] = {"constant": d["constant"], "rows": d["rows"], "decode_rows": d["padded_rows"],
                          "decode_context": d["context"], "decode_max_context": d["max_context"]}
    return CostModel({"format": COST_FORMAT, **coefs, "decode_buckets": list(decode_buckets),
                      "token_buckets": list(token_buckets), "max_rows": int(max_rows), "idle_wake_s": float(idle_wake_s),
                      "decode_splits": splits, **({"host": host, "attention_max": True} if split else {})})


def relative_errors(model: CostModel, shapes: Sequence[IterationShape], seconds: Sequence[float]) -> np.ndarray:
    """|predicted - measured| / measured per shape."""
    pred = np.array([model.predict(s) for s in shapes])
    y = np.asarray(seconds, dtype=np.float64)
    return np.abs(pred - y) / y


def regime_errors(model: CostModel, shapes: Sequence[IterationShape], seconds: Sequence[float]) -> dict[str, Any]:
    """Per regime: samples, mean and median relative error, and the bias of the total time
    (sum predicted / sum measured - 1: what accumulates into a request's latency)."""
    out: dict[str, Any] = {}
    for regime in REGIMES:
        idx = [i for i, s in enumerate(shapes) if (regime == "decode") == s.decode_only]
        if not idx:
            continue
        y = np.array([seconds[i] for i in idx])
        p = np.array([model.predict(shapes[i]) for i in idx])
        err = np.abs(p - y) / y
        out[regime] = {"samples": len(idx), "mean_rel_error": float(err.mean()),
                       "median_rel_error": float(np.median(err)), "total_bias": float(p.sum() / y.sum() - 1)}
    return out
