"""How much KV memory a block costs, and how many blocks a budget buys."""
from __future__ import annotations

from dataclasses import dataclass

from bitfold.kvcache.codecs import KVCodec


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    codec: KVCodec
    num_seqs: int = 0  # per-sequence slots the codec keeps outside the pages (residual windows)

    @property
    def page_size_bytes(self) -> int:
        """Bytes one block costs across all layers, K and V."""
        return self.num_layers * self.codec.page_bytes(self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def fixed_bytes(self) -> int:
        """Bytes the codec keeps per sequence slot outside the pages, for all slots and layers."""
        return self.num_seqs * self.num_layers * self.codec.seq_bytes(self.block_size, self.num_kv_heads, self.head_dim)

    def num_blocks_for(self, budget_bytes: int) -> int:
        return int(max(budget_bytes - self.fixed_bytes, 0) // self.page_size_bytes)

    def bytes_per_token(self, context: int) -> float:
        """KV bytes one sequence of `context` tokens costs (its pages, rounded up, and its slot),
        across all layers: what capacity per codec is compared by."""
        pages = -(-context // self.block_size)
        seq = self.num_layers * self.codec.seq_bytes(self.block_size, self.num_kv_heads, self.head_dim)
        return (pages * self.page_size_bytes + seq) / context
