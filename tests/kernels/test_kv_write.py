import pytest
import torch

from bitfold.kernels.kv_write import write_kv, write_kv_ref

from ._util import DEVICE, need_triton, randn

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _inputs(dtype, T=9, num_blocks=6, block_size=16, hkv=2, d=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    k_cache = randn(num_blocks, block_size, hkv, d, dtype=dtype, gen=gen)
    v_cache = randn(num_blocks, block_size, hkv, d, dtype=dtype, gen=gen)
    k, v = randn(T, hkv, d, dtype=dtype, gen=gen), randn(T, hkv, d, dtype=dtype, gen=gen)
    # distinct random slots, including the very first and last slot; two padding tokens
    slots = torch.randperm(num_blocks * block_size - 2, generator=gen)[:T - 4] + 1
    slots = torch.cat([slots, torch.tensor([0, num_blocks * block_size - 1, -1, -1])])
    slots = slots[torch.randperm(T, generator=gen)].to(DEVICE)
    return k_cache, v_cache, k, v, slots


@pytest.mark.parametrize("dtype", DTYPES)
def test_ref_matches_loop(dtype):
    k_cache, v_cache, k, v, slots = _inputs(dtype)
    ek, ev = k_cache.clone(), v_cache.clone()
    bs = k_cache.shape[1]
    for t, slot in enumerate(slots.tolist()):  # the paging rule, one token at a time
        if slot >= 0:
            ek[slot // bs, slot % bs], ev[slot // bs, slot % bs] = k[t], v[t]
    write_kv_ref(k_cache, v_cache, k, v, slots)
    assert torch.equal(k_cache, ek) and torch.equal(v_cache, ev)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block", [1024, 32])  # whole row per program / row split in chunks
def test_kernel_matches_ref(dtype, block):
    need_triton()
    k_cache, v_cache, k, v, slots = _inputs(dtype)
    rk, rv = k_cache.clone(), v_cache.clone()
    write_kv_ref(rk, rv, k, v, slots)
    write_kv(k_cache, v_cache, k, v, slots, block=block)
    assert torch.equal(k_cache, rk) and torch.equal(v_cache, rv)  # a copy: bit exact, untouched slots kept


def test_empty_and_bad_inputs():
    k_cache, v_cache, k, v, slots = _inputs(torch.float32)
    before = k_cache.clone()
    for fn in (write_kv, write_kv_ref):
        fn(k_cache, v_cache, k[:0], v[:0], slots[:0])
        assert torch.equal(k_cache, before)
        with pytest.raises(ValueError, match="slot_mapping must be int64"):
            fn(k_cache, v_cache, k, v, slots.int())
        with pytest.raises(ValueError, match="dtypes differ"):
            fn(k_cache, v_cache, k.half(), v.half(), slots)
        with pytest.raises(ValueError, match="do not match the cache"):
            fn(k_cache, v_cache, k[:, :1].contiguous(), v[:, :1].contiguous(), slots)
