"""Uncompressed K/V in the compute dtype: the reference every compressed codec is judged by."""
from __future__ import annotations

import torch

from bitfold.kernels.kv_write import write_kv, write_kv_ref
from bitfold.kvcache.codecs.base import KV_CODECS, KVCodec


@KV_CODECS.register("dense", "auto")
class DenseCodec(KVCodec):
    name = "dense"

    @property
    def bits_per_element(self) -> float:
        return torch.finfo(self.dtype).bits

    def page_bytes(self, block_size: int, num_kv_heads: int, head_dim: int) -> int:
        return block_size * num_kv_heads * head_dim * torch.finfo(self.dtype).bits // 8

    def allocate(self, num_blocks, block_size, num_kv_heads, head_dim, device):
        # Uninitialized: attention never uses a slot before writing it (kernels mask their
        # loads, references mask values), and zero-filling 2 GiB on a CPU costs seconds.
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        return torch.empty(shape, dtype=self.dtype, device=device), torch.empty(shape, dtype=self.dtype, device=device)

    def write(self, storage, k, v, slot_mapping) -> None:
        k_cache, v_cache = storage
        fn = write_kv if k_cache.is_cuda else write_kv_ref
        fn(k_cache, v_cache, k, v, slot_mapping)
