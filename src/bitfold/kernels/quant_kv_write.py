"""Quantize-on-write for compressed KV pages: the page layout, the Triton writer and its reference.

Sides. K and V are stored each in one of four ways (`KIND_*`):
- dense: the compute dtype, as the dense codec does;
- int8 / fp8 (e4m3): one symmetric scale per token and head (`absmax / 127` or `/ 448`);
- grouped int4 / int2 after KIVI (Liu et al., arXiv 2402.02750): keys per *channel* over the
  tokens of a page (K's outliers sit in fixed channels), values per *token* over groups of
  `v_group` channels; asymmetric, an fp16 scale and zero point (the group's minimum) each.

Page layout (one layer; N pages of `block_size` tokens, KVH heads of D channels):
- codes `[N, KVH, block_size // P, D]`, P = 8 // bits codes per byte (P = 1 for 8/16 bits):
  token t of a page lives in byte row t // P at bits [(t % P) * bits, (t % P + 1) * bits), so
  P consecutive tokens share a byte per channel. An attention kernel reads a whole page as a
  `[D, block_size]` (K) or `[block_size, D]` (V) tile in token order, each byte fetched once
  per token that lives in it (the repeats are the same cache line, no extra DRAM traffic), and
  unpacks it with one shift and one mask per element;
- meta (fp16): per-token scale `[N, KVH, block_size]`; KIVI keys `[N, KVH, 2, D]` (scale row,
  zero row); KIVI values `[N, KVH, block_size, 2, D // v_group]`; dense sides none.

Residual window (KIVI's R). A codec with a sub-byte side (or `residual > 0`) keeps the newest
tokens of each sequence in the compute dtype in a per-sequence ring `[S, residual +
block_size, KVH, D]`, and a page is quantized ("sealed") only once all its tokens are older than
the window: pages [0, n_sealed(L)) are codes, positions [n_sealed(L), L) live in the ring at
pos % (residual + block_size), with n_sealed(L) = floor(max(L - residual, 0) / block_size) *
block_size. A page is written exactly once, whole, by one program per head: no byte is ever
shared by two writers, and K's per-channel statistics see the whole page. Codecs with only
8/16-bit sides and no residual write each token straight into its page.

`write_quant_kv` (Triton) and `write_quant_kv_ref` (PyTorch) do the same thing: seal the pages
this step completes (reading their tokens from the ring or from the new K/V), then put the new
tokens that stay 16-bit into the ring. Rounding is round-half-up of (x - zero) / scale with
the *stored* (fp16) scale and zero, so the codes are the nearest to what is read back, and
every division is IEEE round-to-nearest (`div_rn`; a GPU's default division is approximate),
so the GPU writes the same codes as the reference; fp8 is
rounded by hand to e4m3's grid (exponent from the float's bits, 3 mantissa bits, half up) and
only then converted, so the conversion itself never rounds.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from bitfold.kernels._triton import cdiv, jit, require, require_launchable, tl

KIND_DENSE, KIND_INT8, KIND_FP8, KIND_GROUP = 0, 1, 2, 3
FP8_MAX, INT8_MAX = 448.0, 127.0


@dataclass(frozen=True)
class QuantLayout:
    """What the kernels need to know about a codec's pages (all Python ints, constexprs in Triton)."""

    k_kind: int
    k_bits: int
    v_kind: int
    v_bits: int
    block_size: int
    head_dim: int
    num_kv_heads: int
    v_group: int = 64
    residual: int = 0

    @property
    def ring(self) -> bool:
        """New tokens wait in a 16-bit ring until their page is sealed whole."""
        return self.residual > 0 or self.k_kind == KIND_GROUP or self.v_kind == KIND_GROUP

    @property
    def ring_cap(self) -> int:
        return self.residual + self.block_size if self.ring else 0

    @property
    def k_planes(self) -> int:
        return 8 // self.k_bits if self.k_kind == KIND_GROUP else 1

    @property
    def v_planes(self) -> int:
        return 8 // self.v_bits if self.v_kind == KIND_GROUP else 1

    @property
    def planes(self) -> int:
        """Token pieces an attention kernel walks a page in: both sides' planes line up on them."""
        return max(self.k_planes, self.v_planes)

    def n_sealed(self, length: int) -> int:
        if not self.ring:
            return length
        return max(length - self.residual, 0) // self.block_size * self.block_size

    def side(self, is_k: bool) -> tuple[int, int, int]:
        """(kind, bits, planes) of K or V."""
        return (self.k_kind, self.k_bits, self.k_planes) if is_k else (self.v_kind, self.v_bits, self.v_planes)

    def side_bytes(self, is_k: bool, dense_bytes: int) -> int:
        """Bytes one page of one head of this side costs."""
        kind, bits, _ = self.side(is_k)
        bs, d = self.block_size, self.head_dim
        if kind == KIND_DENSE:
            return bs * d * dense_bytes
        if kind in (KIND_INT8, KIND_FP8):
            return bs * d + 2 * bs
        meta = 2 * 2 * d if is_k else 2 * 2 * bs * (d // self.v_group)
        return bs * d * bits // 8 + meta

    def allocate_side(self, is_k: bool, num_blocks: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        kind, bits, planes = self.side(is_k)
        n, h, bs, d = num_blocks, self.num_kv_heads, self.block_size, self.head_dim
        empty = torch.empty(0, dtype=torch.float16, device=device)
        if kind == KIND_DENSE:
            return torch.empty((n, h, bs, d), dtype=dtype, device=device), empty
        if kind in (KIND_INT8, KIND_FP8):
            codes = torch.empty((n, h, bs, d), dtype=torch.int8 if kind == KIND_INT8 else torch.uint8, device=device)
            return codes, torch.empty((n, h, bs), dtype=torch.float16, device=device)
        codes = torch.empty((n, h, bs // planes, d), dtype=torch.uint8, device=device)
        meta_shape = (n, h, 2, d) if is_k else (n, h, bs, 2, d // self.v_group)
        return codes, torch.empty(meta_shape, dtype=torch.float16, device=device)


# ----------------------------------------------------------------------------- Triton


@jit
def _fp8_round(y):
    """y (float32, |y| <= 448) rounded half-up onto the e4m3 grid: exponent from the float's
    bits (exact), 3 mantissa bits; subnormals below 2**-6 in steps of 2**-9."""
    a = tl.abs(y)
    e = ((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    e = tl.maximum(e, -6)
    step = tl.exp2((e - 3).to(tl.float32))
    r = tl.floor(a / step + 0.5) * step
    return tl.where(y < 0, -r, r)


@jit
def _store_side(x3, codes, meta, page, kh,
                KIND: tl.constexpr, BITS: tl.constexpr, P: tl.constexpr, IS_K: tl.constexpr,
                KVH: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, VG: tl.constexpr):
    """Quantize one page of one head, x3 [P, BS // P, D] float32 (token r * P + i at [i, r]),
    into its codes and meta."""
    R: tl.constexpr = BS // P
    i3 = tl.arange(0, P)[:, None, None]
    r3 = tl.arange(0, R)[None, :, None]
    d3 = tl.arange(0, D)[None, None, :]
    ph = page * KVH + kh  # int64 (page, head) index
    if KIND == 0:
        tl.store(codes + (ph * BS + r3 * P + i3) * D + d3, x3.to(codes.dtype.element_ty))
    elif KIND == 3:
        QMAX: tl.constexpr = (1 << BITS) - 1
        if IS_K:  # per channel over the page's tokens
            mn = tl.min(tl.min(x3, axis=0), axis=0)  # [D]
            mx = tl.max(tl.max(x3, axis=0), axis=0)
            sc = tl.math.div_rn(mx - mn, QMAX + 0.0).to(tl.float16)
            zp = mn.to(tl.float16)
            d1 = tl.arange(0, D)
            tl.store(meta + ph * 2 * D + d1, sc)
            tl.store(meta + ph * 2 * D + D + d1, zp)
            scf = sc.to(tl.float32)[None, None, :]
            zpf = zp.to(tl.float32)[None, None, :]
            q = tl.floor(tl.math.div_rn(x3 - zpf, tl.where(scf > 0, scf, 1.0)) + 0.5)
        else:  # per token over groups of VG channels
            NG: tl.constexpr = D // VG
            x4 = tl.reshape(x3, [P, R, NG, VG])
            mn = tl.min(x4, axis=3)  # [P, R, NG]
            mx = tl.max(x4, axis=3)
            sc = tl.math.div_rn(mx - mn, QMAX + 0.0).to(tl.float16)
            zp = mn.to(tl.float16)
            g3 = tl.arange(0, NG)[None, None, :]
            moff = (ph * BS + r3 * P + i3) * (2 * NG) + g3
            tl.store(meta + moff, sc)
            tl.store(meta + moff + NG, zp)
            scf = sc.to(tl.float32)[:, :, :, None]
            zpf = zp.to(tl.float32)[:, :, :, None]
            q = tl.reshape(tl.floor(tl.math.div_rn(x4 - zpf, tl.where(scf > 0, scf, 1.0)) + 0.5), [P, R, D])
        q = tl.minimum(tl.maximum(q, 0.0), QMAX).to(tl.int32)
        packed = tl.sum(q << (i3 * BITS), axis=0)  # disjoint bit fields: the sum is an OR
        r2 = tl.arange(0, R)[:, None]
        d2 = tl.arange(0, D)[None, :]
        tl.store(codes + (ph * R + r2) * D + d2, packed.to(tl.uint8))
    else:  # int8 / fp8: one symmetric scale per token
        amax = tl.max(tl.abs(x3), axis=2, keep_dims=True)  # [P = 1, BS, 1]
        if KIND == 1:
            sc = tl.math.div_rn(amax, 127.0).to(tl.float16)
        else:
            sc = tl.math.div_rn(amax, 448.0).to(tl.float16)
        tl.store(meta + ph * BS + r3 * P + i3, sc)
        scf = sc.to(tl.float32)
        y = tl.math.div_rn(x3, tl.where(scf > 0, scf, 1.0))
        off = (ph * BS + r3 * P + i3) * D + d3
        if KIND == 1:
            q = tl.minimum(tl.maximum(tl.floor(y + 0.5), -127.0), 127.0)
            tl.store(codes + off, q.to(tl.int8))
        else:
            y = _fp8_round(tl.minimum(tl.maximum(y, -448.0), 448.0))
            tl.store(codes + off, y.to(tl.float8e4nv).to(tl.uint8, bitcast=True))


@jit
def _load_page_tokens(ring, new, b_row0, seq_slot, page_start, len_old, kh,
                      P: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, KVH: tl.constexpr, CAP: tl.constexpr):
    """[P, BS // P, D] float32 of the page's tokens (token r * P + i at [i, r]): from the ring
    where the token was cached before this step (pos < len_old), from this step's new rows
    otherwise."""
    R: tl.constexpr = BS // P
    pos = page_start + tl.arange(0, R)[None, :, None] * P + tl.arange(0, P)[:, None, None]  # [P, R, 1]
    d3 = tl.arange(0, D)[None, None, :]
    old = pos < len_old
    ring_off = ((seq_slot.to(tl.int64) * CAP + pos % CAP) * KVH + kh) * D + d3
    new_off = ((b_row0 + pos - len_old).to(tl.int64) * KVH + kh) * D + d3
    a = tl.load(ring + ring_off, mask=old & (d3 < D), other=0.0).to(tl.float32)
    c = tl.load(new + new_off, mask=(~old) & (d3 < D), other=0.0).to(tl.float32)
    return tl.where(old, a, c)


@jit(do_not_specialize=('bt_stride',))
def _seal_kernel(k_new, v_new, k_codes, k_meta, v_codes, v_meta, ring_k, ring_v, block_tables, cu_seqlens_q,
                 context_lens, seq_slots, bt_stride,
                 K_KIND: tl.constexpr, K_BITS: tl.constexpr, KP: tl.constexpr,
                 V_KIND: tl.constexpr, V_BITS: tl.constexpr, VP: tl.constexpr,
                 KVH: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, VG: tl.constexpr,
                 RESID: tl.constexpr, CAP: tl.constexpr, WRITE_RING: tl.constexpr):
    """Program (sequence b, kv head, j): seal the j-th page this step completes. With
    WRITE_RING (decode: one new token per sequence) the program for j == 0 also puts the new
    token into the ring; no other program of the launch reads that ring slot (the slots of
    positions [n_sealed(L - 1), L) are distinct), so one launch is race-free."""
    b = tl.program_id(0)
    kh = tl.program_id(1)
    j = tl.program_id(2)
    seq_slot = tl.load(seq_slots + b)
    if seq_slot < 0:
        return  # padding row of a CUDA graph
    row0 = tl.load(cu_seqlens_q + b)
    q_len = tl.load(cu_seqlens_q + b + 1) - row0
    len_new = tl.load(context_lens + b)
    len_old = len_new - q_len
    n_old = tl.maximum(len_old - RESID, 0) // BS * BS
    n_new = tl.maximum(len_new - RESID, 0) // BS * BS
    page_start = n_old + j * BS
    if page_start < n_new:
        page = tl.load(block_tables + b * bt_stride + page_start // BS).to(tl.int64)
        xk = _load_page_tokens(ring_k, k_new, row0, seq_slot, page_start, len_old, kh, KP, BS, D, KVH, CAP)
        _store_side(xk, k_codes, k_meta, page, kh, K_KIND, K_BITS, KP, True, KVH, BS, D, VG)
        xv = _load_page_tokens(ring_v, v_new, row0, seq_slot, page_start, len_old, kh, VP, BS, D, KVH, CAP)
        _store_side(xv, v_codes, v_meta, page, kh, V_KIND, V_BITS, VP, False, KVH, BS, D, VG)
    if WRITE_RING:
        if j == 0:
            pos = len_new - 1
            if pos >= n_new:
                d = tl.arange(0, D)
                src = (row0.to(tl.int64) * KVH + kh) * D + d
                dst = ((seq_slot.to(tl.int64) * CAP + pos % CAP) * KVH + kh) * D + d
                tl.store(ring_k + dst, tl.load(k_new + src))
                tl.store(ring_v + dst, tl.load(v_new + src))


@jit
def _ring_write_kernel(k_new, v_new, ring_k, ring_v, cu_seqlens_q, context_lens, seq_slots,
                       KVH: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, RESID: tl.constexpr,
                       CAP: tl.constexpr, BLOCK_T: tl.constexpr):
    """Program (sequence b, kv head, block of new tokens): the new tokens that stay 16-bit
    (pos >= n_sealed(L)) go into the ring. Launched after the seal kernel, which may still read
    ring slots these positions overwrite."""
    b = tl.program_id(0)
    kh = tl.program_id(1)
    seq_slot = tl.load(seq_slots + b)
    if seq_slot < 0:
        return
    row0 = tl.load(cu_seqlens_q + b)
    q_len = tl.load(cu_seqlens_q + b + 1) - row0
    len_new = tl.load(context_lens + b)
    len_old = len_new - q_len
    n_new = tl.maximum(len_new - RESID, 0) // BS * BS
    t = tl.program_id(2) * BLOCK_T + tl.arange(0, BLOCK_T)  # index among this sequence's new tokens
    pos = len_old + t
    keep = (t < q_len) & (pos >= n_new)
    d = tl.arange(0, D)[None, :]
    src = ((row0 + t).to(tl.int64)[:, None] * KVH + kh) * D + d
    dst = ((seq_slot.to(tl.int64) * CAP + pos % CAP)[:, None] * KVH + kh) * D + d
    m = keep[:, None] & (d < D)
    tl.store(ring_k + dst, tl.load(k_new + src, mask=m), mask=m)
    tl.store(ring_v + dst, tl.load(v_new + src, mask=m), mask=m)


@jit
def _direct_write_kernel(k_new, v_new, k_codes, k_meta, v_codes, v_meta, slot_mapping,
                         K_KIND: tl.constexpr, V_KIND: tl.constexpr, KVH: tl.constexpr, BS: tl.constexpr,
                         D: tl.constexpr):
    """Program (token, kv head) of a codec without a ring (8/16-bit sides): quantize the token
    into its page slot. Each token owns its bytes."""
    t = tl.program_id(0)
    kh = tl.program_id(1)
    slot = tl.load(slot_mapping + t)
    if slot < 0:
        return
    page = slot // BS
    off = slot % BS
    d = tl.arange(0, D)
    src = (t.to(tl.int64) * KVH + kh) * D + d
    xk = tl.load(k_new + src).to(tl.float32)
    xv = tl.load(v_new + src).to(tl.float32)
    _store_token(xk, k_codes, k_meta, page, kh, off, K_KIND, KVH, BS, D)
    _store_token(xv, v_codes, v_meta, page, kh, off, V_KIND, KVH, BS, D)


@jit
def _store_token(x, codes, meta, page, kh, off, KIND: tl.constexpr, KVH: tl.constexpr, BS: tl.constexpr,
                 D: tl.constexpr):
    d = tl.arange(0, D)
    row = (page * KVH + kh) * BS + off
    if KIND == 0:
        tl.store(codes + row * D + d, x.to(codes.dtype.element_ty))
    else:
        amax = tl.max(tl.abs(x), axis=0)
        if KIND == 1:
            sc = tl.math.div_rn(amax, 127.0).to(tl.float16)
        else:
            sc = tl.math.div_rn(amax, 448.0).to(tl.float16)
        tl.store(meta + row, sc)
        scf = sc.to(tl.float32)
        y = tl.math.div_rn(x, tl.where(scf > 0, scf, 1.0))
        if KIND == 1:
            q = tl.minimum(tl.maximum(tl.floor(y + 0.5), -127.0), 127.0)
            tl.store(codes + row * D + d, q.to(tl.int8))
        else:
            y = _fp8_round(tl.minimum(tl.maximum(y, -448.0), 448.0))
            tl.store(codes + row * D + d, y.to(tl.float8e4nv).to(tl.uint8, bitcast=True))


def _check(lay: QuantLayout, storage, k, v, meta):
    T = k.shape[0]
    require(k.shape == v.shape == (T, lay.num_kv_heads, lay.head_dim),
            f"k, v must be [T, {lay.num_kv_heads}, {lay.head_dim}], got {tuple(k.shape)}, {tuple(v.shape)}")
    require(k.is_contiguous() and v.is_contiguous(), "k, v must be contiguous")
    if lay.ring:
        require(meta.seq_slots is not None and meta.seq_slots.dtype == torch.int32,
                "this codec keeps a residual window: the step needs int32 seq_slots")


def write_quant_kv(lay: QuantLayout, storage, k: torch.Tensor, v: torch.Tensor, meta, *, phase: str = "all",
                   max_seal_pages: int | None = None) -> None:
    """Store the step's new K/V (k, v: `[T, KVH, D]`, rotary applied) into `storage` (a
    `QuantKV`): seal the pages this step completes, then ring-write the rest (see the module
    docstring). `phase`: "all", or "seal" then (after prefill attention has read the ring's old
    contents) "ring". `meta` is the step's AttentionMetadata; `max_seal_pages` an upper bound of
    the pages any one sequence seals this step (default: from meta's host-side lengths)."""
    require(phase in ("all", "seal", "ring"), f"phase must be all, seal or ring, got {phase!r}")
    _check(lay, storage, k, v, meta)
    T = k.shape[0]
    if T == 0:
        return
    require_launchable(k, storage.k)
    H, D, BS = lay.num_kv_heads, lay.head_dim, lay.block_size
    if not lay.ring:
        if phase == "ring":
            return
        _direct_write_kernel[(T, H)](k, v, storage.k, storage.k_meta, storage.v, storage.v_meta, meta.slot_mapping,
                                     K_KIND=lay.k_kind, V_KIND=lay.v_kind, KVH=H, BS=BS, D=D, num_warps=1)
        return
    B = meta.context_lens.shape[0]
    decode = meta.decode_only
    if max_seal_pages is None:
        max_seal_pages = 1 if decode else cdiv(meta.max_q_len, BS) + 1
    common = dict(KVH=H, BS=BS, D=D, RESID=lay.residual, CAP=lay.ring_cap)
    if phase != "ring":
        _seal_kernel[(B, H, max_seal_pages)](
            k, v, storage.k, storage.k_meta, storage.v, storage.v_meta, storage.ring_k, storage.ring_v,
            meta.block_tables, meta.cu_seqlens_q, meta.context_lens, meta.seq_slots, meta.block_tables.stride(0),
            K_KIND=lay.k_kind, K_BITS=lay.k_bits, KP=lay.k_planes, V_KIND=lay.v_kind, V_BITS=lay.v_bits,
            VP=lay.v_planes, VG=lay.v_group, WRITE_RING=decode and phase == "all", num_warps=8, **common)
    if phase != "seal" and not (decode and phase == "all"):
        block_t = 16
        _ring_write_kernel[(B, H, cdiv(meta.max_q_len, block_t))](
            k, v, storage.ring_k, storage.ring_v, meta.cu_seqlens_q, meta.context_lens, meta.seq_slots,
            BLOCK_T=block_t, num_warps=4, **common)


# ----------------------------------------------------------------------------- references


def fp8_round_ref(y: torch.Tensor) -> torch.Tensor:
    """`_fp8_round` in PyTorch (float32 in, float32 on e4m3's grid out)."""
    a = y.abs()
    e = ((a.view(torch.int32) >> 23) & 0xFF) - 127
    step = torch.exp2((e.clamp(min=-6) - 3).float())
    r = torch.floor(a / step + 0.5) * step
    return torch.where(y < 0, -r, r)


def quantize_page_ref(lay: QuantLayout, is_k: bool, x: torch.Tensor):
    """x: float32 `[n, KVH, BS, D]` (whole pages) -> (codes, meta) in the page layout."""
    kind, bits, planes = lay.side(is_k)
    n, h, bs, d = x.shape
    if kind == KIND_DENSE:
        return x, None
    if kind in (KIND_INT8, KIND_FP8):
        amax = x.abs().amax(-1)
        sc = (amax / (INT8_MAX if kind == KIND_INT8 else FP8_MAX)).half()
        scf = sc.float()[..., None]
        y = x / torch.where(scf > 0, scf, torch.ones_like(scf))
        if kind == KIND_INT8:
            return torch.floor(y + 0.5).clamp(-127, 127).to(torch.int8), sc
        y = fp8_round_ref(y.clamp(-FP8_MAX, FP8_MAX))
        return y.to(torch.float8_e4m3fn).view(torch.uint8), sc
    qmax = (1 << bits) - 1
    if is_k:
        mn, mx = x.amin(2, keepdim=True), x.amax(2, keepdim=True)  # [n, h, 1, d]
        sc, zp = ((mx - mn) / qmax).half(), mn.half()
        meta = torch.cat([sc, zp], dim=2)  # [n, h, 2, d]
        scf, zpf = sc.float(), zp.float()
        q = torch.floor((x - zpf) / torch.where(scf > 0, scf, torch.ones_like(scf)) + 0.5)
    else:
        g = x.view(n, h, bs, d // lay.v_group, lay.v_group)
        mn, mx = g.amin(-1), g.amax(-1)  # [n, h, bs, ng]
        sc, zp = ((mx - mn) / qmax).half(), mn.half()
        meta = torch.stack([sc, zp], dim=3)  # [n, h, bs, 2, ng]
        scf, zpf = sc.float()[..., None], zp.float()[..., None]
        q = torch.floor((g - zpf) / torch.where(scf > 0, scf, torch.ones_like(scf)) + 0.5).view(n, h, bs, d)
    q = q.clamp(0, qmax).to(torch.int32).view(n, h, bs // planes, planes, d)  # token r * P + i at [r, i]
    packed = sum(q[:, :, :, i] << (i * bits) for i in range(planes))
    return packed.to(torch.uint8), meta


def dequantize_pages_ref(lay: QuantLayout, is_k: bool, codes: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """(codes, meta) of n pages -> float32 `[n, KVH, BS, D]`."""
    kind, bits, planes = lay.side(is_k)
    if kind == KIND_DENSE:
        return codes.float()
    if kind == KIND_INT8:
        return codes.float() * meta.float()[..., None]
    if kind == KIND_FP8:
        return codes.view(torch.float8_e4m3fn).float() * meta.float()[..., None]
    n, h, rows, d = codes.shape
    c = codes.to(torch.int32)
    q = torch.stack([(c >> (i * bits)) & ((1 << bits) - 1) for i in range(planes)], dim=3)  # [n, h, R, P, d]
    q = q.reshape(n, h, rows * planes, d).float()
    if is_k:
        return q * meta[:, :, 0:1].float() + meta[:, :, 1:2].float()
    sc = meta[:, :, :, 0].float().repeat_interleave(lay.v_group, dim=-1)  # [n, h, bs, d]
    zp = meta[:, :, :, 1].float().repeat_interleave(lay.v_group, dim=-1)
    return q * sc + zp


def _store_pages_ref(lay: QuantLayout, storage, pages: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor) -> None:
    for is_k, x in ((True, xk), (False, xv)):
        codes, meta = quantize_page_ref(lay, is_k, x)
        dst_codes, dst_meta = (storage.k, storage.k_meta) if is_k else (storage.v, storage.v_meta)
        dst_codes[pages] = codes.to(dst_codes.dtype)
        if meta is not None:
            dst_meta[pages] = meta


def write_quant_kv_ref(lay: QuantLayout, storage, k: torch.Tensor, v: torch.Tensor, meta, *,
                       phase: str = "all", **_) -> None:
    """Pure-PyTorch `write_quant_kv`: same arguments, same effect on `storage`."""
    require(phase in ("all", "seal", "ring"), f"phase must be all, seal or ring, got {phase!r}")
    _check(lay, storage, k, v, meta)
    if k.shape[0] == 0:
        return
    H, D, BS = lay.num_kv_heads, lay.head_dim, lay.block_size
    if not lay.ring:
        if phase == "ring":
            return
        keep = meta.slot_mapping >= 0
        slots = meta.slot_mapping[keep]
        pages, offs = slots // BS, slots % BS
        for is_k, x in ((True, k), (False, v)):
            codes, m = quantize_page_ref(lay, is_k, x[keep].float().unsqueeze(2))  # one-token "pages"
            dst_codes, dst_meta = (storage.k, storage.k_meta) if is_k else (storage.v, storage.v_meta)
            dst_codes[pages, :, offs] = codes[:, :, 0].to(dst_codes.dtype)
            if m is not None:
                dst_meta[pages, :, offs] = m[:, :, 0]
        return
    cu, lens, slots = meta.cu_seqlens_q.tolist(), meta.context_lens.tolist(), meta.seq_slots.tolist()
    cap = lay.ring_cap
    for b, len_new in enumerate(lens):
        if slots[b] < 0:
            continue
        row0, q_len = cu[b], cu[b + 1] - cu[b]
        len_old = len_new - q_len
        n_old, n_new = lay.n_sealed(len_old), lay.n_sealed(len_new)
        ring_k, ring_v = storage.ring_k[slots[b]], storage.ring_v[slots[b]]  # [cap, H, D]
        for page_start in range(n_old, n_new, BS) if phase != "ring" else ():
            pos = torch.arange(page_start, page_start + BS, device=k.device)
            old = pos < len_old
            src_new = (row0 + pos - len_old).clamp(min=0)
            xk = torch.where(old[:, None, None], ring_k[pos % cap].float(), k[src_new.clamp(max=k.shape[0] - 1)].float())
            xv = torch.where(old[:, None, None], ring_v[pos % cap].float(), v[src_new.clamp(max=k.shape[0] - 1)].float())
            page = int(meta.block_tables[b, page_start // BS])
            _store_pages_ref(lay, storage, torch.tensor([page], device=k.device),
                             xk.permute(1, 0, 2)[None], xv.permute(1, 0, 2)[None])
        if phase == "seal":
            continue
        pos = torch.arange(max(len_old, n_new), len_new, device=k.device)
        ring_k[pos % cap] = k[row0 + pos - len_old]
        ring_v[pos % cap] = v[row0 + pos - len_old]
