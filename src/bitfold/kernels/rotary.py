"""Rotary position embedding, neox / HF "rotate_half" layout (RoFormer, Su et al.,
arXiv 2104.09864).

For a head vector `x = [x1, x2]` (halves of `head_dim`) at position p:
`out = [x1*cos - x2*sin, x2*cos + x1*sin]`, which is HF's
`x * cat(cos, cos) + rotate_half(x) * cat(sin, sin)` with `rotate_half(x) = [-x2, x1]`.
`cos_sin_cache[p]` holds `[cos(p*f_0..f_{d/2-1}), sin(...)]` in float32 so the long-context
angles keep their precision; the rotation is computed in float32 and rounded once.
"""
import torch

from bitfold.kernels._triton import (FLOAT_DTYPES, jit, next_pow2, pdl_kwargs, pdl_trigger, pdl_wait, require,
                                     require_launchable, tl)


@jit
def _rotate_heads(src, dst, t, stride_t, n_heads, cos, sin, HALF: tl.constexpr,
                  BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    # All heads of one token at once: the token's cos/sin row is loaded once and broadcast. The
    # source's tokens are stride_t apart (a slice of a fused q|k|v row); the output is contiguous.
    heads = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < n_heads) & (d < HALF)
    inner = heads * 2 * HALF + d
    src_base = t * stride_t + inner
    base = t * n_heads * 2 * HALF + inner
    x1 = tl.load(src + src_base, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + src_base + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(dst + base, (x1 * cos - x2 * sin).to(dst.dtype.element_ty), mask=mask)
    tl.store(dst + base + HALF, (x2 * cos + x1 * sin).to(dst.dtype.element_ty), mask=mask)


@jit
def _rotary_kernel(q, k, q_out, k_out, positions, cos_sin_cache, num_heads, num_kv_heads, stride_q, stride_k,
                   HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_HQ: tl.constexpr,
                   BLOCK_HK: tl.constexpr, PDL: tl.constexpr):
    pdl_trigger(PDL)
    pdl_wait(PDL)
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions + t)
    d = tl.arange(0, BLOCK_HALF)[None, :]
    cos = tl.load(cos_sin_cache + pos * 2 * HALF + d, mask=d < HALF, other=0.0)
    sin = tl.load(cos_sin_cache + pos * 2 * HALF + HALF + d, mask=d < HALF, other=0.0)
    _rotate_heads(q, q_out, t, stride_q, num_heads, cos, sin, HALF, BLOCK_HQ, BLOCK_HALF)
    _rotate_heads(k, k_out, t, stride_k, num_kv_heads, cos, sin, HALF, BLOCK_HK, BLOCK_HALF)


def _check(q, k, positions, cos_sin_cache):
    require(q.dim() == 3 and k.dim() == 3, f"q, k must be [T, heads, head_dim], got {tuple(q.shape)}, {tuple(k.shape)}")
    T, _, D = q.shape
    require(k.shape[0] == T and k.shape[2] == D, f"k {tuple(k.shape)} does not match q {tuple(q.shape)}")
    require(D % 2 == 0, f"head_dim must be even, got {D}")
    require(positions.shape == (T,) and positions.dtype == torch.int64, f"positions must be int64 [T={T}], got {positions.dtype} {tuple(positions.shape)}")
    require(cos_sin_cache.dim() == 2 and cos_sin_cache.shape[1] == D,
            f"cos_sin_cache must be [max_pos, rotary_dim == head_dim={D}], got {tuple(cos_sin_cache.shape)}")
    require(cos_sin_cache.dtype == torch.float32, f"cos_sin_cache must be float32, got {cos_sin_cache.dtype}")
    require(q.dtype in FLOAT_DTYPES and k.dtype == q.dtype, f"q, k dtypes must match and be float, got {q.dtype}, {k.dtype}")
    for name, t in (("q", q), ("k", k)):  # tokens may be strided (views of a fused q|k|v row)
        require(t.stride(2) == 1 and t.stride(1) == D, f"{name} must be contiguous within a token ([heads, head_dim])")
    for name, t in (("positions", positions), ("cos_sin_cache", cos_sin_cache)):
        require(t.is_contiguous(), f"{name} must be contiguous")


def rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
           *, num_warps: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """q: `[T, num_heads, head_dim]`; k: `[T, num_kv_heads, head_dim]` (each token's heads
    contiguous; tokens any stride apart, e.g. views of a fused q|k|v output); positions: int64
    `[T]`; cos_sin_cache: float32 `[max_pos, head_dim]` (cos half, then sin half).
    Returns contiguous `(q_out, k_out)` shaped and typed like q and k."""
    _check(q, k, positions, cos_sin_cache)
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    T, H, D = q.shape
    if T == 0:
        return q_out, k_out
    require_launchable(q, k, positions, cos_sin_cache)
    Hk = k.shape[1]
    _rotary_kernel[(T,)](q, k, q_out, k_out, positions, cos_sin_cache, H, Hk, q.stride(0), k.stride(0),
                         HALF=D // 2, BLOCK_HALF=next_pow2(D // 2), BLOCK_HQ=next_pow2(H),
                         BLOCK_HK=next_pow2(Hk), num_warps=num_warps, **pdl_kwargs())
    return q_out, k_out


def rotary_ref(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
               cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-PyTorch `rotary` (HF `apply_rotary_pos_emb`)."""
    _check(q, k, positions, cos_sin_cache)
    cos, sin = cos_sin_cache[positions].chunk(2, dim=-1)  # [T, D/2] each
    cos = torch.cat([cos, cos], dim=-1)[:, None, :]
    sin = torch.cat([sin, sin], dim=-1)[:, None, :]

    def rotate_half(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([-x2, x1], dim=-1)

    def apply(x):
        xf = x.float()
        return (xf * cos + rotate_half(xf) * sin).to(x.dtype)

    return apply(q), apply(k)
