"""Fixed-size KV blocks with reference counts and a free list (PagedAttention, arXiv 2309.06180).

Pure bookkeeping: block ids index the runner's KV tensors. A block is free when its count is 0.
Reference counts let several requests share a block (prefix sharing, forked sequences).
"""
from __future__ import annotations

from collections import deque


class BlockPool:
    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"a block pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self._refs = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self, n: int) -> list[int] | None:
        """Take n free blocks (count 1 each), or None and change nothing if fewer are free."""
        if n > len(self._free):
            return None
        out = [self._free.popleft() for _ in range(n)]
        for b in out:
            self._refs[b] = 1
        return out

    def share(self, block_ids: list[int]) -> None:
        """Add a reference to blocks already in use (the caller now co-owns them)."""
        for b in block_ids:
            if self._refs[b] <= 0:
                raise ValueError(f"block {b} is free and cannot be shared")
            self._refs[b] += 1

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference per block; blocks whose count reaches 0 return to the free list."""
        for b in block_ids:
            if self._refs[b] <= 0:
                raise ValueError(f"block {b} freed twice")
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._free.append(b)

    def ref_count(self, block_id: int) -> int:
        return self._refs[block_id]
