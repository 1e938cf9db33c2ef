"""Paged attention over compressed KV pages (layout: kernels/quant_kv_write.py), decode and
prefill, reading packed codes and scales straight from the pages and dequantizing in registers:
no dequantized copy of the cache exists, ever.

A page is walked in P = max(K planes, V planes) pieces of block_size / P consecutive tokens
(each side's planes are runs of tokens, so a piece is one shift-and-mask of one byte tile per
side) with an online-softmax update per piece. Per side:
- KIVI keys (per-channel scale s and zero z over the page): q . k_t = (q * s) . code_t + q . z,
  so the page's scale folds into q once and the zero into one bias per query row; the codes go
  to `tl.dot` as they are (small integers are exact in bf16): tensor cores, no dequantized K;
- KIVI values (per token, groups of channels): dequantized in registers, code * s + z, then
  `tl.dot` with the probabilities;
- int8 / fp8 (one scale per token): the K scale multiplies the scores' column, the V scale the
  probabilities' column; codes go to `tl.dot` converted, not scaled;
- dense: as the dense kernels.
The newest tokens (the residual window, positions [n_sealed(L), L)) are read from the
sequence's 16-bit ring in a second loop. Decode is split-K flash-decoding with GQA grouping
(one program reads a page once for all query heads of its KV head) and reuses the dense merge
kernel; prefill is FlashAttention-2 tiling like kernels/paged_prefill.py.
"""
from __future__ import annotations

import math

import torch

from bitfold.kernels._triton import (FLOAT_DTYPES, HAS_TRITON, cdiv, interpreting, jit, next_pow2, num_sms, require,
                                     require_launchable, tl)
from bitfold.kernels.paged_decode import _decode_merge_kernel, split_plan, split_span
from bitfold.kernels.paged_prefill import tile_of_sequence
from bitfold.kernels.quant_kv_write import KIND_GROUP, KIND_INT8, QuantLayout, dequantize_pages_ref

_NO_WINDOW = 1 << 30


@jit
def _magic(b, shift, BITS: tl.constexpr, BF16: tl.constexpr):
    """Unsigned BITS-bit codes at bit `shift` of bytes `b` -> MAGIC + code, exactly: the code goes
    into the mantissa of 128.0 (bfloat16 bits 0x4300) or 1024.0 (float16 0x6400), two integer
    ops and no int-to-float conversion. Callers subtract MAGIC x (the sum of the other dot
    operand) once per row. bfloat16 on a GPU (the other operand, q x scale or p x scale, keeps
    its range: p x scale can be ~1e-7 at long flat contexts, a float16 subnormal); float16 under
    Triton's interpreter, whose bfloat16 tl.dot is broken (triton-lang/triton#11584)."""
    x = ((b.to(tl.int16) >> shift.to(tl.int16)) & ((1 << BITS) - 1))
    if BF16:
        out = (x | 0x4300).to(tl.bfloat16, bitcast=True)
    else:
        out = (x | 0x6400).to(tl.float16, bitcast=True)
    return out


@jit
def _magic16_i8(b):
    """int8 codes -> float16 1152 + code (1024 + the code shifted to unsigned), exactly."""
    return ((b.to(tl.int16) + 128) | 0x6400).to(tl.float16, bitcast=True)


