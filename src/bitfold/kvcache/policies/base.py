"""KV eviction policies (kvpress-style): score cached tokens, drop the lowest.

The engine keeps every token today ("none"). A policy (window, SnapKV arXiv 2404.14469, ...)
is one registered class with `select`; the KV manager will apply its choice per block.
"""
from __future__ import annotations

import torch

from bitfold.registry import Registry


class EvictionPolicy:
    name = "none"

    def select(self, scores: torch.Tensor, keep: int) -> torch.Tensor:
        """scores: [num_tokens] importance (higher = keep); return the indices to keep, sorted.
        The base keeps the top-`keep` scores; policies differ in how they score."""
        if keep >= scores.numel():
            return torch.arange(scores.numel())
        return torch.topk(scores, keep).indices.sort().values


EVICTION_POLICIES: Registry[type[EvictionPolicy]] = Registry("eviction policy")
EVICTION_POLICIES.register("none")(EvictionPolicy)
