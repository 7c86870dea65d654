"""Which tile each decode launch of the Triton attention backend uses. Unsplit decode and split-KV
decode have their own defaults and overrides. The kernels are stood in for by recorders, so no GPU
runs, but the backend's module imports Triton: marked `cuda` so the CUDA suite (where Triton is
installed) selects it; it also runs on any machine with Triton."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")  # the backend module imports its kernels; none of them runs here
pytestmark = pytest.mark.cuda

from batchdeck.engine.attention import triton_backend  # noqa: E402
from batchdeck.engine.attention.triton_backend import TritonBackend  # noqa: E402


class Recorder:
    def __init__(self, name: str, calls: list):
        self.name, self.calls = name, calls

    def __getitem__(self, grid):
        return lambda *args, **kw: self.calls.append((self.name, kw.get("BLOCK_N"), kw.get("num_warps"),
                                                      kw.get("num_stages"), kw.get("USE_ORDER")))


@pytest.fixture
def launches(monkeypatch):
    calls: list = []
    for name in ("paged_attention_kernel", "paged_decode_split_kernel", "decode_split_combine_kernel"):
        monkeypatch.setattr(triton_backend, name, Recorder(name, calls))
    return calls


def decode(backend: TritonBackend, rows: int, ordered: bool = False, kvh: int = 2) -> None:
    heads, d, bs = 8, 64, 16
    q = torch.zeros(rows, heads, d, dtype=torch.bfloat16)
    cache = torch.zeros(4 * rows, bs, kvh, d, dtype=torch.bfloat16)
    tables = torch.arange(4 * rows, dtype=torch.int32).view(rows, 4)
    backend.attend(q, cache, cache, torch.empty_like(q), tables, torch.arange(rows + 1, dtype=torch.int32),
                   torch.full((rows,), 60, dtype=torch.int32), d ** -0.5, None, decode_only=True,
                   row_order=torch.arange(rows, dtype=torch.int32) if ordered else None)


def test_unsplit_and_split_decode_take_their_own_tiles(launches, monkeypatch):
    for name in ("BATCHDECK_ATTN_DECODE", "BATCHDECK_ATTN_DECODE_SPLIT", "BATCHDECK_ATTN_DECODE_FEW"):
        monkeypatch.delenv(name, raising=False)  # a tuning session may export them
    backend = TritonBackend()
    assert backend.decode_cfg == (64, 2, 3) and backend.split_cfg == (64, 4, 2) and backend.few_waves_cfg == (128, 4, 3)
    backend.num_sms = 132
    decode(backend, 600)  # 600 rows x 2 KV heads: one unsplit launch of many programs
    decode(backend, 1)  # one row: split-KV, then the combine
    assert launches[0] == ("paged_attention_kernel", 64, 2, 3, False)
    assert launches[1] == ("paged_decode_split_kernel", 64, 4, 2, None)
    assert launches[2][0] == "decode_split_combine_kernel" and len(launches) == 3


def test_launches_of_few_programs_take_their_own_tile_and_every_one_its_row_order(launches, monkeypatch):
    for name in ("BATCHDECK_ATTN_DECODE", "BATCHDECK_ATTN_DECODE_FEW"):
        monkeypatch.delenv(name, raising=False)
    backend = TritonBackend()
    backend.num_sms = 132
    decode(backend, 128, ordered=True)  # 256 programs
    decode(backend, 512, ordered=True)  # 1,024
    decode(backend, 513, ordered=True)  # 1,026: the two-per-SM tile
    decode(backend, 128)  # no order given
    assert [c[1:4] for c in launches] == [(128, 4, 3), (128, 4, 3), (64, 2, 3), (128, 4, 3)]
    assert [c[4] for c in launches] == [True, True, True, False]  # USE_ORDER
    monkeypatch.setenv("BATCHDECK_ATTN_DECODE_FEW", "64,4,4")
    launches.clear()
    decode(TritonBackend(), 132, ordered=True)
    assert launches[0][1:4] == (64, 4, 4)


def test_tiles_are_overridden_separately(launches, monkeypatch):
    monkeypatch.setenv("BATCHDECK_ATTN_DECODE", "32,4,2")
    monkeypatch.setenv("BATCHDECK_ATTN_DECODE_SPLIT", "128,8,3")
    backend = TritonBackend()
    backend.num_sms = 132
    decode(backend, 600)
    decode(backend, 1)
    assert [c[1:4] for c in launches[:2]] == [(32, 4, 2), (128, 8, 3)]
    monkeypatch.setenv("BATCHDECK_ATTN_DECODE_SPLIT", "128,8")
    with pytest.raises(ValueError, match="BATCHDECK_ATTN_DECODE_SPLIT='128,8': expected 3"):
        TritonBackend()
