"""Paged attention for decode: one new query token per sequence against its paged KV cache.

Split-K "flash-decoding" (Dao et al., Flash-Decoding blog 2023; Hong et al., FlashDecoding++,
arXiv 2311.01282) over the PagedAttention layout (Kwon et al., arXiv 2309.06180). With one
query row per head there is little work per sequence, so a long context is cut into splits
that run in parallel; each writes a partial (row max, row sum, unnormalized output) and a
second kernel merges them with log-sum-exp. Short contexts or big batches use one split and
skip the merge.

GQA: one program owns a (sequence, kv head, split) and ALL query heads of that kv group, so
each KV tile is read from memory once per group instead of once per query head. Decode is
memory-bound; the padding of the group to 16 rows for tl.dot costs only idle tensor cores.

The new token's K/V can come with the call (`new_k`, `new_v`, `slot_mapping`), saving the
KV-write launch per layer (decode at small batch is launch-bound): the program whose split
holds the new position writes them into their page and adds that position to its softmax
from registers, as a rank-1 update after its tile loop, which then stops one position
short. (Substituting the new row inside the tiles instead costs 10-20% of bandwidth on an
H100: the tiles then pass through registers on their way to the tensor cores.)
"""
import math

import torch

from bitfold.kernels.kv_write import write_kv_ref
from bitfold.kernels._triton import (FLOAT_DTYPES, cdiv, jit, next_pow2, num_sms, pdl_kwargs, pdl_trigger, pdl_wait,
                                     require, require_launchable, tl)

_NO_WINDOW = 1 << 30  # "no sliding window" as a window longer than any context: no branch in the kernel


@jit
def split_span(context_lens, b, split, num_splits, window, ALIGN: tl.constexpr, BLOCK_N: tl.constexpr):
    """(seq_len, lo, hi): the key positions [lo, hi) split `split` of sequence b attends to. Each
    sequence cuts ITS span (from the window's start, rounded down to a multiple of ALIGN: 1, or
    a compressed page walked whole) into the launched splits of whole BLOCK_N tiles, so a grid
    planned for the longest possible context (CUDA graphs) stays balanced for short ones;
    `_decode_merge_kernel` cuts it the same way. lo >= hi: the sequence is shorter than the grid."""
    seq_len = tl.load(context_lens + b)
    start = tl.maximum(seq_len - window, 0) // ALIGN * ALIGN  # the query sits at seq_len - 1
    split_tokens = tl.cdiv(tl.cdiv(seq_len - start, num_splits), BLOCK_N) * BLOCK_N
    lo = start + split * split_tokens
    return seq_len, lo, tl.minimum(lo + split_tokens, seq_len)


