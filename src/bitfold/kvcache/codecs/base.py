"""The KV codec interface: a codec says how many bytes a page costs and owns its storage.

The block pool budgets memory from `page_bytes` alone (vLLM's `page_size_bytes`), so a 4-bit
codec fits ~4x the tokens of bf16 in the same memory with no other change. Compressed codecs
(int8/int4/int2 pages with per-group scales, KIVI arXiv 2402.02750) add an entry here and an
attention backend that reads their pages.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from bitfold.registry import Registry


class KVCodec(ABC):
    name: str
    bits_per_element: float

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype  # the compute dtype K/V arrive in and are read back as

    @abstractmethod
    def page_bytes(self, block_size: int, num_kv_heads: int, head_dim: int) -> int:
        """Bytes one block of K *or* V of one layer occupies, scales and metadata included."""

    @abstractmethod
    def allocate(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 device: torch.device) -> tuple[torch.Tensor, ...]:
        """Storage for one layer's K and V pages."""

    @abstractmethod
    def write(self, storage: tuple[torch.Tensor, ...], k: torch.Tensor, v: torch.Tensor,
              slot_mapping: torch.Tensor) -> None:
        """Store new tokens. k, v: [T, num_kv_heads, head_dim]; slot_mapping: int64 [T]
        (block_id * block_size + offset; negative = skip)."""


KV_CODECS: Registry[type[KVCodec]] = Registry("KV codec")
