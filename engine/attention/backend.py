"""The attention-backend interface and its registry.

A backend writes this layer's new K/V into the paged pool and computes causal attention of every
row's new queries over its cached + new keys. Shapes: query [T, H, D], key/value [T, KVH, D];
returns [T, H, D].
"""
from __future__ import annotations

from typing import Protocol

import torch

from batchdeck.engine.attention.metadata import AttentionMetadata


class AttentionBackend(Protocol):
    name: str

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata, scaling: float,
                sliding_window: int | None) -> torch.Tensor: ...


def available_backends() -> tuple[str, ...]:
    names = ["torch"]
    try:
        import triton  # noqa: F401

        if torch.cuda.is_available():
            names.append("triton")
    except ImportError:
        pass
    return tuple(names)


def make_backend(name: str, device: torch.device) -> AttentionBackend:
    """`auto` picks triton on CUDA when importable, else the torch reference backend."""
    if name == "auto":
        name = "triton" if device.type == "cuda" and "triton" in available_backends() else "torch"
    if name == "torch":
        from batchdeck.engine.attention.torch_backend import TorchReferenceBackend

        return TorchReferenceBackend()
    if name == "triton":
        if device.type != "cuda":
            raise ValueError("attention backend 'triton' needs a CUDA device")
        from batchdeck.engine.attention.triton_backend import TritonBackend

        return TritonBackend()
    raise ValueError(f"unknown attention backend {name!r}: allowed auto, torch, triton")
