"""Maps each request to its block table (and, for codecs that keep per-sequence storage, its
sequence slot) and grows it as tokens are scheduled."""
from __future__ import annotations

from bitfold.core.block_pool import BlockPool
from bitfold.core.request import Request


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class KVManager:
    """`num_seq_slots` > 0: every request holding blocks also holds one of that many sequence
    slots (a KIVI codec's 16-bit residual window lives there), taken with its first blocks
    and given back with them, so a slot never outlives or leaks past its request."""

    def __init__(self, pool: BlockPool, block_size: int, num_seq_slots: int = 0):
        self.pool = pool
        self.block_size = block_size
        self._tables: dict[str, list[int]] = {}
        self.slots = BlockPool(num_seq_slots) if num_seq_slots else None
        self._slot_of: dict[str, int] = {}

    def block_table(self, req: Request) -> list[int]:
        return self._tables.get(req.request_id, [])

    def seq_slot(self, req: Request) -> int:
        return self._slot_of.get(req.request_id, -1)

    def allocate_slots(self, req: Request, num_new_tokens: int) -> bool:
        """Make room for tokens [num_computed, num_computed + num_new_tokens); False (and no
        change) when the pool (or the sequence slots) are short."""
        table = self._tables.get(req.request_id)
        need = blocks_for(req.num_computed_tokens + num_new_tokens, self.block_size) - len(table or [])
        if need <= 0:
            return True
        new_slot = table is None and self.slots is not None
        slot = None
        if new_slot:
            got_slot = self.slots.allocate(1)
            if got_slot is None:
                return False
            slot = got_slot[0]
        got = self.pool.allocate(need)
        if got is None:
            if slot is not None:
                self.slots.free([slot])
            return False
        if table is None:
            table = self._tables[req.request_id] = []
        if slot is not None:
            self._slot_of[req.request_id] = slot
        table.extend(got)
        return True

    def fork(self, parent: Request, child: Request) -> None:
        """Let `child` share every block of `parent` (prefix sharing: the seam for later)."""
        if self.slots is not None:
            raise NotImplementedError("forking a request whose KV codec keeps per-sequence state")
        table = self._tables.get(parent.request_id, [])
        self.pool.share(table)
        self._tables[child.request_id] = list(table)

    def free(self, req: Request) -> None:
        table = self._tables.pop(req.request_id, None)
        if table:
            self.pool.free(table)
        slot = self._slot_of.pop(req.request_id, None)
        if slot is not None:
            self.slots.free([slot])

    @property
    def num_tables(self) -> int:
        return len(self._tables)
