"""Pluggable paged-attention backends, reached from HF models through `AttentionInterface`."""
from __future__ import annotations

from batchdeck.engine.attention.backend import AttentionBackend, available_backends, make_backend
from batchdeck.engine.attention.metadata import AttentionMetadata, StepContext

__all__ = ["AttentionBackend", "AttentionMetadata", "StepContext", "available_backends", "make_backend"]
