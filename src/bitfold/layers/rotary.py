"""Rotary position embedding tables (RoFormer, arXiv 2104.09864) with Llama-3 and linear
scaling, computed exactly as HF transformers does (float32 inv_freq, outer product)."""
from __future__ import annotations

import math

import torch

from bitfold.errors import ModelLoadError
from bitfold.kernels.ops import rotary_op


def _inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        return inv / scaling["factor"]
    if kind == "freq_factors":  # GGUF's rope_freqs tensor (how llama.cpp stores Llama-3.1 scaling)
        return inv / torch.tensor(scaling["factors"], dtype=torch.float32)
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise ModelLoadError(f"rope scaling type {kind!r} is not supported (supported: linear, llama3)")


def cos_sin_cache(head_dim: int, max_positions: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """float32 [max_positions, head_dim]: cos of each frequency in the first half, sin in the second."""
    inv = _inv_freq(head_dim, theta, scaling)
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cache: torch.Tensor):
    """q: [T, H, D], k: [T, KVH, D], positions: int64 [T] -> rotated (q, k)."""
    return rotary_op(q, k, positions, cache)
