"""Paged attention for prefill and chunked prefill: the new tokens of B sequences, packed
back to back, attend causally to their sequence's whole paged KV cache.

FlashAttention-2 tiling (Dao, arXiv 2307.08691): a program owns BLOCK_M queries of one head
and streams BLOCK_N-token KV tiles through an online softmax, so scores never touch memory.
KV is read through the PagedAttention block tables (Kwon et al., arXiv 2309.06180). Query i
of a sequence with q_len new tokens and context_len total tokens sits at position
`context_len - q_len + i`, which covers plain prefill (q_len == context_len), chunked
prefill (earlier chunks already cached) and decode-like q_len == 1 rows in one launch.
"""
import math

import torch

from bitfold.kernels._triton import FLOAT_DTYPES, jit, next_pow2, require, require_launchable, tl

_NO_WINDOW = 1 << 30  # "no sliding window" as a window longer than any context: no branch in the kernel


@jit
def tile_of_sequence(cu_seqlens_q, num_seqs, tile_id, BLOCK_M: tl.constexpr):
    """(sequence b, its first query row q_start, its q_len, the tile's first row m0 within it)
    for query tile `tile_id` of a grid sized from shapes alone (T // BLOCK_M + B tiles), so
    launching needs no device sync: sequence b owns tiles [cu[b] // BLOCK_M + b,
    cu[b+1] // BLOCK_M + b + 1), at least cdiv(q_len_b, BLOCK_M) of them; binary search. A
    spare tile of its sequence has m0 >= q_len."""
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(cu_seqlens_q + mid) // BLOCK_M + mid <= tile_id:
            lo = mid + 1
        else:
            hi = mid
    b = lo - 1
    q_start = tl.load(cu_seqlens_q + b)
    q_len = tl.load(cu_seqlens_q + b + 1) - q_start
    m0 = (tile_id - (q_start // BLOCK_M + b)) * BLOCK_M
    return b, q_start, q_len, m0


@jit
def _prefill_kernel(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, out,
                    scale_log2, window, bt_stride, num_seqs,
                    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    h = tl.program_id(1)
    b, q_start, q_len, m0 = tile_of_sequence(cu_seqlens_q, num_seqs, tl.program_id(0), BLOCK_M)
    if m0 >= q_len:
        return  # spare tile of this sequence

    seq_len = tl.load(context_lens + b)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    q_pos = seq_len - q_len + offs_m  # absolute position of each query row
    d = tl.arange(0, BLOCK_D)
    q_mask = (offs_m[:, None] < q_len) & (d[None, :] < HEAD_DIM)
    q_off = ((q_start + offs_m[:, None]).to(tl.int64) * NUM_HEADS + h) * HEAD_DIM + d[None, :]
    qt = tl.load(q + q_off, mask=q_mask, other=0.0)  # [BLOCK_M, BLOCK_D]
    kh = h // (NUM_HEADS // NUM_KV_HEADS)

    # KV range any row of this tile can see: causal end of the last row, window start of the first.
    kv_hi = seq_len - q_len + tl.minimum(m0 + BLOCK_M, q_len)
    kv_lo = tl.maximum(seq_len - q_len + m0 - window + 1, 0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(kv_lo, kv_hi, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        valid = pos < kv_hi
        # Masked block-table reads: entries past the sequence (possibly -1) are never followed.
        page = tl.load(block_tables + b * bt_stride + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        tok = (page * BLOCK_SIZE + pos % BLOCK_SIZE) * (NUM_KV_HEADS * HEAD_DIM) + kh * HEAD_DIM
        kt = tl.load(k_cache + tok[None, :] + d[:, None], mask=valid[None, :] & (d[:, None] < HEAD_DIM), other=0.0)
        v = tl.load(v_cache + tok[:, None] + d[None, :], mask=valid[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
        s = tl.dot(qt, kt, input_precision=DOT_PREC) * scale_log2  # [BLOCK_M, BLOCK_N], base-2 logits
        dist = q_pos[:, None] - pos[None, :]
        s = tl.where(valid[None, :] & (dist >= 0) & (dist < window), s, float("-inf"))
        # A row may see nothing in this tile (window, or a padded row): keep its exponent base
        # finite so exp2(-inf - -inf) never makes a NaN.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_base = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_base)
        p = tl.exp2(s - m_base[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    # Every real row saw at least its own position; padded rows are masked out of the store.
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out + q_off, o.to(out.dtype.element_ty), mask=q_mask)


def _check(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, sliding_window):
    require(q.dim() == 3, f"q must be [T, num_heads, head_dim], got {tuple(q.shape)}")
    require(k_cache.dim() == 4 and v_cache.shape == k_cache.shape,
            f"k_cache, v_cache must both be [num_blocks, block_size, num_kv_heads, head_dim], got {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    T, H, D = q.shape
    require(k_cache.shape[3] == D, f"head_dim of q ({D}) != cache ({k_cache.shape[3]})")
    require(H % k_cache.shape[2] == 0, f"num_heads {H} is not a multiple of num_kv_heads {k_cache.shape[2]}")
    require(q.dtype in FLOAT_DTYPES and q.dtype == k_cache.dtype == v_cache.dtype,
            f"q, k_cache, v_cache must share one float dtype, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    B = context_lens.shape[0] if context_lens.dim() == 1 else -1
    require(context_lens.dim() == 1 and context_lens.dtype == torch.int32,
            f"context_lens must be int32 [B], got {context_lens.dtype} {tuple(context_lens.shape)}")
    require(cu_seqlens_q.shape == (B + 1,) and cu_seqlens_q.dtype == torch.int32,
            f"cu_seqlens_q must be int32 [B+1={B + 1}], got {cu_seqlens_q.dtype} {tuple(cu_seqlens_q.shape)}")
    require(block_tables.dim() == 2 and block_tables.shape[0] == B and block_tables.dtype == torch.int32,
            f"block_tables must be int32 [B={B}, max_blocks], got {block_tables.dtype} {tuple(block_tables.shape)}")
    require(sliding_window >= 0, f"sliding_window must be >= 0, got {sliding_window}")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("block_tables", block_tables),
                    ("cu_seqlens_q", cu_seqlens_q), ("context_lens", context_lens)):
        require(t.is_contiguous(), f"{name} must be contiguous")


def paged_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                  cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor, scale: float, sliding_window: int = 0,
                  *, block_m: int = 64, block_n: int = 64, num_warps: int = 4, num_stages: int = 2) -> torch.Tensor:
    """Causal attention of the packed new tokens over their sequences' paged KV cache.

    q: `[T, num_heads, head_dim]`, the new tokens of B sequences back to back.
    k_cache, v_cache: `[num_blocks, block_size, num_kv_heads, head_dim]`, new K/V already written.
    block_tables: int32 `[B, max_blocks_per_seq]`; cu_seqlens_q: int32 `[B+1]`, offsets into q
    (cu[0] == 0, cu[B] == T); context_lens: int32 `[B]`, total KV length incl. the new tokens
    (>= q_len). sliding_window > 0 keeps positions p with q_pos - p < sliding_window (HF Mistral).
    Returns `[T, num_heads, head_dim]` in q's dtype.
    Tuning knobs (keyword-only): `block_m` queries and `block_n` KV tokens per tile (powers of
    two, >= 16 for tl.dot), `num_warps`, `num_stages`.
    """
    _check(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, sliding_window)
    T, H, D = q.shape
    B = context_lens.shape[0]
    out = torch.empty_like(q)
    if T == 0 or B == 0:
        return out
    require_launchable(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens)
    for name, n in (("block_m", block_m), ("block_n", block_n)):
        require(n >= 16 and n & (n - 1) == 0, f"{name} must be a power of two >= 16 (tl.dot), got {n}")
    Hkv, block_size = k_cache.shape[2], k_cache.shape[1]
    grid = (T // block_m + B, H)
    _prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, out,
        float(scale) * math.log2(math.e), sliding_window if sliding_window > 0 else _NO_WINDOW,
        block_tables.stride(0), B,
        NUM_HEADS=H, NUM_KV_HEADS=Hkv, BLOCK_SIZE=block_size, HEAD_DIM=D, BLOCK_D=max(16, next_pow2(D)),
        BLOCK_M=block_m, BLOCK_N=block_n,
        DOT_PREC="tf32x3" if q.dtype == torch.float32 else "tf32",  # fp32: 3xTF32 keeps ~fp32 accuracy on tensor cores
        num_warps=num_warps, num_stages=num_stages)
    return out


def paged_prefill_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                      cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor, scale: float,
                      sliding_window: int = 0) -> torch.Tensor:
    """Pure-PyTorch `paged_prefill` (float32 math, output in q's dtype); the CPU path."""
    _check(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, sliding_window)
    T, H, D = q.shape
    out = torch.empty_like(q)
    Hkv, block_size = k_cache.shape[2], k_cache.shape[1]
    cu, lens = cu_seqlens_q.tolist(), context_lens.tolist()
    for b, seq_len in enumerate(lens):
        s, e = cu[b], cu[b + 1]
        if e == s:
            continue
        pos = torch.arange(seq_len, device=q.device)
        pages = block_tables[b].long()[pos // block_size]
        k = k_cache[pages, pos % block_size].float()  # [L, Hkv, D]
        v = v_cache[pages, pos % block_size].float()
        qf = q[s:e].float().view(e - s, Hkv, H // Hkv, D)
        scores = torch.einsum("qkgd,lkd->kgql", qf, k) * scale
        dist = (seq_len - (e - s) + torch.arange(e - s, device=q.device))[:, None] - pos[None, :]
        allowed = (dist >= 0) & ((dist < sliding_window) if sliding_window > 0 else True)
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[s:e] = torch.einsum("kgql,lkd->qkgd", scores.softmax(dim=-1), v).reshape(e - s, H, D).to(q.dtype)
    return out
