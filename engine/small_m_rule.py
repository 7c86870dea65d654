"""The launch configurations of the small-M linear (engine/small_m_linear.py) and the rule that picks
one from the shape: pure Python, so the rule is tested against the saved H200 measurement without a
GPU or Triton."""
from __future__ import annotations

from dataclasses import dataclass

# The kernel runs at most this many rows (the `dot` mode pads them to a row tile of 16, 32 or 64); the
# rule sends a shape to it only where it measured faster than cuBLAS, else to cuBLAS.
MAX_ROWS = 64
DOT_ROWS = 16  # the smallest row tile of the `dot` mode (tl.dot's smallest)
FMA_MAX_ROWS = 4


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class SmallMConfig:
    """One launch configuration. mode 'dot' (tensor cores, rows padded to 16) or 'fma' (M <= 4)."""
    mode: str
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3

    def label(self) -> str:
        return f"{self.mode} n{self.block_n} k{self.block_k} s{self.split_k} w{self.num_warps} st{self.num_stages}"


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def block_m_for(mode: str, m: int) -> int:
    return max(DOT_ROWS, _pow2(m)) if mode == "dot" else _pow2(m)


def fits(config: SmallMConfig, m: int, n: int, k: int, silu: bool = False) -> bool:
    """Whether the config can run (m, n, k): rows within its mode, register tile of the fma mode bounded
    (twice the tile with `silu`: a gate and an up accumulator), every K slice at least one BLOCK_K step."""
    if m < 1 or m > MAX_ROWS or (config.mode == "fma" and m > FMA_MAX_ROWS):
        return False
    accumulators = 2 if silu else 1
    if (config.mode == "fma"
            and accumulators * config.block_n * _pow2(m) * config.block_k > 64 * 32 * config.num_warps):
        return False
    return config.split_k == 1 or _cdiv(k, config.split_k) >= config.block_k


# Candidates the GPU benchmark measures; `pick_config` chooses among them by shape.
# (BLOCK_N, BLOCK_K, num_stages): 4 K steps in flight, or 2 with a smaller shared-memory footprint
DOT_TILES = [(16, 128, 4), (16, 256, 4), (32, 128, 4), (32, 256, 4), (64, 128, 4), (16, 256, 2), (32, 256, 2)]
# More than 16 rows (row tiles of 32 or 64): (BLOCK_N, BLOCK_K, num_stages, num_warps)
WIDE_DOT_TILES = [(32, 128, 4, 4), (64, 64, 6, 4), (64, 128, 4, 4), (64, 128, 4, 8), (128, 64, 4, 4),
                  (128, 64, 4, 8), (128, 128, 3, 8), (64, 256, 3, 4)]
FMA_TILES = [(8, 256), (16, 128), (8, 512), (8, 1024)]  # (BLOCK_N, BLOCK_K)
SPLITS = (1, 2, 4, 8)


SHARED_MEMORY_BYTES = 232448  # per block on sm_90 (H100 / H200)


def shared_memory_estimate(config: SmallMConfig, elem_bytes: int = 2, silu: bool = False,
                           m: int = DOT_ROWS) -> int:
    """An upper bound of a `dot` config's pipelined tiles in shared memory at m rows: num_stages x (weight
    tile(s) + the x tile) (the fma mode keeps its tiles in registers)."""
    if config.mode != "dot":
        return 0
    rows = block_m_for("dot", m)
    per_stage = (config.block_n * config.block_k * (2 if silu else 1) + config.block_k * rows) * elem_bytes
    return config.num_stages * per_stage


def candidate_configs(m: int, n: int, k: int, elem_bytes: int = 2, silu: bool = False) -> list[SmallMConfig]:
    if m > DOT_ROWS:
        out = [SmallMConfig("dot", bn, bk, s, w, st) for bn, bk, st, w in WIDE_DOT_TILES for s in SPLITS]
    else:
        out = [SmallMConfig("dot", bn, bk, s, 4, st) for bn, bk, st in DOT_TILES for s in SPLITS]
        out += [SmallMConfig("fma", bn, bk, s, 4, 1) for bn, bk in FMA_TILES for s in SPLITS]
    return [c for c in out if fits(c, m, n, k, silu)
            and shared_memory_estimate(c, elem_bytes, silu, m) <= SHARED_MEMORY_BYTES]


# Above 16 rows the x tile every program reads grows with the rows, and cuBLAS's tiles fit better: the
# kernel takes a weight only from this many elements (the gate|up weight counts both halves), up to 32
# rows and above.
WIDE_MIN_WEIGHT_TO_32_ROWS = 1 << 22
WIDE_MIN_WEIGHT = 1 << 25
# Output features of a vocabulary-sized weight (an lm_head): measured from 16 rows only, so fewer rows
# stay with cuBLAS; above 32 rows its tiles are wider.
VOCAB_FEATURES = 32768


def pick_config(m: int, n: int, k: int, sms: int, elem_bytes: int = 2, silu: bool = False) -> SmallMConfig | None:
    """The launch rule (shapes only), set from `benchmarks/gpu_gemv_bench.py` on an H200
    (benchmarks/results/gpu_gemv_h200.json: the best candidate of every qwen3-0.6b / llama-3.1-8b layer
    linear at 1-16 rows). One row and at most 8192 features: `fma` tiles of 8 features, K steps of 1024
    from K = 2048 (else, and for a gate|up's two accumulators, 512), no split. Otherwise `dot` tiles of 64 features and 128-wide K steps, split
    over K (2, 4 or 8) while the tiles are fewer than a third of the SMs or a slice is longer than 4096;
    4 K steps in flight for 16-bit weights, 2 for float32 (shared memory).

    17-64 rows (benchmarks/results/gpu_gemv_h200_wide.json, 16-64 rows, the lm_heads too): only weights
    of at least 4 Mi elements up to 32 rows, 32 Mi above (llama-3.1-8b's gate|up and down_proj, both
    lm_heads); `dot` tiles of 64 features, 128-wide K steps, K split in two past 8192, or above 32 rows
    for a vocabulary-sized weight (VOCAB_FEATURES) tiles of 128 features and 64-wide K steps. A
    vocabulary-sized weight below 16 rows: cuBLAS (not measured there). None: cuBLAS."""
    if m < 1 or m > MAX_ROWS or (n >= VOCAB_FEATURES and m < DOT_ROWS):
        return None
    stages = 4 if elem_bytes <= 2 else 2
    if m > DOT_ROWS:
        if (2 * n if silu else n) * k < (WIDE_MIN_WEIGHT_TO_32_ROWS if m <= 32 else WIDE_MIN_WEIGHT):
            return None
        if m > 32 and n >= VOCAB_FEATURES:
            return SmallMConfig("dot", 128, 64, 1, 4, stages)
        return SmallMConfig("dot", 64, 128, 2 if k > 8192 else 1, 4, stages)
    if m == 1 and n <= 8192:
        return SmallMConfig("fma", 8, 1024 if k >= 2048 and not silu else 512, 1, 4, 1)
    tiles = _cdiv(n, 64)
    split = 1
    while split < 8 and (tiles * split < sms // 3 or _cdiv(k, split) > 4096) and k // (2 * split) >= 128:
        split *= 2
    return SmallMConfig("dot", 64, 128, split, 4, stages)