@jit
def _pv_group(p, qd, ph, t, ok, g: tl.constexpr, v_codes, v_meta,
              V_KIND: tl.constexpr, V_BITS: tl.constexpr, VP: tl.constexpr, BS: tl.constexpr, D: tl.constexpr,
              VG: tl.constexpr, DOT_PREC: tl.constexpr, BF16: tl.constexpr):
    """p [M, BS] (probabilities of the page's tokens) times the page's V channels
    [g * VG, (g + 1) * VG): float32 [M, VG]."""
    NG: tl.constexpr = D // VG
    MAGIC: tl.constexpr = 128.0 if BF16 else 1024.0
    MT: tl.constexpr = tl.bfloat16 if BF16 else tl.float16
    c = g * VG + tl.arange(0, VG)
    if V_KIND == 3:  # per token and channel group: the group scale folds into p, the zero into a bias
        vb = tl.load(v_codes + ph * (BS // VP * D) + ((t // VP)[:, None] * D + c[None, :]))  # uint8 [BS, VG]
        vc = _magic(vb, ((t % VP) * V_BITS)[:, None], V_BITS, BF16)
        vmeta = v_meta + ph * (BS * 2 * NG) + g
        vs = tl.load(vmeta + t * (2 * NG)).to(tl.float32)
        vz = tl.load(vmeta + t * (2 * NG) + NG).to(tl.float32)
        pg = (p * vs[None, :]).to(MT)
        bias = tl.sum(p * vz[None, :], axis=1) - MAGIC * tl.sum(pg.to(tl.float32), axis=1)
        out = tl.dot(pg, vc) + bias[:, None]
    elif V_KIND == 0:
        v = tl.load(v_codes + ph * (BS * D) + (t[:, None] * D + c[None, :]), mask=ok[:, None], other=0.0)
        out = tl.dot(p.to(qd.dtype), v.to(qd.dtype), input_precision=DOT_PREC)
    else:
        vt = tl.load(v_codes + ph * (BS * D) + (t[:, None] * D + c[None, :]), mask=ok[:, None], other=0)
        vsc = tl.load(v_meta + ph * BS + t, mask=ok, other=0.0).to(tl.float32)
        # x 256 keeps small p out of float16 subnormals; undone in float32
        ps = (p * (vsc * 256.0)[None, :]).to(tl.float16)
        if V_KIND == 1:
            out = tl.dot(ps, _magic16_i8(vt)) - 1152.0 * tl.sum(ps.to(tl.float32), axis=1)[:, None]
        else:
            out = tl.dot(ps, vt.to(tl.float8e4nv, bitcast=True).to(tl.float16))
        out = out * (1.0 / 256.0)
    return out


@jit
def _page_scores(qf, qd, qh, page, p0, kv_len, kh, k_codes, k_meta,
                 K_KIND: tl.constexpr, K_BITS: tl.constexpr, KP: tl.constexpr, KVH: tl.constexpr, BS: tl.constexpr,
                 D: tl.constexpr, DOT_PREC: tl.constexpr, BF16: tl.constexpr):
    """q . k of query rows [M, D] (qf float32, qd compute dtype, qh float16) and the BS tokens of
    a sealed page: float32 [M, BS], unscaled. Integer codes go to the tensor cores as exact
    MAGIC + code (`_magic`; int8: float16 1152 + code); fp8 converts to float16 in hardware."""
    MAGIC: tl.constexpr = 128.0 if BF16 else 1024.0
    MT: tl.constexpr = tl.bfloat16 if BF16 else tl.float16
    d = tl.arange(0, D)
    t = tl.arange(0, BS)  # token of the page; it sits in byte row t // P at bits (t % P) * BITS
    ok = p0 + t < kv_len  # a page of a no-ring codec may be partly written
    ph = page * KVH + kh
    if K_KIND == 3:  # KIVI keys: the page's per-channel scale folds into q, its zero into a row bias
        kmeta = k_meta + ph * (2 * D)  # page bases: one scalar add per element below, offsets loop-invariant
        ks = tl.load(kmeta + d).to(tl.float32)
        kz = tl.load(kmeta + D + d).to(tl.float32)
        qk = (qf * ks[None, :]).to(MT)
        kbias = tl.sum(qf * kz[None, :], axis=1) - MAGIC * tl.sum(qk.to(tl.float32), axis=1)
        kb = tl.load(k_codes + ph * (BS // KP * D) + ((t // KP)[None, :] * D + d[:, None]))  # uint8 [D, BS]
        kc = _magic(kb, ((t % KP) * K_BITS)[None, :], K_BITS, BF16)
        s = tl.dot(qk, kc) + kbias[:, None]
    elif K_KIND == 0:
        kt = tl.load(k_codes + ph * (BS * D) + (t[None, :] * D + d[:, None]), mask=ok[None, :], other=0.0)
        s = tl.dot(qd, kt.to(qd.dtype), input_precision=DOT_PREC)
    else:
        kt = tl.load(k_codes + ph * (BS * D) + (t[None, :] * D + d[:, None]), mask=ok[None, :], other=0)
        ksc = tl.load(k_meta + ph * BS + t, mask=ok, other=0.0).to(tl.float32)
        if K_KIND == 1:
            s = (tl.dot(qh, _magic16_i8(kt)) - 1152.0 * tl.sum(qh.to(tl.float32), axis=1)[:, None]) * ksc[None, :]
        else:
            s = tl.dot(qh, kt.to(tl.float8e4nv, bitcast=True).to(tl.float16)) * ksc[None, :]
    return s


@jit
def _softmax_step(s, qpos, pos, ok, window, scale_log2, m_i, l_i):
    """Online-softmax update for scores s [M, N] of keys at positions pos [N] (ok: they exist)
    and queries at qpos [M]: returns (p, alpha, m_new, l_new)."""
    allowed = ok[None, :] & (pos[None, :] <= qpos[:, None]) & (qpos[:, None] - pos[None, :] < window)
    s = tl.where(allowed, s * scale_log2, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_base = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that saw nothing yet: no NaN
    alpha = tl.exp2(m_i - m_base)
    p = tl.exp2(s - m_base[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, axis=1)


@jit
def _attend_page(qf, qd, qh, m_i, l_i, acc0, acc1, page, p0, kv_len, qpos, window, kh,
                 k_codes, k_meta, v_codes, v_meta, scale_log2,
                 K_KIND: tl.constexpr, K_BITS: tl.constexpr, KP: tl.constexpr,
                 V_KIND: tl.constexpr, V_BITS: tl.constexpr, VP: tl.constexpr,
                 KVH: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, VG: tl.constexpr, DOT_PREC: tl.constexpr,
                 BF16: tl.constexpr):
    """One sealed page (first position p0) for query rows [M, D] at positions qpos [M]. A page is
    one [D, BS] K tile and [BS, D] V tile in token order. The output accumulates in acc0
    (channels [0, VG)) and, when D = 2 VG, acc1 ([VG, 2 VG)): every tile stays 2-D, so no
    batched dot or 3-D broadcast needs a trip through shared memory."""
    NG: tl.constexpr = D // VG
    t = tl.arange(0, BS)
    pos = p0 + t
    ok = pos < kv_len
    ph = page * KVH + kh
    s = _page_scores(qf, qd, qh, page, p0, kv_len, kh, k_codes, k_meta, K_KIND, K_BITS, KP, KVH, BS, D, DOT_PREC, BF16)
    p, alpha, m_new, l_i = _softmax_step(s, qpos, pos, ok, window, scale_log2, m_i, l_i)
    acc0 = acc0 * alpha[:, None] + _pv_group(p, qd, ph, t, ok, 0, v_codes, v_meta, V_KIND, V_BITS, VP, BS, D, VG,
                                               DOT_PREC, BF16)
    if NG == 2:
        acc1 = acc1 * alpha[:, None] + _pv_group(p, qd, ph, t, ok, 1, v_codes, v_meta, V_KIND, V_BITS, VP, BS, D, VG,
                                                   DOT_PREC, BF16)
    return m_new, l_i, acc0, acc1


@jit
def _ring_scores(q, m_i, r0, r_hi, qpos, window, kh, seq_slot, ring_k, scale_log2,
                 KVH: tl.constexpr, D: tl.constexpr, CAP: tl.constexpr, BN: tl.constexpr, DOT_PREC: tl.constexpr):
    """Scores x log2(e) / sqrt(D) of q [M, D] against ring positions [r0, min(r0 + BN, r_hi)),
    masked causally and to the window, and the online-softmax update they make: (ring offsets,
    ok, s, m_new, m_base, alpha). The ring attention of both decode kernels starts here."""
    d = tl.arange(0, D)
    pos = r0 + tl.arange(0, BN)
    ok = pos < r_hi
    off = ((seq_slot.to(tl.int64) * CAP + pos % CAP) * KVH + kh) * D
    kt = tl.load(ring_k + off[None, :] + d[:, None], mask=ok[None, :], other=0.0)
    s = tl.dot(q, kt.to(q.dtype), input_precision=DOT_PREC)
    allowed = ok[None, :] & (pos[None, :] <= qpos[:, None]) & (qpos[:, None] - pos[None, :] < window)
    s = tl.where(allowed, s * scale_log2, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_base = tl.where(m_new == float("-inf"), 0.0, m_new)
    return off, ok, s, m_new, m_base, tl.exp2(m_i - m_base)


@jit
def _attend_ring(qd, m_i, l_i, acc0, acc1, r0, r_hi, qpos, window, kh, seq_slot, ring_k, ring_v, scale_log2,
                 KVH: tl.constexpr, D: tl.constexpr, VG: tl.constexpr, CAP: tl.constexpr, BN: tl.constexpr,
                 DOT_PREC: tl.constexpr):
    """Positions [r0, min(r0 + BN, r_hi)) from the sequence's 16-bit ring."""
    NG: tl.constexpr = D // VG
    off, ok, s, m_new, m_base, alpha = _ring_scores(qd, m_i, r0, r_hi, qpos, window, kh, seq_slot, ring_k, scale_log2,
                                                    KVH, D, CAP, BN, DOT_PREC)
    p = tl.exp2(s - m_base[:, None]).to(qd.dtype)
    l_i = l_i * alpha + tl.sum(p.to(tl.float32), axis=1)
    c = tl.arange(0, VG)
    v0 = tl.load(ring_v + off[:, None] + c[None, :], mask=ok[:, None], other=0.0)
    acc0 = acc0 * alpha[:, None] + tl.dot(p, v0.to(qd.dtype), input_precision=DOT_PREC)
    if NG == 2:
        v1 = tl.load(ring_v + off[:, None] + VG + c[None, :], mask=ok[:, None], other=0.0)
        acc1 = acc1 * alpha[:, None] + tl.dot(p, v1.to(qd.dtype), input_precision=DOT_PREC)
    return m_new, l_i, acc0, acc1


@jit(do_not_specialize=('bt_stride', 'num_splits'))
def _quant_decode_kernel(q, k_codes, k_meta, v_codes, v_meta, ring_k, ring_v, block_tables, context_lens, seq_slots,
                         out, part_m, part_l, part_acc, scale_log2, window, bt_stride, num_splits,
                         K_KIND: tl.constexpr, K_BITS: tl.constexpr, KP: tl.constexpr,
                         V_KIND: tl.constexpr, V_BITS: tl.constexpr, VP: tl.constexpr, P: tl.constexpr,
                         NUM_HEADS: tl.constexpr, KVH: tl.constexpr, BS: tl.constexpr, D: tl.constexpr,
                         VG: tl.constexpr, RING: tl.constexpr, RESID: tl.constexpr, CAP: tl.constexpr,
                         QG: tl.constexpr, QG_PAD: tl.constexpr, SINGLE_SPLIT: tl.constexpr, DOT_PREC: tl.constexpr,
                         BF16: tl.constexpr):
    b = tl.program_id(0)
    kh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len, lo, hi = split_span(context_lens, b, split, num_splits, window, BS, BS)  # pieces never straddle pages
    if lo >= hi:
        return
    if RING:
        n_sealed = tl.maximum(seq_len - RESID, 0) // BS * BS
    else:
        n_sealed = seq_len
    rows = tl.arange(0, QG_PAD)
    d = tl.arange(0, D)
    q_mask = (rows[:, None] < QG) & (d[None, :] < D)
    q_off = (b * NUM_HEADS + kh * QG + rows[:, None]) * D + d[None, :]
    qd = tl.load(q + q_off, mask=q_mask, other=0.0)
    qf = qd.to(tl.float32)
    qh = qd.to(tl.float16)
    qpos = tl.zeros([QG_PAD], tl.int32) + (seq_len - 1)
    m_i = tl.full([QG_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([QG_PAD], tl.float32)
    acc0 = tl.zeros([QG_PAD, VG], tl.float32)  # output channels [0, VG)
    acc1 = tl.zeros([QG_PAD, VG], tl.float32)  # [VG, 2 VG) when D == 2 VG
    for p0 in range(lo, tl.minimum(hi, n_sealed), BS):
        page = tl.load(block_tables + b * bt_stride + p0 // BS).to(tl.int64)
        m_i, l_i, acc0, acc1 = _attend_page(qf, qd, qh, m_i, l_i, acc0, acc1, page, p0, seq_len, qpos, window, kh,
                                     k_codes, k_meta, v_codes, v_meta, scale_log2,
                                     K_KIND, K_BITS, KP, V_KIND, V_BITS, VP, KVH, BS, D, VG, DOT_PREC, BF16)
    if RING:
        seq_slot = tl.load(seq_slots + b)
        r_lo = tl.maximum(lo, n_sealed)
        if seq_slot < 0:
            r_lo = hi  # padding row of a CUDA graph: nothing in a ring
        for r0 in range(r_lo, hi, BS):
            m_i, l_i, acc0, acc1 = _attend_ring(qd, m_i, l_i, acc0, acc1, r0, hi, qpos, window, kh, seq_slot, ring_k,
                                                ring_v,
                                         scale_log2, KVH, D, VG, CAP, BS, DOT_PREC)
    _store_decode(out, part_m, part_l, part_acc, b, kh, split, num_splits, rows, tl.arange(0, VG), m_i, l_i,
                  acc0, acc1, 1.0, NUM_HEADS, QG, D, VG, SINGLE_SPLIT)


@jit
def _store_decode(out, part_m, part_l, part_acc, b, kh, split, num_splits, rows, c, m_i, l_i, acc0, acc1,
                  UNSCALE: tl.constexpr, NUM_HEADS: tl.constexpr, QG: tl.constexpr, D: tl.constexpr,
                  VG: tl.constexpr, SINGLE_SPLIT: tl.constexpr):
    """A decode split's end: the output rows (one split: acc / l) or the partials for
    `_decode_merge_kernel` (m, l, acc). c: the output channels of acc0's columns (acc1 holds c +
    VG when D = 2 VG); UNSCALE: a power of two the accumulators carry (exact to undo)."""
    mask2 = (rows[:, None] < QG) & (c[None, :] < VG)
    if SINGLE_SPLIT:
        inv = UNSCALE / tl.where(l_i > 0, l_i, 1.0)
        o_off = (b * NUM_HEADS + kh * QG + rows[:, None]) * D + c[None, :]
        tl.store(out + o_off, (acc0 * inv[:, None]).to(out.dtype.element_ty), mask=mask2)
        if D // VG == 2:
            tl.store(out + o_off + VG, (acc1 * inv[:, None]).to(out.dtype.element_ty), mask=mask2)
    else:
        part = (b * NUM_HEADS + kh * QG + rows) * num_splits + split
        tl.store(part_m + part, m_i, mask=rows < QG)
        tl.store(part_l + part, l_i, mask=rows < QG)
        tl.store(part_acc + part[:, None] * D + c[None, :], acc0 * UNSCALE, mask=mask2)
        if D // VG == 2:
            tl.store(part_acc + part[:, None] * D + VG + c[None, :], acc1 * UNSCALE, mask=mask2)


# ----------------------------------------------------------------------------- decode, planes variant
#
# The decode kernel above unpacks a [D, BS] tile with one variable shift per element (each byte
# fetched once per token in it) and spends ~0.6 SASS instructions per KV byte (int4; 1.1 for
# int2) against the dense kernel's few hundredths. This one walks a page as P planes of R =
# BS / P tokens {r * P + i} (benchmarks/compile_check.py --sass counts the difference):
# - codes are loaded as int32 words (4 channels of one byte row), each byte once, and decoded two
#   elements per instruction with the float16 magic-number trick on whole words: (w >> 8h) &
#   (mask << f * bits) | 0x64006400 is two float16 1024 + code * 2**(f * bits), channels
#   (4j + h, 4j + h + 2), no shift at all for half of them (every field of a byte fits float16's
#   10-bit mantissa); int8 codes likewise (w ^ 0x80808080 first: 1152 + code);
# - the tile's columns therefore hold the channels in the order 4j + h + 2e (PERM below): q is
#   loaded in that order for K, and the output stored in it for V: free;
# - the field's weight 2**(f * bits) and the magic offset come out of the scores as one FMA
#   per score (K), and out of p's per-token factor (V); the page's K scale folds into q once
#   per page, whatever the plane count;
# - one online-softmax update per page over all its planes.
# p x scale x SC keeps float16 operands out of subnormals; undone at the end
SC = tl.constexpr(256.0) if HAS_TRITON else 256.0


@jit
def _perm(c):
    """Channel held by column c of a word-decoded tile: 4j + 2h + e -> 4j + h + 2e."""
    return (c // 4) * 4 + (c // 2) % 2 + (c % 2) * 2


@jit
def _side_tile(codes, ph, i: tl.constexpr, c0: tl.constexpr, ok, KIND: tl.constexpr, BITS: tl.constexpr,
               KP: tl.constexpr, P: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, NC: tl.constexpr):
    """Plane i (tokens r * P + i) of one page-head, columns [c0, c0 + NC): [BS // P, NC] in the
    dot dtype. KIND 3: float16 1024 + code * 2**((i % KP) * BITS), channels in PERM order;
    KIND 1: float16 1152 + code, PERM order; KIND 2: float16 (exact e4m3); KIND 0: as stored.
    ok [R]: the plane's tokens that exist (a no-ring codec's last page may be partly written,
    and an fp8 or dense garbage row could be NaN, which 0 x NaN would spread)."""
    R: tl.constexpr = BS // P
    r = tl.arange(0, R)
    if KIND == 3 or KIND == 1:
        J: tl.constexpr = NC // 4
        row = r * (P // KP) + i // KP  # byte row holding token r * P + i
        w = tl.load(codes + ph * (BS // KP * D // 4)  # codes: int32 words (the wrapper's view)
                    + (row[:, None] * (D // 4) + c0 // 4 + tl.arange(0, J)[None, :]))
        if KIND == 3:
            M: tl.constexpr = (((1 << BITS) - 1) * 0x10001) << ((i % KP) * BITS)
            x0 = (w & M) | 0x64006400
            x1 = ((w >> 8) & M) | 0x64006400
        else:
            u = w ^ -0x7F7F7F80  # 0x80808080: int8 -> uint8 offset by 128, per byte
            x0 = (u & 0x00FF00FF) | 0x64006400
            x1 = ((u >> 8) & 0x00FF00FF) | 0x64006400
        y = tl.join(x0, x1)  # [R, J, 2]: h
        z = tl.join(y.to(tl.int16), (y >> 16).to(tl.int16))  # [R, J, 2, 2]: h, e
        tile = tl.reshape(z, [R, NC]).to(tl.float16, bitcast=True)
    else:
        c = c0 + tl.arange(0, NC)
        x = tl.load(codes + ph * (BS * D) + ((r * P + i)[:, None] * D + c[None, :]), mask=ok[:, None], other=0)
        if KIND == 2:
            tile = x.to(tl.float8e4nv, bitcast=True).to(tl.float16)
        else:
            tile = x
    return tile


@jit
def _plane_scores(qk16, qh, qd, kbias, ksum, ph, i: tl.constexpr, t, k_codes, k_meta, scale_log2,
                  K_KIND: tl.constexpr, K_BITS: tl.constexpr, KP: tl.constexpr, P: tl.constexpr, BS: tl.constexpr,
                  D: tl.constexpr, DOT_PREC: tl.constexpr):
    """Scores x log2(e) / sqrt(D) of plane i's tokens t [R] (in the page): float32 [M, R].
    KIND 3: qk16 = q x the page's K scale, kbias = q . zero, ksum = sum of qk16 (the magic
    offset's share); KIND 1: kbias = 1152 x sum of qh."""
    kt = _side_tile(k_codes, ph, i, 0, t < BS, K_KIND, K_BITS, KP, P, BS, D, D)
    if K_KIND == 3:
        W: tl.constexpr = 1.0 / (1 << ((i % KP) * K_BITS))
        s = tl.dot(qk16, tl.trans(kt)) * (W * scale_log2) + ((kbias - (1024.0 * W) * ksum) * scale_log2)[:, None]
    elif K_KIND == 0:
        s = tl.dot(qd, tl.trans(kt.to(qd.dtype)), input_precision=DOT_PREC) * scale_log2
    else:
        ksc = tl.load(k_meta + ph * BS + t).to(tl.float32) * scale_log2
        s = tl.dot(qh, tl.trans(kt))
        if K_KIND == 1:
            s = s - kbias[:, None]
        s = s * ksc[None, :]
    return s


@jit
def _plane_pv(acc, vb, p, qd, ph, i: tl.constexpr, g: tl.constexpr, t, ok, v_codes, v_meta,
              V_KIND: tl.constexpr, V_BITS: tl.constexpr, VP: tl.constexpr, P: tl.constexpr, BS: tl.constexpr,
              D: tl.constexpr, VG: tl.constexpr, DOT_PREC: tl.constexpr):
    """acc [M, VG] (x SC) += p [M, R] times plane i's V, channels of group g; vb [M] (x SC): the
    row bias the magic offsets and zero points leave. t [R]: the plane's tokens in the page."""
    vt = _side_tile(v_codes, ph, i, g * VG, ok, V_KIND, V_BITS, VP, P, BS, D, VG)
    if V_KIND == 3:
        NG: tl.constexpr = D // VG
        W: tl.constexpr = SC / (1 << ((i % VP) * V_BITS))
        vmeta = v_meta + ph * (BS * 2 * NG) + g + t * (2 * NG)
        vs = tl.load(vmeta).to(tl.float32)
        vz = tl.load(vmeta + NG).to(tl.float32)
        pg = (p * (vs * W)[None, :]).to(tl.float16)
        acc = tl.dot(pg, vt, acc)
        vb += tl.sum(p * (vz * SC)[None, :] - pg.to(tl.float32) * 1024.0, axis=1)
    elif V_KIND == 0:
        acc = tl.dot((p * SC).to(qd.dtype), vt.to(qd.dtype), acc, input_precision=DOT_PREC)
    else:
        vsc = tl.load(v_meta + ph * BS + t, mask=ok, other=0.0).to(tl.float32)
        pg = (p * (vsc * SC)[None, :]).to(tl.float16)
        acc = tl.dot(pg, vt, acc)
        if V_KIND == 1:
            vb -= 1152.0 * tl.sum(pg.to(tl.float32), axis=1)
    return acc, vb


@jit
def _attend_page_planes(qk16, qh, qd, kbias, ksum, m_i, l_i, acc0, acc1, vb0, vb1, ph, p0, kv_len, qpos, window,
                        k_codes, k_meta, v_codes, v_meta, scale_log2,
                        K_KIND: tl.constexpr, K_BITS: tl.constexpr, KP: tl.constexpr,
                        V_KIND: tl.constexpr, V_BITS: tl.constexpr, VP: tl.constexpr, P: tl.constexpr,
                        BS: tl.constexpr, D: tl.constexpr, VG: tl.constexpr, DOT_PREC: tl.constexpr):
    """One sealed page, all P planes, one online-softmax update (up to 4 planes)."""
    NG: tl.constexpr = D // VG
    R: tl.constexpr = BS // P
    r = tl.arange(0, R)
    t0 = r * P
    # decode: every query row sits at qpos, so the mask is one [R] vector per plane
    pos0 = p0 + t0
    s0 = _plane_scores(qk16, qh, qd, kbias, ksum, ph, 0, t0, k_codes, k_meta, scale_log2, K_KIND, K_BITS, KP, P, BS, D,
                       DOT_PREC)
    s0 = tl.where(((pos0 < kv_len) & (qpos - pos0 < window))[None, :], s0, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s0, axis=1))
    if P >= 2:
        pos1 = pos0 + 1
        s1 = _plane_scores(qk16, qh, qd, kbias, ksum, ph, 1, t0 + 1, k_codes, k_meta, scale_log2, K_KIND, K_BITS, KP, P, BS,
                           D, DOT_PREC)
        s1 = tl.where(((pos1 < kv_len) & (qpos - pos1 < window))[None, :], s1, float("-inf"))
        m_new = tl.maximum(m_new, tl.max(s1, axis=1))
    if P >= 4:
        pos2 = pos0 + 2
        s2 = _plane_scores(qk16, qh, qd, kbias, ksum, ph, 2, t0 + 2, k_codes, k_meta, scale_log2, K_KIND, K_BITS, KP, P, BS,
                           D, DOT_PREC)
        s2 = tl.where(((pos2 < kv_len) & (qpos - pos2 < window))[None, :], s2, float("-inf"))
        pos3 = pos0 + 3
        s3 = _plane_scores(qk16, qh, qd, kbias, ksum, ph, 3, t0 + 3, k_codes, k_meta, scale_log2, K_KIND, K_BITS, KP, P, BS,
                           D, DOT_PREC)
        s3 = tl.where(((pos3 < kv_len) & (qpos - pos3 < window))[None, :], s3, float("-inf"))
        m_new = tl.maximum(m_new, tl.maximum(tl.max(s2, axis=1), tl.max(s3, axis=1)))
    m_base = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that saw nothing yet: no NaN
    alpha = tl.exp2(m_i - m_base)
    acc0 = acc0 * alpha[:, None]
    vb0 = vb0 * alpha
    if NG == 2:
        acc1 = acc1 * alpha[:, None]
        vb1 = vb1 * alpha
    p = tl.exp2(s0 - m_base[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc0, vb0 = _plane_pv(acc0, vb0, p, qd, ph, 0, 0, t0, p0 + t0 < kv_len, v_codes, v_meta, V_KIND, V_BITS, VP, P, BS, D, VG, DOT_PREC)
    if NG == 2:
        acc1, vb1 = _plane_pv(acc1, vb1, p, qd, ph, 0, 1, t0, p0 + t0 < kv_len, v_codes, v_meta, V_KIND, V_BITS, VP, P, BS, D, VG,
                              DOT_PREC)
    if P >= 2:
        p = tl.exp2(s1 - m_base[:, None])
        l_i += tl.sum(p, axis=1)
        acc0, vb0 = _plane_pv(acc0, vb0, p, qd, ph, 1, 0, t0 + 1, p0 + t0 + 1 < kv_len, v_codes, v_meta, V_KIND, V_BITS, VP, P, BS, D, VG,
                              DOT_PREC)
        if NG == 2:
            acc1, vb1 = _plane_pv(acc1, vb1, p, qd, ph, 1, 1, t0 + 1, p0 + t0 + 1 < kv_len, v_codes, v_meta, V_KIND, V_BITS, VP, P, BS, D,
                                  VG, DOT_PREC)
    if P >= 4:
        p = tl.exp2(s2 - m_base[:, None])
        l_i += tl.sum(p, axis=1)
        acc0, vb0 = _plane_pv(acc0, vb0, p, qd, ph, 2, 0, t0 + 2, p0 + t0 + 2 < kv_len, v_codes, v_meta, V_KIND, V_BITS, VP, P, BS, D, VG,
                              DOT_PREC)
        if NG == 2:
            acc1, vb1 = _plane_pv(acc1, vb1, p, qd, ph, 2, 1, t0 + 2, p0 + t0 + 2 < kv_len, v_codes, v_meta, V_KIND, V_BITS, VP, P, BS, D,
                                  VG, DOT_PREC)
        p = tl.exp2(s3 - m_base[:, None])
        l_i += tl.sum(p, axis=1)
        acc0, vb0 = _plane_pv(acc0, vb0, p, qd, ph, 3, 0, t0 + 3, p0 + t0 + 3 < kv_len, v_codes, v_meta, V_KIND, V_BITS, VP, P, BS, D, VG,
                              DOT_PREC)
        if NG == 2:
            acc1, vb1 = _plane_pv(acc1, vb1, p, qd, ph, 3, 1, t0 + 3, p0 + t0 + 3 < kv_len, v_codes, v_meta, V_KIND, V_BITS, VP, P, BS, D,
                                  VG, DOT_PREC)
    return m_new, l_i, acc0, acc1, vb0, vb1


@jit
def _columns_to_perm(x, N: tl.constexpr, C: tl.constexpr):
    """[N, C] tile in channel order -> the same tile in PERM column order (no memory access)."""
    return tl.reshape(tl.permute(tl.reshape(x, [N, C // 4, 2, 2]), (0, 1, 3, 2)), [N, C])


@jit
def _attend_ring_perm(qn, m_i, l_i, acc0, acc1, r0, r_hi, qpos, window, kh, seq_slot, ring_k, ring_v, scale_log2,
                      PERM_V: tl.constexpr, KVH: tl.constexpr, D: tl.constexpr,
                      VG: tl.constexpr, CAP: tl.constexpr, BN: tl.constexpr, DOT_PREC: tl.constexpr):
    """`_attend_ring` with q in channel order (qn) and the output in the planes kernel's (acc x SC)."""
    NG: tl.constexpr = D // VG
    off, ok, s, m_new, m_base, alpha = _ring_scores(qn, m_i, r0, r_hi, qpos, window, kh, seq_slot, ring_k, scale_log2,
                                                    KVH, D, CAP, BN, DOT_PREC)
    p = tl.exp2(s - m_base[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    p = (p * SC).to(qn.dtype)
    c = tl.arange(0, VG)
    v0 = tl.load(ring_v + off[:, None] + c[None, :], mask=ok[:, None], other=0.0).to(qn.dtype)
    if PERM_V:
        v0 = _columns_to_perm(v0, BN, VG)
    acc0 = acc0 * alpha[:, None] + tl.dot(p, v0, input_precision=DOT_PREC)
    if NG == 2:
        v1 = tl.load(ring_v + off[:, None] + VG + c[None, :], mask=ok[:, None], other=0.0).to(qn.dtype)
        if PERM_V:
            v1 = _columns_to_perm(v1, BN, VG)
        acc1 = acc1 * alpha[:, None] + tl.dot(p, v1, input_precision=DOT_PREC)
    return m_new, l_i, acc0, acc1


@jit(do_not_specialize=('bt_stride', 'num_splits'))
def _quant_decode_planes_kernel(q, k_codes, k_meta, v_codes, v_meta, ring_k, ring_v, block_tables, context_lens,
                                seq_slots, out, part_m, part_l, part_acc, scale_log2, window, bt_stride, num_splits,
                                K_KIND: tl.constexpr, K_BITS: tl.constexpr, KP: tl.constexpr,
                                V_KIND: tl.constexpr, V_BITS: tl.constexpr, VP: tl.constexpr, P: tl.constexpr,
                                NUM_HEADS: tl.constexpr, KVH: tl.constexpr, BS: tl.constexpr, D: tl.constexpr,
                                VG: tl.constexpr, RING: tl.constexpr, RESID: tl.constexpr, CAP: tl.constexpr,
                                QG: tl.constexpr, QG_PAD: tl.constexpr, SINGLE_SPLIT: tl.constexpr,
                                DOT_PREC: tl.constexpr, BF16: tl.constexpr):
    b = tl.program_id(0)
    kh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len, lo, hi = split_span(context_lens, b, split, num_splits, window, BS, BS)
    if lo >= hi:
        return
    if RING:
        n_sealed = tl.maximum(seq_len - RESID, 0) // BS * BS
    else:
        n_sealed = seq_len
    PERM_K: tl.constexpr = K_KIND == 1 or K_KIND == 3
    PERM_V: tl.constexpr = V_KIND == 1 or V_KIND == 3
    NG: tl.constexpr = D // VG
    rows = tl.arange(0, QG_PAD)
    d = tl.arange(0, D)
    if PERM_K:
        d = _perm(d)
    q_mask = (rows[:, None] < QG) & (d[None, :] < D)
    qd = tl.load(q + (b * NUM_HEADS + kh * QG + rows[:, None]) * D + d[None, :], mask=q_mask, other=0.0)
    qf = qd.to(tl.float32)
    qh = qd.to(tl.float16)
    kbias = tl.zeros([QG_PAD], tl.float32)
    ksum = tl.zeros([QG_PAD], tl.float32)
    if K_KIND == 1:
        kbias = 1152.0 * tl.sum(qh.to(tl.float32), axis=1)
    qk16 = qh
    qpos = seq_len - 1
    m_i = tl.full([QG_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([QG_PAD], tl.float32)
    acc0 = tl.zeros([QG_PAD, VG], tl.float32)
    acc1 = tl.zeros([QG_PAD, VG], tl.float32)
    vb0 = tl.zeros([QG_PAD], tl.float32)
    vb1 = tl.zeros([QG_PAD], tl.float32)
    for p0 in range(lo, tl.minimum(hi, n_sealed), BS):
        page = tl.load(block_tables + b * bt_stride + p0 // BS).to(tl.int64)
        ph = page * KVH + kh
        if K_KIND == 3:  # the page's per-channel scale folds into q, its zero point into a row bias
            kmeta = k_meta + ph * (2 * D) + d
            ks = tl.load(kmeta).to(tl.float32)
            kz = tl.load(kmeta + D).to(tl.float32)
            qk16 = (qf * ks[None, :]).to(tl.float16)
            kbias = tl.sum(qf * kz[None, :], axis=1)
            ksum = tl.sum(qk16.to(tl.float32), axis=1)
        m_i, l_i, acc0, acc1, vb0, vb1 = _attend_page_planes(
            qk16, qh, qd, kbias, ksum, m_i, l_i, acc0, acc1, vb0, vb1, ph, p0, seq_len, qpos, window,
            k_codes, k_meta, v_codes, v_meta, scale_log2,
            K_KIND, K_BITS, KP, V_KIND, V_BITS, VP, P, BS, D, VG, DOT_PREC)
    acc0 += vb0[:, None]
    if NG == 2:
        acc1 += vb1[:, None]
    if RING:
        seq_slot = tl.load(seq_slots + b)
        r_lo = tl.maximum(lo, n_sealed)
        if seq_slot < 0:
            r_lo = hi  # padding row of a CUDA graph: nothing in a ring
        qpos_v = tl.zeros([QG_PAD], tl.int32) + qpos
        dn = tl.arange(0, D)  # the ring is read in channel order, q with it
        qn = tl.load(q + (b * NUM_HEADS + kh * QG + rows[:, None]) * D + dn[None, :],
                     mask=(rows[:, None] < QG) & (dn[None, :] < D), other=0.0)
        for r0 in range(r_lo, hi, BS):
            m_i, l_i, acc0, acc1 = _attend_ring_perm(qn, m_i, l_i, acc0, acc1, r0, hi, qpos_v, window, kh, seq_slot,
                                                     ring_k, ring_v, scale_log2, PERM_V, KVH, D, VG, CAP, BS, DOT_PREC)
    c = tl.arange(0, VG)
    if PERM_V:
        c = _perm(c)
    _store_decode(out, part_m, part_l, part_acc, b, kh, split, num_splits, rows, c, m_i, l_i, acc0, acc1,
                  1.0 / SC, NUM_HEADS, QG, D, VG, SINGLE_SPLIT)  # p was carried x SC


@jit(do_not_specialize=('bt_stride', 'num_seqs'))
def _quant_prefill_kernel(q, k_codes, k_meta, v_codes, v_meta, ring_k, ring_v, k_new, v_new, block_tables,
                          cu_seqlens_q, context_lens, seq_slots, out, scale_log2, window, bt_stride, num_seqs,
                          K_KIND: tl.constexpr, K_BITS: tl.constexpr, KP: tl.constexpr,
                          V_KIND: tl.constexpr, V_BITS: tl.constexpr, VP: tl.constexpr, P: tl.constexpr,
                          NUM_HEADS: tl.constexpr, KVH: tl.constexpr, BS: tl.constexpr, D: tl.constexpr,
                          VG: tl.constexpr, RING: tl.constexpr, RESID: tl.constexpr, CAP: tl.constexpr,
                          BLOCK_M: tl.constexpr, GP: tl.constexpr, DOT_PREC: tl.constexpr, BF16: tl.constexpr):
    """Each query row t sees exactly what decoding token by token would have shown it: keys
    before n_sealed(t + 1) from their (sealed) pages, the rest exact, from the ring (positions
    cached before this step: the ring is written after this kernel) or from this step's new
    rows. So a sequence's outputs do not depend on how its prompt was chunked or batched.

    A program takes BLOCK_M rows = BLOCK_M / GP tokens x GP query heads of one KV head (GQA
    packing, row r = token r // GP, head r % GP of the program's GP): each page's codes are
    unpacked, scaled and fed to the tensor cores once for GP heads, not once per head."""
    TOK: tl.constexpr = BLOCK_M // GP
    GROUPS: tl.constexpr = NUM_HEADS // KVH // GP  # programs per KV head
    kh = tl.program_id(1) // GROUPS
    b, q_start, q_len, m0 = tile_of_sequence(cu_seqlens_q, num_seqs, tl.program_id(0), TOK)
    if m0 >= q_len:
        return
    seq_len = tl.load(context_lens + b)
    len_old = seq_len - q_len
    r = tl.arange(0, BLOCK_M)
    offs_m = m0 + r // GP  # [M] each row's token
    hrow = tl.program_id(1) * GP + r % GP  # [M] each row's query head
    qpos = len_old + offs_m
    d = tl.arange(0, D)
    q_mask = (offs_m[:, None] < q_len) & (d[None, :] < D)
    q_off = ((q_start + offs_m[:, None]).to(tl.int64) * NUM_HEADS + hrow[:, None]) * D + d[None, :]
    qd = tl.load(q + q_off, mask=q_mask, other=0.0)
    kv_hi = len_old + tl.minimum(m0 + TOK, q_len)
    kv_lo = tl.maximum(len_old + m0 - window + 1, 0) // BS * BS
    NG: tl.constexpr = D // VG
    t = tl.arange(0, BS)
    c = tl.arange(0, VG)
    if RING:
        seq_slot = tl.load(seq_slots + b).to(tl.int64)
        ns_rows = tl.maximum(qpos + 1 - RESID, 0) // BS * BS  # [M] what decode at each row had sealed
        ns_first = tl.maximum(len_old + m0 + 1 - RESID, 0) // BS * BS
        ns_last = tl.maximum(kv_hi - RESID, 0) // BS * BS  # of the tile's last real row
        ns_old = tl.maximum(len_old - RESID, 0) // BS * BS  # ring slots below this are stale
    else:
        ns_rows = qpos + 1
        ns_first = kv_hi  # every key of a no-ring codec is read from its page
        ns_last = kv_hi
        ns_old = 0
        seq_slot = 0
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc0 = tl.zeros([BLOCK_M, VG], tl.float32)
    acc1 = tl.zeros([BLOCK_M, VG], tl.float32)
    for p0 in range(kv_lo, kv_hi, BS):
        pos = p0 + t
        ok = pos < kv_hi
        any_q = p0 < ns_last  # some row reads this page quantized (then it is sealed)
        any_x = ns_first <= p0  # some row reads it exact
        rows_q = ns_rows > p0  # [M]
        page = tl.load(block_tables + b * bt_stride + p0 // BS).to(tl.int64)  # allocated: p0 < seq_len
        # exact K/V of the page's positions: the ring below len_old (still this step's old
        # contents), this step's rows from len_old on
        from_ring = (pos >= ns_old) & (pos < len_old)
        from_new = (pos >= len_old) & ok
        roff = ((seq_slot * CAP + pos % CAP) * KVH + kh) * D
        noff = ((q_start + pos - len_old).to(tl.int64) * KVH + kh) * D
        s = tl.zeros([BLOCK_M, BS], tl.float32)
        if any_q:
            # q's float32 / float16 copies made per page, not held across the loop (registers: the
            # int4 kernel spilled ~1.4 KB per thread with them held at 32-row tiles)
            s_q = _page_scores(qd.to(tl.float32), qd, qd.to(tl.float16), page, p0, seq_len, kh, k_codes, k_meta,
                               K_KIND, K_BITS, KP, KVH, BS, D,
                               DOT_PREC, BF16)
            s = tl.where(rows_q[:, None], s_q, s)
        if any_x:
            kx = (tl.load(ring_k + roff[None, :] + d[:, None], mask=from_ring[None, :], other=0.0)
                  + tl.load(k_new + noff[None, :] + d[:, None], mask=from_new[None, :], other=0.0))
            s_x = tl.dot(qd, kx.to(qd.dtype), input_precision=DOT_PREC)
            s = tl.where(rows_q[:, None], s, s_x)
        p, alpha, m_i, l_i = _softmax_step(s, qpos, pos, ok, window, scale_log2, m_i, l_i)
        acc0 = acc0 * alpha[:, None]
        acc1 = acc1 * alpha[:, None]
        if any_q:
            pq = tl.where(rows_q[:, None], p, 0.0)
            ph = page * KVH + kh
            acc0 += _pv_group(pq, qd, ph, t, pos < seq_len, 0, v_codes, v_meta, V_KIND, V_BITS, VP, BS, D, VG,
                              DOT_PREC, BF16)
            if NG == 2:
                acc1 += _pv_group(pq, qd, ph, t, pos < seq_len, 1, v_codes, v_meta, V_KIND, V_BITS, VP, BS, D, VG,
                                  DOT_PREC, BF16)
        if any_x:
            px = tl.where(rows_q[:, None], 0.0, p).to(qd.dtype)
            vx0 = (tl.load(ring_v + roff[:, None] + c[None, :], mask=from_ring[:, None], other=0.0)
                   + tl.load(v_new + noff[:, None] + c[None, :], mask=from_new[:, None], other=0.0))
            acc0 += tl.dot(px, vx0.to(qd.dtype), input_precision=DOT_PREC)
            if NG == 2:
                vx1 = (tl.load(ring_v + roff[:, None] + VG + c[None, :], mask=from_ring[:, None], other=0.0)
                       + tl.load(v_new + noff[:, None] + VG + c[None, :], mask=from_new[:, None], other=0.0))
                acc1 += tl.dot(px, vx1.to(qd.dtype), input_precision=DOT_PREC)
    inv = 1.0 / tl.where(l_i > 0, l_i, 1.0)
    o_off = ((q_start + offs_m[:, None]).to(tl.int64) * NUM_HEADS + hrow[:, None]) * D + c[None, :]
    o_mask = (offs_m[:, None] < q_len) & (c[None, :] < VG)
    tl.store(out + o_off, (acc0 * inv[:, None]).to(out.dtype.element_ty), mask=o_mask)
    if NG == 2:
        tl.store(out + o_off + VG, (acc1 * inv[:, None]).to(out.dtype.element_ty), mask=o_mask)


def _consts(lay: QuantLayout, q: torch.Tensor) -> dict:
    return dict(K_KIND=lay.k_kind, K_BITS=lay.k_bits, KP=lay.k_planes, V_KIND=lay.v_kind, V_BITS=lay.v_bits,
                VP=lay.v_planes, P=lay.planes, KVH=lay.num_kv_heads, BS=lay.block_size, D=lay.head_dim,
                VG=lay.v_group if lay.v_kind == KIND_GROUP else lay.head_dim, RING=lay.ring, RESID=lay.residual, CAP=max(lay.ring_cap, 1),
                # fp32: 3xTF32 keeps ~fp32 accuracy on tensor cores
                DOT_PREC="tf32x3" if q.dtype == torch.float32 else "tf32", BF16=not interpreting())


def _check(lay: QuantLayout, q, storage, block_tables, context_lens, seq_slots, sliding_window):
    require(q.dim() == 3 and q.shape[2] == lay.head_dim and q.shape[1] % lay.num_kv_heads == 0,
            f"q must be [T, num_heads (a multiple of {lay.num_kv_heads}), {lay.head_dim}], got {tuple(q.shape)}")
    require(q.dtype in FLOAT_DTYPES and q.is_contiguous(), f"q must be a contiguous float tensor, got {q.dtype}")
    B = context_lens.shape[0]
    require(block_tables.dim() == 2 and block_tables.shape[0] == B and block_tables.dtype == torch.int32,
            f"block_tables must be int32 [B={B}, max_blocks], got {block_tables.dtype} {tuple(block_tables.shape)}")
    require(context_lens.dtype == torch.int32, f"context_lens must be int32, got {context_lens.dtype}")
    if lay.ring:
        require(seq_slots is not None and seq_slots.shape == (B,) and seq_slots.dtype == torch.int32,
                f"seq_slots must be int32 [B={B}] for a codec with a residual window")
    require(sliding_window >= 0, f"sliding_window must be >= 0, got {sliding_window}")


def quant_paged_decode(lay: QuantLayout, q: torch.Tensor, storage, block_tables: torch.Tensor,
                       context_lens: torch.Tensor, seq_slots: torch.Tensor | None, scale: float,
                       sliding_window: int = 0, *, max_context_len: int | None = None, num_splits: int | None = None,
                       min_split_tokens: int = 256, waves: int = 8, num_warps: int = 4,
                       num_stages: int = 2, variant: str | None = None) -> torch.Tensor:
    """Attention of each sequence's newest token over its compressed paged context (new K/V
    already written by `write_quant_kv`).

    q: `[B, num_heads, head_dim]`; storage: the layer's `QuantKV`; block_tables int32
    `[B, max_blocks]`; context_lens int32 `[B]` (>= 1, counting the new token); seq_slots int32
    `[B]` (ring slot, -1 = a padding row) when the codec has a residual window. Returns
    `[B, num_heads, head_dim]` in q's dtype. Knobs as `paged_decode` (splits cover whole pages),
    and `waves`: programs per SM the split plan aims for, over 2. `variant`: "planes" (word
    decode, `_quant_decode_planes_kernel`) or "tiles" (the first kernel, byte tiles); None: planes
    unless a side packs 4 tokens per byte (int2), where the planes kernel's per-plane softmax
    reductions still cost more SASS per byte than its cheaper unpacking saves (compile_check).
    """
    if variant is None:
        variant = "tiles" if lay.planes >= 4 else "planes"
    require(variant in DECODE_VARIANTS, f"variant must be one of {sorted(DECODE_VARIANTS)}, got {variant!r}")
    _check(lay, q, storage, block_tables, context_lens, seq_slots, sliding_window)
    B, H, D = q.shape
    out = torch.empty_like(q)
    if B == 0:
        return out
    require_launchable(q, storage.k, block_tables, context_lens)
    KVH, BS = lay.num_kv_heads, lay.block_size
    qg = H // KVH
    window = sliding_window if sliding_window > 0 else _NO_WINDOW
    if max_context_len is None:
        max_context_len = int(context_lens.max())
    span = max(1, min(max_context_len, window) + BS)  # + BS: the aligned start may reach one page back
    # A compressed page is a few KB and costs arithmetic to unpack: more programs in flight than
    # the dense kernel's ~2 waves keep the memory system busy (`waves` of the GPU's SMs).
    num_splits, _ = split_plan(B * KVH, span, num_sms(q.device) * waves // 2, BS, min_split_tokens, num_splits)
    single = num_splits == 1
    if single:
        part_m = part_l = part_acc = out
    else:
        part_m = torch.empty((B, H, num_splits), dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty((B, H, num_splits, D), dtype=torch.float32, device=q.device)
    slots = seq_slots if seq_slots is not None else context_lens
    k_codes, v_codes = storage.k, storage.v
    if variant == "planes":  # integer codes are read as int32 words of 4 channels
        k_codes = k_codes.view(torch.int32) if lay.k_kind in (KIND_INT8, KIND_GROUP) else k_codes
        v_codes = v_codes.view(torch.int32) if lay.v_kind in (KIND_INT8, KIND_GROUP) else v_codes
    DECODE_VARIANTS[variant][(B, KVH, num_splits)](
        q, k_codes, storage.k_meta, v_codes, storage.v_meta, storage.ring_k, storage.ring_v, block_tables,
        context_lens, slots, out, part_m, part_l, part_acc, float(scale) * math.log2(math.e), window,
        block_tables.stride(0), num_splits, NUM_HEADS=H, QG=qg, QG_PAD=max(16, next_pow2(qg)), SINGLE_SPLIT=single,
        num_warps=num_warps, num_stages=num_stages, **_consts(lay, q))
    if not single:
        _decode_merge_kernel[(B, H)](out, part_m, part_l, part_acc, context_lens, window, num_splits,
                                     NUM_HEADS=H, HEAD_DIM=D, BLOCK_D=D, BLOCK_S=next_pow2(num_splits), BLOCK_N=BS,
                                     ALIGN=BS, num_warps=4)
    return out


DECODE_VARIANTS = {"tiles": _quant_decode_kernel, "planes": _quant_decode_planes_kernel}


def gqa_pack(group: int, block_m: int) -> int:
    """Query heads of one KV head that a prefill program takes together: the largest power of two
    dividing the GQA group, at most block_m / 16 (a tile keeps >= 16 tokens)."""
    gp = 1
    while group % (gp * 2) == 0 and gp * 2 <= block_m // 16:
        gp *= 2
    return gp


def quant_paged_prefill(lay: QuantLayout, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, storage,
                        block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor,
                        seq_slots: torch.Tensor | None, scale: float, sliding_window: int = 0, *, block_m: int = 64,
                        num_warps: int = 8, num_stages: int = 2) -> torch.Tensor:
    """Causal attention of the packed new tokens (q: `[T, num_heads, head_dim]`, their k, v:
    `[T, KVH, D]`, offsets cu_seqlens_q int32 `[B+1]`) over their sequences' compressed pages,
    rings and the new rows, as decoding would have seen it: query t reads positions below
    n_sealed(t + 1) from their pages (this step's pages sealed by `write_quant_kv(...,
    phase="seal")` first) and the rest exact (the ring, written only after this call, and the new
    rows). Returns `[T, num_heads, head_dim]` in q's dtype. A program's block_m rows are block_m /
    GP tokens x GP query heads sharing a KV head (`gqa_pack`): the H200 step profile of a 24 x
    3072-token int4 load (benchmarks/results/step-profile-llama3-8b-20261204-183355) spent 13.8 ms
    per 1024-token chunk in this kernel against bf16's 1.8, unpacking every page once per head.
    block_m 64 with 8 warps: int4's sm_90 compile spills 264 bytes per thread (int8: none)."""
    _check(lay, q, storage, block_tables, context_lens, seq_slots, sliding_window)
    require(k.shape == v.shape == (q.shape[0], lay.num_kv_heads, lay.head_dim) and k.is_contiguous()
            and v.is_contiguous(), f"k, v must be contiguous [T, {lay.num_kv_heads}, {lay.head_dim}]")
    T, H, D = q.shape
    B = context_lens.shape[0]
    out = torch.empty_like(q)
    if T == 0 or B == 0:
        return out
    require_launchable(q, storage.k, block_tables, context_lens, cu_seqlens_q)
    require(block_m >= 16 and block_m & (block_m - 1) == 0, f"block_m must be a power of two >= 16, got {block_m}")
    slots = seq_slots if seq_slots is not None else context_lens
    group = H // lay.num_kv_heads
    gp = gqa_pack(group, block_m)
    _quant_prefill_kernel[(T // (block_m // gp) + B, H // gp)](
        q, storage.k, storage.k_meta, storage.v, storage.v_meta, storage.ring_k, storage.ring_v, k, v, block_tables,
        cu_seqlens_q, context_lens, slots, out, float(scale) * math.log2(math.e),
        sliding_window if sliding_window > 0 else _NO_WINDOW, block_tables.stride(0), B,
        NUM_HEADS=H, BLOCK_M=block_m, GP=gp, num_warps=num_warps, num_stages=num_stages, **_consts(lay, q))
    return out


# ----------------------------------------------------------------------------- references


def gather_kv_ref(lay: QuantLayout, storage, block_table: torch.Tensor, seq_slot: int, length: int):
    """One sequence's K and V, float32 `[length, KVH, D]`, as the kernels read them: sealed
    pages dequantized, the rest from its ring."""
    BS, H, D = lay.block_size, lay.num_kv_heads, lay.head_dim
    sealed = lay.n_sealed(length)
    pages = block_table[: cdiv(sealed, BS)].long()
    out = []
    for is_k in (True, False):
        codes, meta = (storage.k, storage.k_meta) if is_k else (storage.v, storage.v_meta)
        x = dequantize_pages_ref(lay, is_k, codes[pages], meta[pages] if meta.numel() else meta)
        x = x.permute(0, 2, 1, 3).reshape(-1, H, D)[:sealed]
        if length > sealed:
            ring = storage.ring_k if is_k else storage.ring_v
            pos = torch.arange(sealed, length, device=ring.device)
            x = torch.cat([x, ring[seq_slot, pos % lay.ring_cap].float()])
        out.append(x)
    return out[0], out[1]


def _attend_ref(q, k, v, qpos, scale, sliding_window):
    """q [M, H, D] at positions qpos [M]; k, v [L, KVH, D] float32 -> [M, H, D] float32."""
    M, H, D = q.shape
    KVH = k.shape[1]
    qf = q.float().view(M, KVH, H // KVH, D)
    scores = torch.einsum("mkgd,lkd->kgml", qf, k) * scale
    dist = qpos[:, None] - torch.arange(k.shape[0], device=q.device)[None, :]
    allowed = (dist >= 0) & ((dist < sliding_window) if sliding_window > 0 else True)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("kgml,lkd->mkgd", scores.softmax(-1), v).reshape(M, H, D)


def gather_batch_ref(lay: QuantLayout, storage, block_tables: torch.Tensor, seq_slots: torch.Tensor | None,
                     lens: torch.Tensor):
    """`gather_kv_ref` for B sequences at once: K and V float32 `[B, max(lens), KVH, D]` (zeros
    past each length): every needed page dequantized in one call, the rings gathered in one."""
    BS, H, D = lay.block_size, lay.num_kv_heads, lay.head_dim
    B, L = lens.shape[0], int(lens.max())
    dev = block_tables.device
    lens = lens.long()
    sealed = (lens - lay.residual).clamp(min=0) // BS * BS if lay.ring else lens
    npages = (sealed + BS - 1) // BS
    j = torch.arange(int(npages.max()) if B else 0, device=dev)
    need = j[None, :] < npages[:, None]  # [B, NP]
    rows, cols = need.nonzero(as_tuple=True)
    pages = block_tables.long()[rows, cols]
    out = []
    for is_k in (True, False):
        codes, meta = (storage.k, storage.k_meta) if is_k else (storage.v, storage.v_meta)
        x = torch.zeros(B, L + BS, H, D, dtype=torch.float32, device=dev)
        if pages.numel():
            deq = dequantize_pages_ref(lay, is_k, codes[pages], meta[pages] if meta.numel() else meta)  # [n, H, BS, D]
            tok = cols[:, None] * BS + torch.arange(BS, device=dev)[None, :]  # [n, BS]
            x[rows[:, None], tok] = deq.permute(0, 2, 1, 3)
            # a partly written last page holds anything past the sealed tokens (maybe NaN)
            keep = torch.arange(L + BS, device=dev)[None, :] < sealed[:, None]
            x = torch.where(keep[:, :, None, None], x, 0.0)
        if lay.ring:
            ring = storage.ring_k if is_k else storage.ring_v
            pos = sealed[:, None] + torch.arange(lay.ring_cap, device=dev)[None, :]  # [B, CAP]
            ok = (pos < lens[:, None]) & (seq_slots.long()[:, None] >= 0)
            b_idx, r_idx = ok.nonzero(as_tuple=True)
            p = pos[b_idx, r_idx]
            x[b_idx, p] = ring[seq_slots.long()[b_idx], p % lay.ring_cap].float()
        out.append(x[:, :L])
    return out[0], out[1]


def quant_paged_decode_ref(lay: QuantLayout, q: torch.Tensor, storage, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, seq_slots: torch.Tensor | None, scale: float,
                           sliding_window: int = 0, **_) -> torch.Tensor:
    """Pure-PyTorch `quant_paged_decode` (float32 math); the CPU path for compressed pages. The
    batch goes through in groups of at most ~64M cached elements (dequantized K and V are
    materialized per group)."""
    _check(lay, q, storage, block_tables, context_lens, seq_slots, sliding_window)
    B, H, D = q.shape
    out = torch.empty_like(q)
    if B == 0:
        return out
    lens = context_lens.long()
    per_seq = max(1, int(lens.max()) * lay.num_kv_heads * D)
    group = max(1, (64 << 20) // per_seq)
    for g0 in range(0, B, group):
        sl = slice(g0, min(B, g0 + group))
        k, v = gather_batch_ref(lay, storage, block_tables[sl], seq_slots[sl] if seq_slots is not None else None,
                                lens[sl])
        n, L = k.shape[0], k.shape[1]
        pos = torch.arange(L, device=q.device)
        valid = pos[None, :] < lens[sl, None]
        if sliding_window > 0:
            valid &= pos[None, :] >= lens[sl, None] - sliding_window
        qf = q[sl].float().view(n, lay.num_kv_heads, H // lay.num_kv_heads, D)
        scores = torch.einsum("bkgd,blkd->bkgl", qf, k) * scale
        scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
        o = torch.einsum("bkgl,blkd->bkgd", scores.softmax(-1), v)
        out[sl] = o.reshape(n, H, D).to(q.dtype)
    return out


def quant_paged_prefill_ref(lay: QuantLayout, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, storage,
                            block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor,
                            seq_slots: torch.Tensor | None, scale: float, sliding_window: int = 0, **_) -> torch.Tensor:
    """Pure-PyTorch `quant_paged_prefill` (float32 math): query t of a sequence reads positions
    below n_sealed(t + 1) dequantized from their pages and the rest exact (ring before this
    step's ring write, new rows)."""
    _check(lay, q, storage, block_tables, context_lens, seq_slots, sliding_window)
    out = torch.empty_like(q)
    cu = cu_seqlens_q.tolist()
    slots = seq_slots.tolist() if seq_slots is not None else [-1] * len(cu)
    BS, H, D = lay.block_size, lay.num_kv_heads, lay.head_dim
    for b, n in enumerate(context_lens.tolist()):
        s, e = cu[b], cu[b + 1]
        if e == s:
            continue
        len_old = n - (e - s)
        sealed = lay.n_sealed(n)
        pages = block_tables[b][: cdiv(sealed, BS)].long()
        quant, exact = [], []
        for is_k, new in ((True, k), (False, v)):
            codes, meta = (storage.k, storage.k_meta) if is_k else (storage.v, storage.v_meta)
            deq = dequantize_pages_ref(lay, is_k, codes[pages], meta[pages] if meta.numel() else meta)
            quant.append(deq.permute(0, 2, 1, 3).reshape(-1, H, D)[:sealed])
            x = torch.zeros(n, H, D, dtype=torch.float32, device=q.device)
            if lay.ring:
                lo = lay.n_sealed(len_old)  # ring slots below this are stale
                pos = torch.arange(lo, len_old, device=q.device)
                x[lo:len_old] = (storage.ring_k if is_k else storage.ring_v)[slots[b], pos % lay.ring_cap].float()
            x[len_old:] = new[s:e].float()
            exact.append(x)
        qpos = len_old + torch.arange(e - s, device=q.device)
        ns = torch.tensor([lay.n_sealed(int(t) + 1) for t in qpos], device=q.device)  # per query row
        use_q = torch.arange(n, device=q.device)[None, :] < ns[:, None]  # [rows, keys]
        qf = q[s:e].float().view(e - s, H, -1, D)
        kq = torch.cat([quant[0], torch.zeros(n - sealed, H, D, device=q.device)])
        vq = torch.cat([quant[1], torch.zeros(n - sealed, H, D, device=q.device)])
        sq = torch.einsum("mkgd,lkd->kgml", qf, kq)
        sx = torch.einsum("mkgd,lkd->kgml", qf, exact[0])
        scores = torch.where(use_q, sq, sx) * scale
        dist = qpos[:, None] - torch.arange(n, device=q.device)[None, :]
        allowed = (dist >= 0) & ((dist < sliding_window) if sliding_window > 0 else True)
        prob = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        o = (torch.einsum("kgml,lkd->mkgd", prob * use_q, vq)
             + torch.einsum("kgml,lkd->mkgd", prob * ~use_q, exact[1]))
        out[s:e] = o.reshape(e - s, -1, D).to(q.dtype)
    return out
