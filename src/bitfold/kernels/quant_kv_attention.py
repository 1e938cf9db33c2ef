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

from bitfold.kernels._triton import (FLOAT_DTYPES, cdiv, interpreting, jit, next_pow2, num_sms, require,
                                     require_launchable, tl)
from bitfold.kernels.paged_decode import _decode_merge_kernel, split_plan
from bitfold.kernels.paged_prefill import tile_of_sequence
from bitfold.kernels.quant_kv_write import KIND_GROUP, QuantLayout, dequantize_pages_ref

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
def _attend_ring(qd, m_i, l_i, acc0, acc1, r0, r_hi, qpos, window, kh, seq_slot, ring_k, ring_v, scale_log2,
                 KVH: tl.constexpr, D: tl.constexpr, VG: tl.constexpr, CAP: tl.constexpr, BN: tl.constexpr,
                 DOT_PREC: tl.constexpr):
    """Positions [r0, min(r0 + BN, r_hi)) from the sequence's 16-bit ring."""
    NG: tl.constexpr = D // VG
    d = tl.arange(0, D)
    pos = r0 + tl.arange(0, BN)
    ok = pos < r_hi
    off = ((seq_slot.to(tl.int64) * CAP + pos % CAP) * KVH + kh) * D
    kt = tl.load(ring_k + off[None, :] + d[:, None], mask=ok[None, :], other=0.0)
    s = tl.dot(qd, kt.to(qd.dtype), input_precision=DOT_PREC)
    allowed = ok[None, :] & (pos[None, :] <= qpos[:, None]) & (qpos[:, None] - pos[None, :] < window)
    s = tl.where(allowed, s * scale_log2, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_base = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_base)
    p = tl.exp2(s - m_base[:, None]).to(qd.dtype)
    l_i = l_i * alpha + tl.sum(p.to(tl.float32), axis=1)
    c = tl.arange(0, VG)
    v0 = tl.load(ring_v + off[:, None] + c[None, :], mask=ok[:, None], other=0.0)
    acc0 = acc0 * alpha[:, None] + tl.dot(p, v0.to(qd.dtype), input_precision=DOT_PREC)
    if NG == 2:
        v1 = tl.load(ring_v + off[:, None] + VG + c[None, :], mask=ok[:, None], other=0.0)
        acc1 = acc1 * alpha[:, None] + tl.dot(p, v1.to(qd.dtype), input_precision=DOT_PREC)
    return m_new, l_i, acc0, acc1


@jit
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
    seq_len = tl.load(context_lens + b)
    start = tl.maximum(seq_len - window, 0) // BS * BS  # page-aligned: pieces never straddle pages
    split_tokens = tl.cdiv(tl.cdiv(seq_len - start, num_splits), BS) * BS
    lo = start + split * split_tokens
    hi = tl.minimum(lo + split_tokens, seq_len)
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
    NG: tl.constexpr = D // VG
    acc0 = tl.zeros([QG_PAD, VG], tl.float32)  # output channels [0, VG)
    acc1 = tl.zeros([QG_PAD, VG], tl.float32)  # [VG, 2 VG) when NG == 2
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
    c = tl.arange(0, VG)
    mask2 = (rows[:, None] < QG) & (c[None, :] < VG)
    if SINGLE_SPLIT:
        inv = 1.0 / tl.where(l_i > 0, l_i, 1.0)
        o_off = (b * NUM_HEADS + kh * QG + rows[:, None]) * D + c[None, :]
        tl.store(out + o_off, (acc0 * inv[:, None]).to(out.dtype.element_ty), mask=mask2)
        if NG == 2:
            tl.store(out + o_off + VG, (acc1 * inv[:, None]).to(out.dtype.element_ty), mask=mask2)
    else:
        part = (b * NUM_HEADS + kh * QG + rows) * num_splits + split
        tl.store(part_m + part, m_i, mask=rows < QG)
        tl.store(part_l + part, l_i, mask=rows < QG)
        tl.store(part_acc + part[:, None] * D + c[None, :], acc0, mask=mask2)
        if NG == 2:
            tl.store(part_acc + part[:, None] * D + VG + c[None, :], acc1, mask=mask2)


