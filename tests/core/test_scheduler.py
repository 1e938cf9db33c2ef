"""The scheduler's accounting when a step is scheduled before the previous one's tokens are
known (async scheduling): pending tokens, the one-token decode chunk that reads it from the
device, no step for a request whose pending token is certainly its last, and preemption."""
from bitfold.core.block_pool import BlockPool
from bitfold.core.kv_manager import KVManager
from bitfold.core.request import Request
from bitfold.core.scheduler import Scheduler
from bitfold.sampling import SamplingParams


def _sched(num_blocks=64, block_size=4, budget=64):
    pool = BlockPool(num_blocks)
    return Scheduler(KVManager(pool, block_size), max_num_seqs=8, max_num_batched_tokens=budget), pool


def test_pending_token_is_the_next_chunk_and_resolves_on_update():
    s, _ = _sched()
    r = Request("a", [1, 2, 3], SamplingParams(max_tokens=5))
    s.add(r)
    first = s.schedule()
    (c,) = first.chunks
    assert (c.start, c.num_tokens, c.samples, c.pending) == (0, 3, True, False)
    assert r.num_computed_tokens == 3 and r.num_pending_tokens == 1
    second = s.schedule()  # before `first`'s token is known
    (c2,) = second.chunks
    assert (c2.start, c2.num_tokens, c2.samples, c2.pending) == (3, 1, True, True)
    assert r.num_computed_tokens == 4 and r.num_pending_tokens == 2  # both tokens are still unknown
    s.update(first, {"a": 7})
    assert r.output_token_ids == [7] and r.num_pending_tokens == 1 and r.num_computed_tokens == 4
    s.update(second, {"a": 8})
    assert r.output_token_ids == [7, 8] and r.num_pending_tokens == 0


def test_no_step_for_a_certain_last_token():
    s, pool = _sched()
    r = Request("a", [1, 2], SamplingParams(max_tokens=1))
    s.add(r)
    first = s.schedule()
    assert s.schedule().is_empty  # its pending token is its last: nothing to compute
    s.update(first, {"a": 5})
    assert r.finished and r.finish_reason == "length" and pool.num_free == pool.num_blocks


def test_preempted_with_a_pending_token_recomputes_after_it_resolves():
    s, pool = _sched(num_blocks=3, block_size=2, budget=16)
    old = Request("old", [1, 2, 3], SamplingParams(max_tokens=8))
    new = Request("new", [4, 5], SamplingParams(max_tokens=8))
    s.add(old)
    s.add(new)
    first = s.schedule()  # old: 2 blocks, new: 1 block; the pool is full
    assert [c.request for c in first.chunks] == [old, new]
    second = s.schedule()  # old needs a 3rd block for position 3: the newest request gives way
    assert second.preempted == [new] and [c.request for c in second.chunks] == [old]
    assert new.num_computed_tokens == 0 and new.num_pending_tokens == 1
    s.update(first, {"old": 9, "new": 6})
    assert new.output_token_ids == [6] and new.num_pending_tokens == 0
    s.update(second, {"old": 10})
    s.finish(old, "abort")
    third = s.schedule()
    (c,) = third.chunks
    assert c.request is new and (c.start, c.num_tokens, c.pending, c.samples) == (0, 3, False, True)
