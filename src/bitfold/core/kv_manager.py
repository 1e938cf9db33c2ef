"""Maps each request to its block table and grows it as tokens are scheduled."""
from __future__ import annotations

from bitfold.core.block_pool import BlockPool
from bitfold.core.request import Request


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class KVManager:
    def __init__(self, pool: BlockPool, block_size: int):
        self.pool = pool
        self.block_size = block_size
        self._tables: dict[str, list[int]] = {}

    def block_table(self, req: Request) -> list[int]:
        return self._tables.get(req.request_id, [])

    def allocate_slots(self, req: Request, num_new_tokens: int) -> bool:
        """Make room for tokens [num_computed, num_computed + num_new_tokens); False (and no
        change) when the pool is short."""
        table = self._tables.setdefault(req.request_id, [])
        need = blocks_for(req.num_computed_tokens + num_new_tokens, self.block_size) - len(table)
        if need <= 0:
            return True
        got = self.pool.allocate(need)
        if got is None:
            if not table:
                del self._tables[req.request_id]
            return False
        table.extend(got)
        return True

    def fork(self, parent: Request, child: Request) -> None:
        """Let `child` share every block of `parent` (prefix sharing: the seam for later)."""
        table = self._tables.get(parent.request_id, [])
        self.pool.share(table)
        self._tables[child.request_id] = list(table)

    def free(self, req: Request) -> None:
        table = self._tables.pop(req.request_id, None)
        if table:
            self.pool.free(table)

    @property
    def num_tables(self) -> int:
        return len(self._tables)
