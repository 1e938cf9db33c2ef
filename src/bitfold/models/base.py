"""What every model gets per forward step, and the architecture registry."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from bitfold.attention.base import AttentionBackend, AttentionMetadata
from bitfold.registry import Registry


@dataclass
class StepContext:
    """Handed explicitly through the forward pass (no global state).

    positions: int64 [T]; kv_caches: one storage tuple per layer (the codec's layout)."""

    positions: torch.Tensor
    attn: AttentionMetadata
    kv_caches: list[tuple[torch.Tensor, ...]]
    backend: AttentionBackend


MODELS: Registry[type] = Registry("model architecture")
