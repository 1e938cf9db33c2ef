"""The KV codec interface: a codec says how many bytes a page costs, owns its page layout and
names the kernels (per attention backend) that write and read it.

The block pool budgets memory from `page_bytes` alone (vLLM's `page_size_bytes`), plus the
codec's fixed per-sequence storage (`seq_bytes`: KIVI's 16-bit residual window), so a 4-bit
codec fits ~3.5x the tokens of bf16 in the same memory with no other change. A codec may ask
for its own block size (`block_size`: KIVI quantizes keys per channel over a page's tokens).
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from bitfold.registry import Registry


class KVCodec(ABC):
    name: str
    default_block_size = 16  # tokens per page when the user does not set --block-size
    rotate = False

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype  # the compute dtype K/V arrive in and are read back as

    @property
    @abstractmethod
    def bits_per_element(self) -> float:
        """Average stored bits per K or V element in a full page, scales included."""

    @property
    def residual(self) -> int:
        """Newest tokens of each sequence kept in the compute dtype outside the pages (0: none)."""
        return 0

    @abstractmethod
    def page_bytes(self, block_size: int, num_kv_heads: int, head_dim: int) -> int:
        """Bytes one block of K *and* V of one layer occupies, scales and zero points included."""

    def seq_bytes(self, block_size: int, num_kv_heads: int, head_dim: int) -> int:
        """Fixed bytes per sequence slot and layer outside the pages (the residual window)."""
        return 0

    def needs_seq_slots(self, block_size: int, num_kv_heads: int, head_dim: int) -> bool:
        """Whether each running sequence needs a slot of per-sequence storage (`seq_bytes`)."""
        return False

    @abstractmethod
    def allocate(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 device: torch.device, num_seqs: int = 0, key_offset: torch.Tensor | None = None):
        """One layer's storage: the pages (and `num_seqs` per-sequence slots, if `seq_bytes`).
        key_offset: [num_kv_heads, head_dim], a constant the layer's keys carry (its k bias), which
        a codec may subtract before storing keys (attention is unchanged by it; quant.py)."""

    @abstractmethod
    def ops(self, backend: str):
        """The `AttentionOps` of backend `backend` that read this codec's pages, or a string that
        says why that backend cannot."""

    def validate(self, block_size: int, head_dim: int, max_model_len: int) -> str | None:
        """Why this codec cannot serve a model/cache shape (None: it can)."""
        return None


KV_CODECS: Registry[type[KVCodec]] = Registry("KV codec")
