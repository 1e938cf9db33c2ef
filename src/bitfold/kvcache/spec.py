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

    @property
    def page_size_bytes(self) -> int:
        """Bytes one block costs across all layers, K and V."""
        return 2 * self.num_layers * self.codec.page_bytes(self.block_size, self.num_kv_heads, self.head_dim)

    def num_blocks_for(self, budget_bytes: int) -> int:
        return int(budget_bytes // self.page_size_bytes)
