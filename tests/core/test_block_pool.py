import pytest

from bitfold.core.block_pool import BlockPool
from bitfold.core.kv_manager import KVManager
from bitfold.core.request import Request
from bitfold.sampling import SamplingParams


def test_allocate_free_and_exhaustion():
    pool = BlockPool(5)
    a = pool.allocate(3)
    assert len(set(a)) == 3 and pool.num_free == 2
    assert pool.allocate(3) is None and pool.num_free == 2  # all-or-nothing
    b = pool.allocate(2)
    assert pool.num_free == 0 and not set(a) & set(b)
    pool.free(a + b)
    assert pool.num_free == 5


def test_shared_blocks_need_every_reference_dropped():
    pool = BlockPool(4)
    a = pool.allocate(2)
    pool.share(a)
    assert pool.ref_count(a[0]) == 2
    pool.free(a)
    assert pool.num_free == 2  # still held by the second owner
    pool.free(a)
    assert pool.num_free == 4
    with pytest.raises(ValueError, match="freed twice"):
        pool.free(a[:1])
    with pytest.raises(ValueError, match="is free"):
        pool.share(a[:1])


def test_kv_manager_grows_tables_by_block_and_forks():
    pool = BlockPool(8)
    kv = KVManager(pool, block_size=4)
    r = Request("a", [1] * 5, SamplingParams())
    assert kv.allocate_slots(r, 5) and len(kv.block_table(r)) == 2
    r.num_computed_tokens = 5
    assert kv.allocate_slots(r, 3) and len(kv.block_table(r)) == 2  # 8 tokens still fit in 2 blocks
    assert kv.allocate_slots(r, 4) and len(kv.block_table(r)) == 3
    child = Request("b", [1] * 5, SamplingParams())
    kv.fork(r, child)
    assert kv.block_table(child) == kv.block_table(r) and pool.num_free == 5
    kv.free(r)
    assert pool.num_free == 5
    kv.free(child)
    assert pool.num_free == 8 and kv.num_tables == 0
    big = Request("c", [1] * 40, SamplingParams())
    assert not kv.allocate_slots(big, 40) and pool.num_free == 8 and kv.num_tables == 0


def test_token_slice_equals_concatenation():
    r = Request("a", list(range(7)), SamplingParams())
    r.output_token_ids = list(range(100, 105))
    full = r.all_token_ids
    for a in range(13):
        for b in range(a, 13):
            assert r.token_slice(a, b) == full[a:b]