@jit
def _quant_prefill_kernel(q, k_codes, k_meta, v_codes, v_meta, ring_k, ring_v, k_new, v_new, block_tables,
                          cu_seqlens_q, context_lens, seq_slots, out, scale_log2, window, bt_stride, num_seqs,
                          K_KIND: tl.constexpr, K_BITS: tl.constexpr, KP: tl.constexpr,
                          V_KIND: tl.constexpr, V_BITS: tl.constexpr, VP: tl.constexpr, P: tl.constexpr,
                          NUM_HEADS: tl.constexpr, KVH: tl.constexpr, BS: tl.constexpr, D: tl.constexpr,
                          VG: tl.constexpr, RING: tl.constexpr, RESID: tl.constexpr, CAP: tl.constexpr,
                          BLOCK_M: tl.constexpr, DOT_PREC: tl.constexpr, BF16: tl.constexpr):
    """Each query row t sees exactly what decoding token by token would have shown it: keys
    before n_sealed(t + 1) from their (sealed) pages, the rest exact, from the ring (positions
    cached before this step: the ring is written after this kernel) or from this step's new
    rows. So a sequence's outputs do not depend on how its prompt was chunked or batched."""
    h = tl.program_id(1)
    b, q_start, q_len, m0 = tile_of_sequence(cu_seqlens_q, num_seqs, tl.program_id(0), BLOCK_M)
    if m0 >= q_len:
        return
    seq_len = tl.load(context_lens + b)
    len_old = seq_len - q_len
    offs_m = m0 + tl.arange(0, BLOCK_M)
    qpos = len_old + offs_m
    d = tl.arange(0, D)
    q_mask = (offs_m[:, None] < q_len) & (d[None, :] < D)
    q_off = ((q_start + offs_m[:, None]).to(tl.int64) * NUM_HEADS + h) * D + d[None, :]
    qd = tl.load(q + q_off, mask=q_mask, other=0.0)
    qf = qd.to(tl.float32)
    qh = qd.to(tl.float16)
    kh = h // (NUM_HEADS // KVH)
    kv_hi = len_old + tl.minimum(m0 + BLOCK_M, q_len)
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
            s_q = _page_scores(qf, qd, qh, page, p0, seq_len, kh, k_codes, k_meta, K_KIND, K_BITS, KP, KVH, BS, D,
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
    o_off = ((q_start + offs_m[:, None]).to(tl.int64) * NUM_HEADS + h) * D + c[None, :]
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
                       num_stages: int = 2) -> torch.Tensor:
    """Attention of each sequence's newest token over its compressed paged context (new K/V
    already written by `write_quant_kv`).

    q: `[B, num_heads, head_dim]`; storage: the layer's `QuantKV`; block_tables int32
    `[B, max_blocks]`; context_lens int32 `[B]` (>= 1, counting the new token); seq_slots int32
    `[B]` (ring slot, -1 = a padding row) when the codec has a residual window. Returns
    `[B, num_heads, head_dim]` in q's dtype. Knobs as `paged_decode` (splits cover whole pages),
    and `waves`: programs per SM the split plan aims for, over 2.
    """
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
    _quant_decode_kernel[(B, KVH, num_splits)](
        q, storage.k, storage.k_meta, storage.v, storage.v_meta, storage.ring_k, storage.ring_v, block_tables,
        context_lens, slots, out, part_m, part_l, part_acc, float(scale) * math.log2(math.e), window,
        block_tables.stride(0), num_splits, NUM_HEADS=H, QG=qg, QG_PAD=max(16, next_pow2(qg)), SINGLE_SPLIT=single,
        num_warps=num_warps, num_stages=num_stages, **_consts(lay, q))
    if not single:
        _decode_merge_kernel[(B, H)](out, part_m, part_l, part_acc, context_lens, window, num_splits,
                                     NUM_HEADS=H, HEAD_DIM=D, BLOCK_D=D, BLOCK_S=next_pow2(num_splits), BLOCK_N=BS,
                                     ALIGN=BS, num_warps=4)
    return out


def quant_paged_prefill(lay: QuantLayout, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, storage,
                        block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor,
                        seq_slots: torch.Tensor | None, scale: float, sliding_window: int = 0, *, block_m: int = 32,
                        num_warps: int = 8, num_stages: int = 2) -> torch.Tensor:
    """Causal attention of the packed new tokens (q: `[T, num_heads, head_dim]`, their k, v:
    `[T, KVH, D]`, offsets cu_seqlens_q int32 `[B+1]`) over their sequences' compressed pages,
    rings and the new rows, as decoding would have seen it: query t reads positions below
    n_sealed(t + 1) from their pages (this step's pages sealed by `write_quant_kv(...,
    phase="seal")` first) and the rest exact (the ring, written only after this call, and the new
    rows). Returns `[T, num_heads, head_dim]` in q's dtype."""
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
    _quant_prefill_kernel[(T // block_m + B, H)](
        q, storage.k, storage.k_meta, storage.v, storage.v_meta, storage.ring_k, storage.ring_v, k, v, block_tables,
        cu_seqlens_q, context_lens, slots, out, float(scale) * math.log2(math.e),
        sliding_window if sliding_window > 0 else _NO_WINDOW, block_tables.stride(0), B,
        NUM_HEADS=H, BLOCK_M=block_m, num_warps=num_warps, num_stages=num_stages, **_consts(lay, q))
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


def quant_paged_decode_ref(lay: QuantLayout, q: torch.Tensor, storage, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, seq_slots: torch.Tensor | None, scale: float,
                           sliding_window: int = 0, **_) -> torch.Tensor:
    """Pure-PyTorch `quant_paged_decode` (float32 math); the CPU path for compressed pages."""
    _check(lay, q, storage, block_tables, context_lens, seq_slots, sliding_window)
    out = torch.empty_like(q)
    slots = seq_slots.tolist() if seq_slots is not None else [-1] * q.shape[0]
    for b, n in enumerate(context_lens.tolist()):
        k, v = gather_kv_ref(lay, storage, block_tables[b], slots[b], n)
        qpos = torch.tensor([n - 1], device=q.device)
        out[b] = _attend_ref(q[b : b + 1], k, v, qpos, scale, sliding_window)[0].to(q.dtype)
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
