"""Iteration time as a linear model of the iteration's shape, fitted by least squares.

An iteration (a `StepPlan`) is described by five features:

- `constant`: 1 (launch and per-step overhead: the floor of a small decode step);
- `prefill_tokens`: tokens of multi-token rows (prefill chunks, and speculative verifications, which
  are a request catching up k + 1 tokens);
- `prefill_attention`: the attention work of those rows, sum of n * (ctx + (n + 1) / 2) over rows of
  n new tokens after ctx cached ones, in millions;
- `decode_rows`: one-token rows (decodes and the padding rows of static batches, which are computed);
- `decode_context`: the KV those rows read, sum of (ctx + 1), in thousands of tokens.

seconds = sum(coefficient[f] * feature[f]). `fit` keeps every coefficient but the constant >= 0
(a feature that would get a negative one is dropped and the rest refitted).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

FEATURES = ("constant", "prefill_tokens", "prefill_attention", "decode_rows", "decode_context")


@dataclass(frozen=True)
class IterationShape:
    """What an iteration computes, as the cost model sees it."""

    prefill_tokens: int = 0
    prefill_attention: float = 0.0  # sum n * (ctx + (n + 1) / 2), in millions
    decode_rows: int = 0
    decode_context: float = 0.0  # sum (ctx + 1) over decode rows, in thousands

    def features(self) -> tuple[float, ...]:
        return (1.0, float(self.prefill_tokens), self.prefill_attention, float(self.decode_rows),
                self.decode_context)

    @classmethod
    def of_rows(cls, rows: Iterable[tuple[int, int]]) -> "IterationShape":
        """From (context, new tokens) per row."""
        pt = dr = 0
        pa = dc = 0.0
        for ctx, n in rows:
            if n == 1:
                dr += 1
                dc += ctx + 1
            else:
                pt += n
                pa += n * (ctx + (n + 1) / 2)
        return cls(pt, pa / 1e6, dr, dc / 1e3)


@dataclass(frozen=True)
class CostModel:
    coefficients: dict[str, float]

    def __post_init__(self) -> None:
        unknown = sorted(set(self.coefficients) - set(FEATURES))
        if unknown:
            raise ValueError(f"cost model: unknown feature(s) {', '.join(unknown)}; known: {', '.join(FEATURES)}")
        for k, v in self.coefficients.items():
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not np.isfinite(v):
                raise ValueError(f"cost model: coefficient {k}={v!r} is not a finite number")
        object.__setattr__(self, "_c", tuple(float(self.coefficients.get(f, 0.0)) for f in FEATURES))

    def predict(self, shape: IterationShape) -> float:
        c = self._c
        return max(0.0, c[0] + c[1] * shape.prefill_tokens + c[2] * shape.prefill_attention
                   + c[3] * shape.decode_rows + c[4] * shape.decode_context)

    def plan_seconds(self, chunks) -> float:
        """The modelled duration of a plan's chunks (the hot path: one pass, no objects)."""
        c0, c1, c2, c3, c4 = self._c
        pt = dr = 0
        pa = dc = 0.0
        for ch in chunks:
            n = ch.num_tokens
            if n == 1:
                dr += 1
                dc += ch.start + 1
            else:
                pt += n
                pa += n * (ch.start + (n + 1) * 0.5)
        t = c0 + c1 * pt + c2 * pa * 1e-6 + c3 * dr + c4 * dc * 1e-3
        return t if t > 0.0 else 0.0

    def to_dict(self) -> dict[str, float]:
        return {f: float(self.coefficients.get(f, 0.0)) for f in FEATURES}


def fit(shapes: Sequence[IterationShape], seconds: Sequence[float]) -> CostModel:
    """Least squares of `seconds` on the shapes' features, coefficients other than the constant >= 0,
    each sample weighted by 1 / seconds (so the fit minimizes relative, not absolute, error)."""
    if len(shapes) != len(seconds) or not shapes:
        raise ValueError(f"fit needs as many timings as shapes (got {len(shapes)} shapes, {len(seconds)} timings)")
    x = np.array([s.features() for s in shapes], dtype=np.float64)
    y = np.asarray(seconds, dtype=np.float64)
    if not np.all(y > 0):
        raise ValueError("fit: every timing must be > 0 seconds")
    w = 1.0 / y
    active = [i for i in range(len(FEATURES)) if i == 0 or np.any(x[:, i] != 0)]
    while True:
        xa = x[:, active] * w[:, None]
        scale = np.abs(xa).max(axis=0)
        scale[scale == 0] = 1.0
        coef, *_ = np.linalg.lstsq(xa / scale, y * w, rcond=None)
        coef = coef / scale
        negative = [(coef[j], active[j]) for j in range(len(active)) if active[j] != 0 and coef[j] < 0]
        if not negative:
            break
        active.remove(min(negative)[1])
    full = {f: 0.0 for f in FEATURES}
    for j, i in enumerate(active):
        full[FEATURES[i]] = float(coef[j])
    return CostModel(full)


def relative_errors(model: CostModel, shapes: Sequence[IterationShape], seconds: Sequence[float]) -> np.ndarray:
    """|predicted - measured| / measured per shape."""
    pred = np.array([model.predict(s) for s in shapes])
    y = np.asarray(seconds, dtype=np.float64)
    return np.abs(pred - y) / y