@jit
def _rotate_row(x, base, d, mask, pos, cos_sin, HALF: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Rotary (neox halves, kernels/rotary.py) of the head vectors at x + base + d (base
    broadcasts over rows, d [1, BLOCK_D] or [BLOCK_D]; `mask` the valid elements, 0 elsewhere),
    in float32: x[d] cos - x[d + HALF] sin for the first half, x[d] cos + x[d - HALF] sin for
    the second."""
    dm = mask & (d < HEAD_DIM)
    first = d < HALF
    partner = tl.where(first, d + HALF, d - HALF)
    xv = tl.load(x + base + d, mask=dm, other=0.0).to(tl.float32)
    xp = tl.load(x + base + partner, mask=dm, other=0.0).to(tl.float32)
    f = d % HALF
    c = tl.load(cos_sin + pos * (2 * HALF) + f, mask=d < HEAD_DIM, other=0.0)
    s = tl.load(cos_sin + pos * (2 * HALF) + HALF + f, mask=d < HEAD_DIM, other=0.0)
    return xv * c + tl.where(first, -xp, xp) * s


@jit
def _decode_split_kernel(q, k_cache, v_cache, block_tables, context_lens, out, part_m, part_l, part_acc,
                         new_k, new_v, slot_mapping, positions, cos_sin, stride_qb, stride_kb, stride_vb,
                         scale_log2, window, bt_stride, num_splits,
                         NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, QG: tl.constexpr, QG_PAD: tl.constexpr,
                         BLOCK_N: tl.constexpr, USE_DOT: tl.constexpr, SINGLE_SPLIT: tl.constexpr,
                         DOT_PREC: tl.constexpr, FUSE_WRITE: tl.constexpr, ROPE: tl.constexpr = False,
                         PDL: tl.constexpr = False):
    # ROPE: q and new_k arrive before rotary (views of the fused q|k|v rows, rows stride_qb /
    # stride_kb apart): this program rotates them itself (rotary fused into the KV write).
    pdl_trigger(PDL)
    pdl_wait(PDL)
    b = tl.program_id(0)
    kh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len, lo, hi = split_span(context_lens, b, split, num_splits, window, 1, BLOCK_N)
    if lo >= hi:
        return  # this sequence is shorter than the split grid; the merge skips this split

    rows = tl.arange(0, QG_PAD)
    d = tl.arange(0, BLOCK_D)
    last = seq_len - 1  # the new token's position
    if ROPE:
        rpos = tl.load(positions + b)
    if FUSE_WRITE:
        owns_new = (lo <= last) & (last < hi)  # this split holds the new position
        if ROPE:  # rounded as the rotary kernel rounds its output
            nk = _rotate_row(new_k, b.to(tl.int64) * stride_kb + kh * HEAD_DIM, d, d < HEAD_DIM, rpos, cos_sin,
                             HEAD_DIM // 2, HEAD_DIM).to(k_cache.dtype.element_ty)
        else:
            nk = tl.load(new_k + b.to(tl.int64) * stride_kb + kh * HEAD_DIM + d, mask=d < HEAD_DIM, other=0.0)
        nv = tl.load(new_v + b.to(tl.int64) * stride_vb + kh * HEAD_DIM + d, mask=d < HEAD_DIM, other=0.0)
        slot = tl.load(slot_mapping + b)  # int64; negative: a padding row, write nothing
        if owns_new & (slot >= 0):  # no program reads this slot in this launch: the owner uses nk/nv
            dst = slot * (NUM_KV_HEADS * HEAD_DIM) + kh * HEAD_DIM + d
            tl.store(k_cache + dst, nk, mask=d < HEAD_DIM)
            tl.store(v_cache + dst, nv, mask=d < HEAD_DIM)
        hi_cached = tl.minimum(hi, last)  # the tiles read cached positions only
    else:
        hi_cached = hi
    q_mask = (rows[:, None] < QG) & (d[None, :] < HEAD_DIM)
    q_off = (b * NUM_HEADS + kh * QG + rows[:, None]) * HEAD_DIM + d[None, :]  # out's (contiguous) offsets
    q_row = b.to(tl.int64) * stride_qb + (kh * QG + rows[:, None]) * HEAD_DIM
    if ROPE:
        qg = _rotate_row(q, q_row, d[None, :], q_mask, rpos, cos_sin, HEAD_DIM // 2, HEAD_DIM)
        qg = qg.to(q.dtype.element_ty)  # [QG_PAD, BLOCK_D]; padded rows are 0
    else:
        qg = tl.load(q + q_row + d[None, :], mask=q_mask, other=0.0)  # [QG_PAD, BLOCK_D]; padded rows are 0

    m_i = tl.full([QG_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([QG_PAD], tl.float32)
    acc = tl.zeros([QG_PAD, BLOCK_D], tl.float32)
    for n0 in range(lo, hi_cached, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        valid = pos < hi_cached
        # A tile spans several pages: translate every position through the block table
        # (masked, so entries past the sequence, possibly -1, are never read).
        page = tl.load(block_tables + b * bt_stride + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        # Cached token row = NUM_KV_HEADS * HEAD_DIM elements; int64 since caches exceed 2**31.
        tok = (page * BLOCK_SIZE + pos % BLOCK_SIZE) * (NUM_KV_HEADS * HEAD_DIM) + kh * HEAD_DIM
        kv_mask = valid[:, None] & (d[None, :] < HEAD_DIM)
        v = tl.load(v_cache + tok[:, None] + d[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        if USE_DOT:
            kt = tl.load(k_cache + tok[None, :] + d[:, None], mask=valid[None, :] & (d[:, None] < HEAD_DIM), other=0.0)
            s = tl.dot(qg, kt, input_precision=DOT_PREC)  # [QG_PAD, BLOCK_N]
        else:
            k = tl.load(k_cache + tok[:, None] + d[None, :], mask=kv_mask, other=0.0)
            s = tl.sum(qg.to(tl.float32)[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)
        s = tl.where(valid[None, :], s * scale_log2, float("-inf"))
        # Online softmax in base 2 (exp2 is one instruction); every tile holds >= 1 valid
        # position, so m_new is finite and no -inf - -inf NaN can appear.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if USE_DOT:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        else:
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
        m_i = m_new
    if FUSE_WRITE:
        if owns_new:  # the new position as one more softmax column (a split of only it starts at -inf)
            s_new = tl.sum(qg.to(tl.float32) * nk.to(tl.float32)[None, :], axis=1) * scale_log2  # [QG_PAD]
            m_new = tl.maximum(m_i, s_new)
            alpha = tl.exp2(m_i - m_new)
            p_new = tl.exp2(s_new - m_new)
            l_i = l_i * alpha + p_new
            acc = acc * alpha[:, None] + p_new[:, None] * nv.to(tl.float32)[None, :]
            m_i = m_new

    if SINGLE_SPLIT:
        o = acc / l_i[:, None]
        tl.store(out + q_off, o.to(out.dtype.element_ty), mask=q_mask)
    else:
        part = (b * NUM_HEADS + kh * QG + rows) * num_splits + split  # partials are [B, H, num_splits(, D)]
        tl.store(part_m + part, m_i, mask=rows < QG)
        tl.store(part_l + part, l_i, mask=rows < QG)
        tl.store(part_acc + part[:, None] * HEAD_DIM + d[None, :], acc, mask=q_mask)


@jit
def _decode_merge_kernel(out, part_m, part_l, part_acc, context_lens, window, num_splits,
                         NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr, ALIGN: tl.constexpr = 1,
                         PDL: tl.constexpr = False):
    # ALIGN: the split kernel started its span at the window's start rounded down to a multiple
    # of ALIGN (compressed pages are walked whole); 1 = at the window's start.
    pdl_trigger(PDL)
    pdl_wait(PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    seq_len = tl.load(context_lens + b)
    span = seq_len - tl.maximum(seq_len - window, 0) // ALIGN * ALIGN
    split_tokens = tl.cdiv(tl.cdiv(span, num_splits), BLOCK_N) * BLOCK_N  # as the split kernel cut it
    used = tl.minimum(tl.cdiv(span, split_tokens), num_splits)  # splits this sequence filled
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    part = (b * NUM_HEADS + h) * num_splits + s
    m = tl.load(part_m + part, mask=s < used, other=float("-inf"))
    l = tl.load(part_l + part, mask=s < used, other=0.0)
    acc = tl.load(part_acc + part[:, None] * HEAD_DIM + d[None, :],
                  mask=(s[:, None] < used) & (d[None, :] < HEAD_DIM), other=0.0)
    w = tl.exp2(m - tl.max(m, axis=0))  # unused splits: exp2(-inf) = 0
    o = tl.sum(w[:, None] * acc, axis=0) / tl.sum(w * l, axis=0)
    tl.store(out + (b * NUM_HEADS + h) * HEAD_DIM + d, o.to(out.dtype.element_ty), mask=d < HEAD_DIM)


def _check(q, k_cache, v_cache, block_tables, context_lens, sliding_window):
    require(q.dim() == 3, f"q must be [B, num_heads, head_dim], got {tuple(q.shape)}")
    require(k_cache.dim() == 4 and v_cache.shape == k_cache.shape,
            f"k_cache, v_cache must both be [num_blocks, block_size, num_kv_heads, head_dim], got {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    B, H, D = q.shape
    require(k_cache.shape[3] == D, f"head_dim of q ({D}) != cache ({k_cache.shape[3]})")
    require(H % k_cache.shape[2] == 0, f"num_heads {H} is not a multiple of num_kv_heads {k_cache.shape[2]}")
    require(q.dtype in FLOAT_DTYPES and q.dtype == k_cache.dtype == v_cache.dtype,
            f"q, k_cache, v_cache must share one float dtype, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    require(block_tables.dim() == 2 and block_tables.shape[0] == B and block_tables.dtype == torch.int32,
            f"block_tables must be int32 [B={B}, max_blocks], got {block_tables.dtype} {tuple(block_tables.shape)}")
    require(context_lens.shape == (B,) and context_lens.dtype == torch.int32,
            f"context_lens must be int32 [B={B}], got {context_lens.dtype} {tuple(context_lens.shape)}")
    require(sliding_window >= 0, f"sliding_window must be >= 0, got {sliding_window}")
    require(q.stride(2) == 1 and q.stride(1) == D, "q must be contiguous within a token ([heads, head_dim]); "
            "tokens may be any stride apart")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("block_tables", block_tables),
                    ("context_lens", context_lens)):
        require(t.is_contiguous(), f"{name} must be contiguous")


def split_plan(programs: int, span: int, sms: int, block_n: int, min_split_tokens: int,
               num_splits: int | None = None) -> tuple[int, int]:
    """(num_splits, split_tokens) for `programs` = B * num_kv_heads and `span` = the most KV
    positions one query attends to. Splits are added only until the grid covers ~2 waves of
    `sms`, and only while each split keeps >= `min_split_tokens`, so short contexts and big
    batches get one split (and no merge). Splits are whole `block_n` tiles."""
    if num_splits is None:
        num_splits = max(1, min(cdiv(2 * sms, programs), span // min_split_tokens, 64))
    split_tokens = cdiv(cdiv(span, num_splits), block_n) * block_n
    return cdiv(span, split_tokens), split_tokens  # rounding up may leave fewer splits


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor, scale: float, sliding_window: int = 0, *,
                 new_k: torch.Tensor | None = None, new_v: torch.Tensor | None = None,
                 slot_mapping: torch.Tensor | None = None, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                 max_context_len: int | None = None, num_splits: int | None = None, block_n: int = 64,
                 min_split_tokens: int = 256, use_dot: bool | None = None, num_warps: int = 4,
                 num_stages: int = 2) -> torch.Tensor:
    """Attention of each sequence's newest token over its whole paged context.

    q: `[B, num_heads, head_dim]`, the new tokens.
    k_cache, v_cache: `[num_blocks, block_size, num_kv_heads, head_dim]`.
    block_tables: int32 `[B, max_blocks_per_seq]`; context_lens: int32 `[B]`, >= 1, counts
    the new token. sliding_window > 0 keeps the last `sliding_window` positions (HF Mistral).
    new_k, new_v: `[B, num_kv_heads, head_dim]` and slot_mapping: int64 `[B]` (all or none):
    the new tokens' K/V, written into their slots (negative: skipped) by this same launch, as
    `write_kv` would; without them the new K/V must already be in the cache.
    rope: (positions int64 [B], cos_sin float32 [max_pos, head_dim]): q and new_k arrive before
    rotary (`kernels/rotary.py`'s), which this launch applies (rotary fused into the KV write).
    q, new_k, new_v may be views of a fused q|k|v output (heads contiguous, tokens any stride).
    Returns `[B, num_heads, head_dim]` (contiguous) in q's dtype.

    Tuning knobs (keyword-only): `max_context_len` (any upper bound of context_lens, never
    less than the true maximum; passing it avoids a device sync), `num_splits` (None: enough programs for ~2 waves on the GPU, at
    least `min_split_tokens` per split), `block_n` KV tokens per tile, `use_dot` (None: tl.dot
    with the group padded to 16 rows whenever the GQA group has > 1 head; the broadcast
    product [group, block_n, head_dim] would not fit in registers), `num_warps`, `num_stages`.
    """
    _check(q, k_cache, v_cache, block_tables, context_lens, sliding_window)
    fuse_write = _check_new_kv(q, k_cache, new_k, new_v, slot_mapping)
    positions, cos_sin = _check_rope(q, rope, fuse_write) if rope is not None else (context_lens, q)
    B, H, D = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if B == 0:
        return out
    require_launchable(q, k_cache, v_cache, block_tables, context_lens)
    Hkv, block_size = k_cache.shape[2], k_cache.shape[1]
    qg = H // Hkv
    use_dot = qg > 1 if use_dot is None else use_dot
    window = sliding_window if sliding_window > 0 else _NO_WINDOW
    require(block_n >= 16 and block_n & (block_n - 1) == 0, f"block_n must be a power of two >= 16, got {block_n}")
    if max_context_len is None:
        max_context_len = int(context_lens.max())  # host sync; the engine should pass it
    require(max_context_len >= 1, f"max_context_len must be >= 1, got {max_context_len}")
    span = max(1, min(max_context_len, window))  # most positions any one query attends to
    num_splits, split_tokens = split_plan(B * Hkv, span, num_sms(q.device), block_n, min_split_tokens, num_splits)
    BLOCK_D = max(16, next_pow2(D)) if use_dot else next_pow2(D)  # tl.dot needs K >= 16
    QG_PAD = max(16, next_pow2(qg)) if use_dot else next_pow2(qg)
    single = num_splits == 1
    if single:
        part_m = part_l = part_acc = out  # never touched: SINGLE_SPLIT writes `out` directly
    else:
        part_m = torch.empty((B, H, num_splits), dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty((B, H, num_splits, D), dtype=torch.float32, device=q.device)
    if not fuse_write:
        new_k = new_v = q  # never read
        slot_mapping = context_lens
    scale_log2 = float(scale) * math.log2(math.e)
    _decode_split_kernel[(B, Hkv, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, part_m, part_l, part_acc,
        new_k, new_v, slot_mapping, positions, cos_sin, q.stride(0), new_k.stride(0), new_v.stride(0),
        scale_log2, window, block_tables.stride(0), num_splits,
        NUM_HEADS=H, NUM_KV_HEADS=Hkv, BLOCK_SIZE=block_size, HEAD_DIM=D, BLOCK_D=BLOCK_D, QG=qg,
        QG_PAD=QG_PAD, BLOCK_N=block_n, USE_DOT=use_dot, SINGLE_SPLIT=single,
        DOT_PREC="tf32x3" if q.dtype == torch.float32 else "tf32",  # fp32: 3xTF32 keeps ~fp32 accuracy on tensor cores
        FUSE_WRITE=fuse_write, ROPE=rope is not None,
        num_warps=num_warps, num_stages=num_stages, **pdl_kwargs())
    if not single:
        _decode_merge_kernel[(B, H)](out, part_m, part_l, part_acc, context_lens, window,
                                     num_splits, NUM_HEADS=H, HEAD_DIM=D, BLOCK_D=BLOCK_D,
                                     BLOCK_S=next_pow2(num_splits), BLOCK_N=block_n, num_warps=4,
                                     **pdl_kwargs())
    return out


def _check_new_kv(q, k_cache, new_k, new_v, slot_mapping) -> bool:
    """True when the new tokens' K/V come with the call (to be written by it)."""
    given = [t is not None for t in (new_k, new_v, slot_mapping)]
    require(all(given) or not any(given), "new_k, new_v and slot_mapping go together")
    if not any(given):
        return False
    B, _, D = q.shape
    shape = (B, k_cache.shape[2], D)
    require(new_k.shape == shape and new_v.shape == shape,
            f"new_k, new_v must be [B, num_kv_heads, head_dim] = {shape}, got {tuple(new_k.shape)}, {tuple(new_v.shape)}")
    require(new_k.dtype == new_v.dtype == k_cache.dtype,
            f"new_k, new_v must have the cache's dtype {k_cache.dtype}, got {new_k.dtype}, {new_v.dtype}")
    require(slot_mapping.shape == (B,) and slot_mapping.dtype == torch.int64,
            f"slot_mapping must be int64 [B={B}], got {slot_mapping.dtype} {tuple(slot_mapping.shape)}")
    for name, t in (("new_k", new_k), ("new_v", new_v)):
        require(t.stride(2) == 1 and t.stride(1) == D, f"{name} must be contiguous within a token")
    require(slot_mapping.is_contiguous(), "slot_mapping must be contiguous")
    return True


def _check_rope(q, rope, fuse_write: bool):
    """(positions, cos_sin) of a fused rotary: q and new_k arrive unrotated."""
    require(fuse_write, "rope= rotates the new K too: it needs new_k, new_v and slot_mapping")
    positions, cos_sin = rope
    B, _, D = q.shape
    require(positions.shape == (B,) and positions.dtype == torch.int64 and positions.is_contiguous(),
            f"rope positions must be contiguous int64 [B={B}], got {positions.dtype} {tuple(positions.shape)}")
    require(cos_sin.dim() == 2 and cos_sin.shape[1] == D and cos_sin.dtype == torch.float32 and cos_sin.is_contiguous(),
            f"rope cos_sin must be contiguous float32 [max_pos, head_dim={D}], got {cos_sin.dtype} {tuple(cos_sin.shape)}")
    require(D % 2 == 0, f"rotary needs an even head_dim, got {D}")
    return positions, cos_sin


def paged_decode_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, scale: float, sliding_window: int = 0, *,
                     new_k: torch.Tensor | None = None, new_v: torch.Tensor | None = None,
                     slot_mapping: torch.Tensor | None = None,
                     rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Pure-PyTorch `paged_decode` (float32 math, output in q's dtype); the CPU path. With
    `rope`, `rotary_ref` first."""
    _check(q, k_cache, v_cache, block_tables, context_lens, sliding_window)
    fused = _check_new_kv(q, k_cache, new_k, new_v, slot_mapping)
    if rope is not None:
        from bitfold.kernels.rotary import rotary_ref

        q, new_k = rotary_ref(q, new_k, *_check_rope(q, rope, fused))
    if fused:
        new_k, new_v = new_k.contiguous(), new_v.contiguous()
        write_kv_ref(k_cache, v_cache, new_k, new_v, slot_mapping)
    B, H, D = q.shape
    if B == 0:
        return torch.empty_like(q)
    Hkv, block_size = k_cache.shape[2], k_cache.shape[1]
    lens = context_lens.long()
    pos = torch.arange(int(lens.max()), device=q.device)
    valid = pos[None, :] < lens[:, None]  # [B, L]
    if sliding_window > 0:
        valid &= pos[None, :] >= lens[:, None] - sliding_window
    pages = torch.where(valid, block_tables.long()[:, pos // block_size], 0)  # never follow an unused entry
    k = k_cache[pages, pos % block_size].float()  # [B, L, Hkv, D]
    # Masked positions read slot 0 of block 0, which may hold anything (the cache is not
    # zero-filled): zero V there, since a 0 probability times NaN is still NaN.
    v = v_cache[pages, pos % block_size].float()
    if fused:  # the new position reads the given K/V (also where its slot was skipped)
        rows = torch.arange(B, device=q.device)
        k[rows, lens - 1] = new_k.float()
        v[rows, lens - 1] = new_v.float()
    v = v.masked_fill(~valid[:, :, None, None], 0.0)
    qf = q.float().view(B, Hkv, H // Hkv, D)
    scores = torch.einsum("bkgd,blkd->bkgl", qf, k) * scale
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    o = torch.einsum("bkgl,blkd->bkgd", scores.softmax(dim=-1), v)
    return o.reshape(B, H, D).to(q.dtype)
