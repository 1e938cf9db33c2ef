"""Scatter the new tokens' K and V into the paged KV cache (PagedAttention, arXiv 2309.06180).

Layout (fixed, the engine relies on it): per layer `k_cache` and `v_cache` are each
`[num_blocks, block_size, num_kv_heads, head_dim]`, contiguous. A flat slot
`block_id * block_size + offset` therefore addresses one `[num_kv_heads, head_dim]` row of
the cache viewed as `[num_blocks * block_size, num_kv_heads, head_dim]`.
"""
import torch

from bitfold.kernels._triton import FLOAT_DTYPES, jit, next_pow2, require, require_launchable, tl


@jit
def _write_kv_kernel(k_cache, v_cache, k, v, slot_mapping, ROW: tl.constexpr, BLOCK: tl.constexpr):
    # One program per (token, chunk of its ROW = num_kv_heads * head_dim elements): the token's
    # whole row is contiguous in both the input and the cache, so this is a plain strided copy.
    t = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    slot = tl.load(slot_mapping + t)  # int64: slot * ROW overflows int32 on large caches
    if slot < 0:
        return  # padding token: write nothing
    mask = offs < ROW
    src = t.to(tl.int64) * ROW + offs
    dst = slot * ROW + offs
    tl.store(k_cache + dst, tl.load(k + src, mask=mask), mask=mask)
    tl.store(v_cache + dst, tl.load(v + src, mask=mask), mask=mask)


def _check(k_cache, v_cache, k, v, slot_mapping):
    require(k_cache.dim() == 4, f"k_cache must be [num_blocks, block_size, num_kv_heads, head_dim], got {tuple(k_cache.shape)}")
    require(v_cache.shape == k_cache.shape, f"v_cache {tuple(v_cache.shape)} != k_cache {tuple(k_cache.shape)}")
    require(k.dim() == 3 and k.shape == v.shape, f"k {tuple(k.shape)} and v {tuple(v.shape)} must both be [T, num_kv_heads, head_dim]")
    require(k.shape[1:] == k_cache.shape[2:], f"k rows {tuple(k.shape[1:])} do not match the cache's {tuple(k_cache.shape[2:])}")
    require(slot_mapping.shape == (k.shape[0],), f"slot_mapping must be [T={k.shape[0]}], got {tuple(slot_mapping.shape)}")
    require(slot_mapping.dtype == torch.int64, f"slot_mapping must be int64, got {slot_mapping.dtype}")
    require(k_cache.dtype in FLOAT_DTYPES, f"unsupported cache dtype {k_cache.dtype}")
    require(k.dtype == v.dtype == k_cache.dtype == v_cache.dtype,
            f"dtypes differ: k {k.dtype}, v {v.dtype}, k_cache {k_cache.dtype}, v_cache {v_cache.dtype}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("k", k), ("v", v), ("slot_mapping", slot_mapping)):
        require(t.is_contiguous(), f"{name} must be contiguous")


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor, *, block: int = 1024, num_warps: int = 4) -> None:
    """Write `k`, `v` into the paged caches in place.

    k_cache, v_cache: `[num_blocks, block_size, num_kv_heads, head_dim]`, contiguous.
    k, v: `[T, num_kv_heads, head_dim]`, same dtype as the caches.
    slot_mapping: int64 `[T]`, `block_id * block_size + offset`; a negative slot skips the token.
    `block`: elements one program copies (tuning knob; a power of two).
    """
    _check(k_cache, v_cache, k, v, slot_mapping)
    T = k.shape[0]
    if T == 0:
        return
    require_launchable(k_cache, v_cache, k, v, slot_mapping)
    row = k.shape[1] * k.shape[2]
    BLOCK = min(next_pow2(row), block)
    grid = (T, -(-row // BLOCK))
    _write_kv_kernel[grid](k_cache, v_cache, k, v, slot_mapping, ROW=row, BLOCK=BLOCK, num_warps=num_warps)


def write_kv_ref(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    """Pure-PyTorch `write_kv`: same arguments, same in-place effect."""
    _check(k_cache, v_cache, k, v, slot_mapping)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    # A view of the cache as one row per slot, so index_copy_ writes straight into it.
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k[keep])
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v[keep])
