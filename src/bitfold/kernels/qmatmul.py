"""`y = x @ W.T` for low-bit weights on the GPU, dequantized on the fly (issue #12).

Weight layout (`QLayout` says which variant, `QWeight` holds the tensors, `pack_codes` builds
the planes from codes):

- Codes q in [0, 2^bits) are split into at most two bit planes, low plane first: int8 (8,),
  int6 (4, 2), int5 (4, 1), int4 (4,), int3 (2, 1), int2 (2,), int1 (1,). A plane of p bits is
  int32 words [N, Kp * p / 32], tile-interleaved: the 32 codes of each tile (codes 32t ..
  32t + 31 of a row) are the tile's p words p*t .. p*t + p - 1, and code 32t + p*j + w is field j
  (bits p*j .. p*j + p - 1) of word p*t + w. So field j of a tile's words holds p consecutive
  codes: the GEMV reads a thread's 16-byte vector of words against one short contiguous load of
  activations per field, shared by all its weight rows (natural order, code j in field j, would
  need a strided gather of x per code). A word holds a power-of-two number of whole codes, so a
  tile of BK codes is BK*p/32 contiguous words per plane at a 4-byte-aligned offset for any K
  that is a multiple of 32 (16-byte vector loads, each byte read once), and no code straddles
  two words. int3's 2+1 planes are 12 bytes per 32 codes, exactly 3 bits each.
- Scales, per group of `group` codes along K (0: one group per row):
  w = s * (q - zero) + m, where either s is fp16 per group (`scales` [N, groups]) and m is fp16
  per group (`mins`, layout.min_kind "fp16") or 0 ("none"); or, for GGUF K-quants
  (`super_block` = 256), s = d * sub with d fp16 per 256 codes (`scales` [N, Kp / 256]) and an
  integer sub-scale per group (`sub` int8 [N, groups]), and m = -dmin * sub_min with dmin fp16
  per 256 (`mins`) and `sub_min` uint8 per group ("sub"), or sub and sub_min as the low and
  high nibble of one byte of `sub` ("nibble", Q2_K). Every GGUF block type is one of these
  with the file's own bytes per weight (weights/gguf_blocks.py).

Kernels (one `@triton.jit` kernel per strategy, chosen by the number of activation rows):
- `_qgemv_kernel` (one activation row by default, GEMV_MAX_ROWS; up to 16 when asked; decode): each program streams BLOCK_N whole weight rows
  along K; each field becomes float32 q * 2^B with one mask-and-OR into the mantissa of 2^23 and
  one subtraction (`_field`: no shift, no quarter-rate int-to-float conversion), multiplied
  against x * 2^-B (computed once per thread for all its rows), accumulated per word, then
  scaled once per word and group (the min folds into a per-group sum of x). Small BLOCK_M (1-4)
  keeps one accumulator per activation row, so each code is unpacked once for all rows.
- `_qgemm_kernel` (more rows: batches and prefill chunks): the weight tile is dequantized in
  registers K-major, [BLOCK_K, BLOCK_N] (codes in natural order, scales per group), into x's
  dtype and fed with the activation tile to `tl.dot` (tensor cores), float32 accumulation. Up to 16 rows it
  runs as a skinny GEMV (one 16-row tile, thin slabs of weight rows, like kernels/gemv.py's
  tl.dot path), beyond that with GEMM tiles.
- `_qgemv_tc_kernel` (`kind="tc"`, one 4-bit plane only; not a default until timed on a GPU):
  fields OR-ed two at a time into float16 1024.0 pairs (`0x64006400`), exact tiles of codes fed
  to tensor cores against float16 activations (16-row tiles), offsets and group scales applied
  after the dot, the activation sums it needs computed by the tensor cores too.
- from DEQUANT_MIN_ROWS rows (long prefill), `_dequant_kernel` writes the weight in x's dtype
  and cuBLAS multiplies: at thousands of rows the matmul is compute-bound and the write of a
  dequantized copy costs a few percent of it.
`qmatmul_ref` (float32 dequantization, one F.linear, rounded once) is the reference, and what
runs without Triton. Launch tables are first guesses for an H100/H200, chosen for registers and
spills by compiling for sm_90 (`benchmarks/compile_check_weights.py`); `benchmarks/weights.py`
times the alternatives on a GPU.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bitfold.kernels._triton import (FLOAT_DTYPES, cdiv, interpreting, jit, pdl_kwargs, pdl_trigger, pdl_wait,
                                     require, require_launchable, tl)

PLANES = {8: (8,), 6: (4, 2), 5: (4, 1), 4: (4,), 3: (2, 1), 2: (2,), 1: (1,)}
MIN_KINDS = ("none", "fp16", "sub", "nibble")
K_ALIGN = 32  # Kp (stored codes per row) is a multiple of this (a 1-bit plane's word)
GEMV_MAX_ROWS = 1  # rows the register GEMV takes by default (see GEMV_CONFIGS)
DEQUANT_MIN_ROWS = 512


@dataclass(frozen=True)
class QLayout:
    """How a quantized weight is stored (see the module docstring)."""

    planes: tuple[int, ...]
    group: int  # codes per scale along K; 0: one per row
    zero: int = 0  # subtracted from every code
    min_kind: str = "fp16"  # "none", "fp16", "sub" (K-quants' dmin * sub_min), "nibble" (Q2_K)
    super_block: int = 0  # 0, or 256: scale = d[n, k // 256] * sub[n, k // group]

    def __post_init__(self):
        require(1 <= len(self.planes) <= 2 and all(p in (1, 2, 4, 8) for p in self.planes),
                f"planes must be one or two of 1, 2, 4, 8 bits, got {self.planes}")
        require(self.min_kind in MIN_KINDS, f"min_kind must be one of {MIN_KINDS}, got {self.min_kind!r}")
        require(self.group == 0 or (self.group >= 8 and self.group & (self.group - 1) == 0),
                f"group must be 0 or a power of two >= 8, got {self.group}")
        require(self.super_block in (0, 256), f"super_block must be 0 or 256, got {self.super_block}")
        require(self.min_kind == "none" or (self.super_block > 0) == (self.min_kind in ("sub", "nibble")),
                "sub/nibble mins go with K-quant super-blocks, fp16 mins without")
        require(self.super_block == 0 or (self.group and self.super_block % self.group == 0),
                "a super-block holds whole groups")

    @property
    def bits(self) -> int:
        return sum(self.planes)

    def padded(self, k: int) -> int:
        """Stored codes per row for k inputs: whole groups (or super-blocks), a multiple of 32."""
        unit = max(K_ALIGN, self.group, self.super_block)
        return -(-k // unit) * unit


class QWeight:
    """A weight [n, k] in a `QLayout`: planes int32 [n, kp * p / 32] per plane; scales fp16
    [n, groups] (or d [n, kp / 256]); mins fp16 [n, groups] (or dmin [n, kp / 256]) or None;
    sub int8 (uint8 for "nibble") [n, groups] or None; sub_min uint8 [n, groups] or None."""

    def __init__(self, layout: QLayout, n: int, k: int, planes: list[torch.Tensor], scales: torch.Tensor,
                 mins: torch.Tensor | None = None, sub: torch.Tensor | None = None,
                 sub_min: torch.Tensor | None = None):
        self.layout, self.n, self.k, self.kp = layout, n, k, layout.padded(k)
        self.planes, self.scales, self.mins, self.sub, self.sub_min = list(planes), scales, mins, sub, sub_min
        groups = self.kp // layout.group if layout.group else 1
        for p, t in zip(layout.planes, self.planes):
            require(t.dtype == torch.int32 and tuple(t.shape) == (n, self.kp * p // 32) and t.is_contiguous(),
                    f"a {p}-bit plane must be contiguous int32 [{n}, {self.kp * p // 32}], got {t.dtype} "
                    f"{tuple(t.shape)}")
        per_scale = (n, self.kp // layout.super_block) if layout.super_block else (n, groups)
        require(scales.dtype == torch.float16 and tuple(scales.shape) == per_scale and scales.is_contiguous(),
                f"scales must be contiguous float16 {per_scale}, got {scales.dtype} {tuple(scales.shape)}")
        need_mins = layout.min_kind != "none"
        require((mins is not None) == need_mins, f"min_kind {layout.min_kind!r} {'needs' if need_mins else 'takes no'} mins")
        if mins is not None:
            require(mins.dtype == torch.float16 and tuple(mins.shape) == per_scale and mins.is_contiguous(),
                    f"mins must be contiguous float16 {per_scale}, got {mins.dtype} {tuple(mins.shape)}")
        if layout.super_block:
            want = torch.uint8 if layout.min_kind == "nibble" else torch.int8
            require(sub is not None and sub.dtype == want and tuple(sub.shape) == (n, groups) and sub.is_contiguous(),
                    f"sub must be contiguous {want} [{n}, {groups}]")
            if layout.min_kind == "sub":
                require(sub_min is not None and sub_min.dtype == torch.uint8 and tuple(sub_min.shape) == (n, groups)
                        and sub_min.is_contiguous(), f"sub_min must be contiguous uint8 [{n}, {groups}]")

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (*self.planes, self.scales, self.mins, self.sub, self.sub_min) if t is not None]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    @property
    def device(self) -> torch.device:
        return self.scales.device


# ---- layout ------------------------------------------------------------------------------------

def pack_codes(q: torch.Tensor, planes: tuple[int, ...]) -> list[torch.Tensor]:
    """q uint8 [n, kp] (codes < 2^sum(planes), kp a multiple of 32) -> one int32 [n, kp*p/32]
    per plane, tile-interleaved as described above. Runs on q's device."""
    n, kp = q.shape
    require(kp % K_ALIGN == 0, f"{kp} codes per row are not a multiple of {K_ALIGN}")
    out = [torch.empty(n, kp * p // 32, dtype=torch.int32, device=q.device) for p in planes]
    step = max(1, (1 << 24) // kp)  # rows at a time: int32 temporaries of ~64 MB, not 4x the weight
    for r in range(0, n, step):
        qi, shift = q[r : r + step].to(torch.int32), 0
        rows = qi.shape[0]
        for p, dst in zip(planes, out):
            per = 32 // p
            # code j*p + w of a 32-code tile -> field j of the tile's word w
            c = ((qi >> shift) & ((1 << p) - 1)).view(rows, kp // 32, per, p)
            word = torch.zeros((rows, kp // 32, p), dtype=torch.int32, device=q.device)
            for j in range(per):  # bit shifts wrap into the sign bit for the top field: what we want
                word |= c[:, :, j, :] << (p * j)
            dst[r : r + step] = word.view(rows, kp * p // 32)
            shift += p
    return out


def unpack_codes(planes: list[torch.Tensor], bits: tuple[int, ...], kp: int) -> torch.Tensor:
    """Inverse of `pack_codes`: uint8 [n, kp]."""
    q, shift = None, 0
    for t, p in zip(planes, bits):
        per = 32 // p
        sh = torch.arange(per, device=t.device, dtype=torch.int32) * p
        words = t.view(t.shape[0], kp // 32, 1, p)  # [n, tiles, 1, words of a tile]
        c = ((words >> sh[None, None, :, None]) & ((1 << p) - 1)).reshape(t.shape[0], kp)
        q = c << shift if q is None else q | (c << shift)
        shift += p
    return q.to(torch.uint8)


def group_scales(w: QWeight) -> tuple[torch.Tensor, torch.Tensor | None]:
    """float32 (s [n, groups], m [n, groups] or None) per group, in the order gguf computes them."""
    lay = w.layout
    if not lay.super_block:
        return w.scales.float(), (w.mins.float() if w.mins is not None else None)
    per = lay.super_block // lay.group
    d = w.scales.float().repeat_interleave(per, dim=1)
    sub = (w.sub & 15) if lay.min_kind == "nibble" else w.sub
    s = d * sub.float()
    if lay.min_kind == "none":
        return s, None
    smin = (w.sub >> 4) if lay.min_kind == "nibble" else w.sub_min
    return s, -(w.mins.float().repeat_interleave(per, dim=1) * smin.float())


def dequantize_ref(w: QWeight) -> torch.Tensor:
    """float32 [n, k]: s * (q - zero) + m per group."""
    lay = w.layout
    q = unpack_codes(w.planes, lay.planes, w.kp).float()
    s, m = group_scales(w)
    g = lay.group or w.kp
    q = q.view(w.n, w.kp // g, g)
    out = s[..., None] * (q - lay.zero if lay.zero else q)
    if m is not None:
        out = out + m[..., None]
    return out.reshape(w.n, w.kp)[:, : w.k]


def qmatmul_ref(x: torch.Tensor, w: QWeight) -> torch.Tensor:
    """Pure-PyTorch `qmatmul`: x [M, k] -> x @ dequantize(W).T [M, n], float32 math, rounded once
    to x's dtype."""
    _check(x, w)
    return F.linear(x.float(), dequantize_ref(w).to(x.device)).to(x.dtype)


# ---- kernels -----------------------------------------------------------------------------------

@jit
def _program_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's weight rows (grid axis 0) and activation rows (axis 1): offs_n, n_mask,
    rows (int64; rows past N re-read row N-1 instead of masking, so loads stay unpredicated along
    N and their results are never stored, as kernels/gemv.py does), offs_m, m_mask."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    rows = tl.where(n_mask, offs_n, N - 1).to(tl.int64)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    return offs_n, n_mask, rows, offs_m, offs_m < M


@jit
def _scale_min(sp, mp, subp, submp, rows, g, NG, NSUP,
               GROUP: tl.constexpr, ZERO: tl.constexpr, MIN_KIND: tl.constexpr, SUPER: tl.constexpr):
    """float32 (s, m - ZERO * s) of groups g of rows (int64 row indices; shapes broadcast).
    Groups past the row's last (a partial last tile, whose codes and x are masked to 0) read
    the last one, so every load stays in bounds and every value finite."""
    if GROUP == 0:
        g = g * 0  # one group per row
    else:
        g = tl.minimum(g, NG - 1)
    if SUPER == 0:
        s = tl.load(sp + rows * NG + g).to(tl.float32)
        if MIN_KIND == 1:
            m = tl.load(mp + rows * NG + g).to(tl.float32)
        else:
            m = s * 0.0
    else:
        sb = g // (SUPER // GROUP)
        d = tl.load(sp + rows * NSUP + sb).to(tl.float32)
        if MIN_KIND == 3:
            byte = tl.load(subp + rows * NG + g).to(tl.int32)
            s = d * (byte & 15).to(tl.float32)
            m = -(tl.load(mp + rows * NSUP + sb).to(tl.float32) * (byte >> 4).to(tl.float32))
        else:
            s = d * tl.load(subp + rows * NG + g).to(tl.float32)
            if MIN_KIND == 2:
                m = -(tl.load(mp + rows * NSUP + sb).to(tl.float32) * tl.load(submp + rows * NG + g).to(tl.float32))
            else:
                m = s * 0.0
    if ZERO != 0:
        m = m - ZERO * s
    return s, m


# float32 2^23: an integer < 2^23 OR-ed into its mantissa reads as 2^23 + the integer. Passed to
# the GEMV as an argument, not a literal: in a register it lets every mask be LOP3's immediate
# (as a literal, ptxas spent a MOV re-materializing each mask per use, ~1.3 instructions a code).
MAGIC = 0x4B000000


@jit
def _field(words, magic, J: tl.constexpr, P: tl.constexpr):
    """Field J (bits P*J ..) of P-bit int32 words as float32 q * 2^B, without a shift or an
    int-to-float conversion (a quarter-rate instruction on Hopper): the field is masked where it
    lies and OR-ed into the mantissa of 2^23, and one subtraction leaves exactly q * 2^B. Fields
    that end past bit 23 are read from the word shifted right by 12. B is `_field_shift(J, P)`;
    callers multiply by x * 2^-B."""
    if P * J + P <= 23:
        f = (words & (((1 << P) - 1) << (P * J))) | magic
    else:
        f = ((words >> 12) & (((1 << P) - 1) << (P * J - 12))) | magic
    return f.to(tl.float32, bitcast=True) - 8388608.0


@jit
def _field_unit(J: tl.constexpr, P: tl.constexpr):
    """2^-B for `_field(., J, P)` (a compile-time constant)."""
    if P * J + P <= 23:
        r = 1.0 / (1 << (P * J))
    else:
        r = 1.0 / (1 << (P * J - 12))
    return r


@jit
def _plane_gemv(acc, wp, magic, xrow, sp, mp, subp, submp, rows, k0, K, KP, NG, NSUP, m_mask,
                P: tl.constexpr, HI_SHIFT: tl.constexpr, GROUP: tl.constexpr, GDIV: tl.constexpr,
                ZERO: tl.constexpr, MIN_KIND: tl.constexpr, SUPER: tl.constexpr, BLOCK_K: tl.constexpr,
                EVEN: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N, W] += one plane's BLOCK_K codes at k0 times x, scaled per group.
    HI_SHIFT 0: the low plane (scale and min); else the high plane (codes count 2^HI_SHIFT each,
    no min). Word i of the tile holds fields j = 0 .. 32/P - 1, codes k0 + (i // P) * 32 + j * P
    + i % P (module docstring): for each field the thread's words need P (up to 4) consecutive
    activations, one vector load shared by all its weight rows."""
    C: tl.constexpr = 32 // P
    W: tl.constexpr = BLOCK_K * P // 32
    wi = tl.arange(0, W)
    # a row is KP / 32 tiles of P words: a multiple of P words (16-byte rows for P >= 4)
    row_words = tl.multiple_of(KP // 32 * P, P)
    wptr = wp + rows[:, None] * row_words + (k0 // 32 * P + wi)[None, :]
    kb = k0 + (wi // P) * 32 + wi % P  # the code in field 0 of each word [W]
    if EVEN:
        words = tl.load(wptr)
    else:
        words = tl.load(wptr, mask=(kb < KP)[None, :], other=0)
    # fields per group: all of them when a group spans whole 32-code tiles, else (GROUP 16) half
    L: tl.constexpr = C if (GROUP == 0 or GROUP >= 32) else GROUP // P
    HAS_MIN: tl.constexpr = HI_SHIFT == 0 and (MIN_KIND != 0 or ZERO != 0)
    for h in tl.static_range(C // L):
        part = tl.zeros(acc.shape, dtype=tl.float32)
        xs = tl.zeros((acc.shape[0], 1, W), dtype=tl.float32)
        for jj in tl.static_range(L):
            q = _field(words, magic, h * L + jj, P)
            kx = kb + (h * L + jj) * P
            if EVEN:
                xv = tl.load(xrow + kx[None, None, :], mask=m_mask[:, None, None], other=0.0).to(tl.float32)
            else:
                xv = tl.load(xrow + kx[None, None, :], mask=m_mask[:, None, None] & (kx < K)[None, None, :],
                             other=0.0).to(tl.float32)
            part += q[None, :, :] * (xv * _field_unit(h * L + jj, P))
            if HAS_MIN:
                xs += xv
        s, m = _scale_min(sp, mp, subp, submp, rows[:, None], ((kb + h * L * P) // GDIV)[None, :], NG, NSUP,
                          GROUP, ZERO if HI_SHIFT == 0 else 0, MIN_KIND, SUPER)
        if HI_SHIFT != 0:
            acc += part * (s * (1 << HI_SHIFT))[None, :, :]
        elif HAS_MIN:
            acc += part * s[None, :, :] + m[None, :, :] * xs
        else:
            acc += part * s[None, :, :]
    return acc


@jit
def _qgemv_kernel(x, out, w0, w1, sp, mp, subp, submp, M, N, K, KP, NG, NSUP, stride_xm, stride_om, magic,
                  P0: tl.constexpr, P1: tl.constexpr, GROUP: tl.constexpr, GDIV: tl.constexpr, ZERO: tl.constexpr,
                  MIN_KIND: tl.constexpr, SUPER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, EVEN: tl.constexpr, PDL: tl.constexpr = False):
    offs_n, n_mask, rows, offs_m, m_mask = _program_tile(M, N, BLOCK_M, BLOCK_N)
    pdl_wait(PDL)
    xrow = x + offs_m.to(tl.int64)[:, None, None] * stride_xm  # [BM, 1, 1]
    acc0 = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K * P0 // 32), dtype=tl.float32)
    if P1 > 0:
        acc1 = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K * P1 // 32), dtype=tl.float32)
    for k0 in range(0, KP, BLOCK_K):
        acc0 = _plane_gemv(acc0, w0, magic, xrow, sp, mp, subp, submp, rows, k0, K, KP, NG, NSUP, m_mask, P0, 0,
                           GROUP, GDIV, ZERO, MIN_KIND, SUPER, BLOCK_K, EVEN)
        if P1 > 0:
            acc1 = _plane_gemv(acc1, w1, magic, xrow, sp, mp, subp, submp, rows, k0, K, KP, NG, NSUP, m_mask, P1, P0,
                               GROUP, GDIV, ZERO, MIN_KIND, SUPER, BLOCK_K, EVEN)
    y = tl.sum(acc0, axis=2)
    if P1 > 0:
        y += tl.sum(acc1, axis=2)
    o_ptrs = out + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    pdl_trigger(PDL)  # late: see _triton.py (a wide grid lets its successor in only near its end)
    tl.store(o_ptrs, y.to(out.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@jit
def _codes_tile(wp, rows, k0, KP, P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                EVEN: tl.constexpr):
    """int32 codes [BLOCK_K, BLOCK_N] of one plane (K-major, tl.dot's right operand), natural K
    order: the words are loaded [W, BLOCK_N], viewed [tiles, P, BLOCK_N] (a 32-code tile's P
    words), split into fields [tiles, 32/P, P, BLOCK_N], which is K order. Built K-major rather
    than as [BLOCK_N, BLOCK_K] then transposed: the transposed form took ~255 registers and
    spilled in sm_90 compiles (benchmarks/compile_check_weights.py)."""
    C: tl.constexpr = 32 // P
    W: tl.constexpr = BLOCK_K // C
    wi = tl.arange(0, W)
    wptr = wp + rows[None, :] * (KP // C) + (k0 // C + wi)[:, None]
    if EVEN:
        words = tl.load(wptr)
    else:
        words = tl.load(wptr, mask=(k0 + (wi // P) * 32 < KP)[:, None], other=0)
    words = tl.reshape(words, (BLOCK_K // 32, 1, P, BLOCK_N))
    sh = tl.arange(0, C) * P
    c = (words >> sh[None, :, None, None]) & ((1 << P) - 1)
    return tl.reshape(c, (BLOCK_K, BLOCK_N))


@jit
def _weight_tile(w0, w1, sp, mp, subp, submp, rows, k0, KP, NG, NSUP,
                 P0: tl.constexpr, P1: tl.constexpr, GROUP: tl.constexpr, GDIV: tl.constexpr, ZERO: tl.constexpr,
                 MIN_KIND: tl.constexpr, SUPER: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 EVEN: tl.constexpr):
    """float32 dequantized weight tile, K-major [BLOCK_K, BLOCK_N], at K offset k0."""
    q = _codes_tile(w0, rows, k0, KP, P0, BLOCK_N, BLOCK_K, EVEN)
    if P1 > 0:
        q += _codes_tile(w1, rows, k0, KP, P1, BLOCK_N, BLOCK_K, EVEN) << P0
    qf = q.to(tl.float32)
    if GROUP == 0 or GROUP >= BLOCK_K:  # one group per tile column (BLOCK_K divides GROUP)
        s, m = _scale_min(sp, mp, subp, submp, rows[None, :], k0 // GDIV + tl.zeros((1, 1), tl.int32),
                          NG, NSUP, GROUP, ZERO, MIN_KIND, SUPER)
        w = qf * s + m
    else:
        GT: tl.constexpr = BLOCK_K // GDIV
        g = k0 // GDIV + tl.arange(0, GT)
        s, m = _scale_min(sp, mp, subp, submp, rows[None, :], g[:, None], NG, NSUP, GROUP, ZERO, MIN_KIND, SUPER)
        w = tl.reshape(tl.reshape(qf, (GT, GROUP, BLOCK_N)) * s[:, None, :] + m[:, None, :], (BLOCK_K, BLOCK_N))
    return w


@jit
def _qgemm_kernel(x, out, w0, w1, sp, mp, subp, submp, M, N, K, KP, NG, NSUP, stride_xm, stride_om,
                  P0: tl.constexpr, P1: tl.constexpr, GROUP: tl.constexpr, GDIV: tl.constexpr, ZERO: tl.constexpr,
                  MIN_KIND: tl.constexpr, SUPER: tl.constexpr, PRECISION: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN: tl.constexpr):
    offs_n, n_mask, rows, offs_m, m_mask = _program_tile(M, N, BLOCK_M, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, KP, BLOCK_K):
        if EVEN:
            xt = tl.load(x_ptrs, mask=m_mask[:, None], other=0.0)
        else:
            xt = tl.load(x_ptrs, mask=m_mask[:, None] & (k0 + offs_k < K)[None, :], other=0.0)
        wt = _weight_tile(w0, w1, sp, mp, subp, submp, rows, k0, KP, NG, NSUP, P0, P1, GROUP, GDIV, ZERO, MIN_KIND,
                          SUPER, BLOCK_N, BLOCK_K, EVEN)
        acc = tl.dot(xt, wt.to(xt.dtype), acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K
    o_ptrs = out + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(o_ptrs, acc.to(out.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@jit
def _dequant_kernel(out, w0, w1, sp, mp, subp, submp, N, K, KP, NG, NSUP, stride_on,
                    P0: tl.constexpr, P1: tl.constexpr, GROUP: tl.constexpr, GDIV: tl.constexpr, ZERO: tl.constexpr,
                    MIN_KIND: tl.constexpr, SUPER: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    EVEN: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    rows = tl.where(n_mask, offs_n, N - 1).to(tl.int64)
    k0 = pid_k * BLOCK_K
    wt = _weight_tile(w0, w1, sp, mp, subp, submp, rows, k0, KP, NG, NSUP, P0, P1, GROUP, GDIV, ZERO, MIN_KIND,
                      SUPER, BLOCK_N, BLOCK_K, EVEN)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    o_ptrs = out + offs_n.to(tl.int64)[None, :] * stride_on + offs_k[:, None]
    tl.store(o_ptrs, wt.to(out.dtype.element_ty), mask=n_mask[None, :] & (offs_k < K)[:, None])


@jit
def _nibble_pairs_tile(a, c):
    """int32 words [W, BN] a, c, each two float16 bit patterns (low half, high half) -> float16
    [4 W, BN]: flat row (w * 2 + s) * 2 + e holds half e of (a if s == 0 else c) of word w. Only
    register moves: join, truncate to int16, bitcast."""
    W: tl.constexpr = a.shape[0]
    BN: tl.constexpr = a.shape[1]
    y = tl.join(a, c)  # [W, BN, 2]
    z = tl.join(y.to(tl.int16), (y >> 16).to(tl.int16))  # [W, BN, 2, 2]
    z = tl.permute(z, (0, 2, 3, 1))  # [W, 2, 2, BN]
    return tl.reshape(z, (4 * W, BN)).to(tl.float16, bitcast=True)


@jit
def _scaled_tile(t, s, m, GT: tl.constexpr):
    """float16 tile [R, BN] of 1024 + q -> q * s + m, s and m float32 [GT, BN] for GT equal runs of
    rows (one per group), in float16 (two operations per pair of codes)."""
    R: tl.constexpr = t.shape[0]
    BN: tl.constexpr = t.shape[1]
    q = tl.reshape(t - 1024.0, (GT, R // GT, BN))
    w = q * s.to(tl.float16)[:, None, :] + m.to(tl.float16)[:, None, :]
    return tl.reshape(w, (R, BN))


@jit
def _qgemv_tc_kernel(x, out, w0, sp, mp, subp, submp, M, N, K, KP, NG, NSUP, stride_xm, stride_om, magic16,
                     GROUP: tl.constexpr, GDIV: tl.constexpr, ZERO: tl.constexpr, MIN_KIND: tl.constexpr,
                     SUPER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     EVEN: tl.constexpr, IN_TILE: tl.constexpr):
    """A 4-bit plane (one plane of P = 4) times up to BLOCK_M rows on tensor cores, for decode at
    small batch. Fields become float16 1024 + q two per integer op, `magic16` = 0x64006400 OR-ed
    into a masked word (fields 0/4 and 2/6 of a word in place or after one >> 8; fields 1/5 and
    3/7 in place as 1024 + 16 q, or after >> 4 and >> 12 with IN_TILE); activations in float16,
    products and sums in float32. Two ways to apply the group's scale and min:
    - IN_TILE 0 (groups of >= BLOCK_K codes): the tile stays exact, the x16 fields meet x / 16,
      1024 x (sum of x) comes off after the dot, scale and min per row after it (the activation
      sums by the tensor cores too: a row reduction would cost shuffles every step);
    - IN_TILE 1 (smaller groups, e.g. GGUF's 32): the tile becomes q * s + m in float16 before the
      dot (a dequantized float16 weight, as a dequantize + matmul would use)."""
    offs_n, n_mask, rows, offs_m, m_mask = _program_tile(M, N, BLOCK_M, BLOCK_N)
    W: tl.constexpr = BLOCK_K // 8
    wi = tl.arange(0, W)
    row_words = tl.multiple_of(KP // 8, 4)
    f = tl.arange(0, 4 * W)  # flat row of a tile: word f // 4, pair (f // 2) % 2, half f % 2
    fw = f // 4
    kf = (fw // 4) * 32 + fw % 4 + ((f // 2) % 2) * 8 + (f % 2) * 16  # fields 0, 2, 4, 6: codes 4j + w
    xrow = x + offs_m.to(tl.int64)[:, None] * stride_xm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    ones = tl.full((4 * W, BLOCK_N), 1.0, tl.float16)
    for k0 in range(0, KP, BLOCK_K):
        wptr = w0 + rows[None, :] * row_words + (k0 // 8 + wi)[:, None]
        if EVEN:
            words = tl.load(wptr)
            x1 = tl.load(xrow + (k0 + kf)[None, :], mask=m_mask[:, None], other=0.0).to(tl.float32)
            x2 = tl.load(xrow + (k0 + kf + 4)[None, :], mask=m_mask[:, None], other=0.0).to(tl.float32)
        else:
            words = tl.load(wptr, mask=(k0 + (wi // 4) * 32 < KP)[:, None], other=0)
            x1 = tl.load(xrow + (k0 + kf)[None, :], mask=m_mask[:, None] & (k0 + kf < K)[None, :],
                         other=0.0).to(tl.float32)
            x2 = tl.load(xrow + (k0 + kf + 4)[None, :], mask=m_mask[:, None] & (k0 + kf + 4 < K)[None, :],
                         other=0.0).to(tl.float32)
        lo = _nibble_pairs_tile((words & 0x000F000F) | magic16, ((words >> 8) & 0x000F000F) | magic16)
        if IN_TILE:
            GT: tl.constexpr = BLOCK_K // GROUP  # groups in the tile (whole 32-code tiles each)
            hi = _nibble_pairs_tile(((words >> 4) & 0x000F000F) | magic16, ((words >> 12) & 0x000F000F) | magic16)
            g = k0 // GDIV + tl.arange(0, GT)
            s, m = _scale_min(sp, mp, subp, submp, rows[None, :], g[:, None], NG, NSUP, GROUP, ZERO, MIN_KIND, SUPER)
            acc = tl.dot(x1.to(tl.float16), _scaled_tile(lo, s, m, GT), acc, input_precision="ieee")
            acc = tl.dot(x2.to(tl.float16), _scaled_tile(hi, s, m, GT), acc, input_precision="ieee")
        else:
            hi = _nibble_pairs_tile((words & 0x00F000F0) | magic16, ((words >> 8) & 0x00F000F0) | magic16)
            x1h = x1.to(tl.float16)
            x2h = (x2 * 0.0625).to(tl.float16)
            d = tl.dot(x1h, lo, input_precision="ieee")
            d = tl.dot(x2h, hi, d, input_precision="ieee")
            # so = sum(x1h) + sum(x2h) (the magic offset), sx = sum(x1h) + 16 sum(x2h) (sum of x),
            # already broadcast over the tile's rows in the accumulator's layout
            so = tl.dot(x2h, ones, tl.dot(x1h, ones, input_precision="ieee"), input_precision="ieee")
            sx = tl.dot(x2h, ones * 15.0, so, input_precision="ieee")
            s, m = _scale_min(sp, mp, subp, submp, rows[None, :], (k0 // GDIV + tl.zeros((1, 1), tl.int32)), NG,
                              NSUP, GROUP, ZERO, MIN_KIND, SUPER)
            acc += (d - 1024.0 * so) * s + m * sx
    o_ptrs = out + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(o_ptrs, acc.to(out.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


# ---- integer GEMV: int8 activations, dp4a (kind="dp4a") ----------------------------------------
# llama.cpp's mmvq idea in this layout: the activations are quantized to int8 per 32-code tile
# (absmax / 127, as GGUF's Q8_1), so a weight word's fields meet them in integer dot products of
# four bytes (dp4a: four multiply-adds in one instruction). A plane of P bits has 32/P fields per
# word; (word >> d*P) & MASK holds fields d, d + 8/P, d + 16/P, d + 24/P as four bytes, i.e.
# (module docstring's code 32t + P*j + w) codes 32t + 8b + P*d + w for bytes b = 0..3: so one
# packing of x serves every plane width, word u (0..7) of a tile holding bytes x[32t + u + 8b].
# Per 32 codes of a 4-bit plane: 4 weight words, 8 dp4a, ~6 mask/shift ops, one int->float and two
# FMAs per tile for the scale, the min and x's scale: under one instruction per code (the float
# GEMV: ~6.5).
# 12582912.0 = 1.5 * 2^23: v + it, bitcast, minus its bits (0x4B400000) = round-half-even(v) (a literal
# in the kernel: Triton 3.6 refuses non-constexpr globals)


@jit
def _quant_x_kernel(x, xq, xs, xsum, K, KP, stride_xm, BLOCK_T: tl.constexpr, PDL: tl.constexpr = False):
    """x [M, K] float -> xq int32 [M, KP / 4] (tile t's word u: bytes x[32t + u + 8b] / scale,
    rounded, b = 0..3), xs float32 [M, KP / 32] (the tile's absmax / 127) and xsum float32
    [M, KP / 32] (the tile's sum of x, for the groups' mins)."""
    pdl_trigger(PDL)
    pdl_wait(PDL)
    m = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    b = tl.arange(0, 4)
    u = tl.arange(0, 8)
    k = t[:, None, None] * 32 + b[None, :, None] * 8 + u[None, None, :]  # [T, 4, 8]
    v = tl.load(x + m * stride_xm + k, mask=k < K, other=0.0).to(tl.float32)
    amax = tl.max(tl.max(tl.abs(v), axis=2), axis=1)  # [T]
    scale = amax / 127.0
    inv = tl.where(amax > 0, 127.0 / tl.maximum(amax, 1e-30), 0.0)
    r = (v * inv[:, None, None] + 12582912.0).to(tl.int32, bitcast=True) - 0x4B400000  # in [-127, 127]
    word = tl.sum((r & 0xFF) << (b * 8)[None, :, None], axis=1)  # [T, 8]: disjoint bytes, the sum is an OR
    tmask = t < KP // 32
    tl.store(xq + m * (KP // 4) + t[:, None] * 8 + u[None, :], word, mask=tmask[:, None])
    tl.store(xs + m * (KP // 32) + t, scale, mask=tmask)
    tl.store(xsum + m * (KP // 32) + t, tl.sum(tl.sum(v, axis=2), axis=1), mask=tmask)


@jit
def _dp4a(a, b, c, ASM: tl.constexpr):
    """c + sum over bytes i of a's unsigned byte i times b's signed byte i (int32 tensors of one
    shape). ASM: PTX dp4a.u32.s32; else the same in integer ops (Triton's interpreter runs no PTX)."""
    if ASM:
        return tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                         dtype=tl.int32, is_pure=True, pack=1)
    else:
        r = c
        for i in tl.static_range(4):
            r += ((a >> (8 * i)) & 0xFF) * ((b << (24 - 8 * i)) >> 24)
        return r


@jit
def _x_slab(xrow, k, K, off: tl.constexpr, EVEN: tl.constexpr, ACT: tl.constexpr):
    """Activations at k + off (float32); ACT 1: silu(x[k]) * x[K + k] (SwiGLU's gate | up row)."""
    if EVEN:
        v = tl.load(xrow + (k + off)[None, :, :]).to(tl.float32)
    else:
        v = tl.load(xrow + (k + off)[None, :, :], mask=(k + off < K)[None, :, :], other=0.0).to(tl.float32)
    if ACT == 1:
        if EVEN:
            up = tl.load(xrow + (K + k + off)[None, :, :]).to(tl.float32)
        else:
            up = tl.load(xrow + (K + k + off)[None, :, :], mask=(k + off < K)[None, :, :], other=0.0).to(tl.float32)
        # silu(v) = v / (1 + e^-v): ex2 and an approximate division (two MUFU ops), not IEEE's
        v = tl.fdiv(v, 1.0 + tl.exp2(v * -1.4426950408889634), ieee_rounding=False) * up
    return v


@jit
def _x_byte(v, inv):
    """round(v * inv) (|.| <= 127) as its low byte, in an int32."""
    return ((v * inv + 12582912.0).to(tl.int32, bitcast=True) - 0x4B400000) & 0xFF


@jit
def _x_tiles(xrow, k0, K, NT: tl.constexpr, EVEN: tl.constexpr, ACT: tl.constexpr):
    """In-kernel `_quant_x_kernel` for the NT tiles at k0 (xrow [BLOCK_M, 1, 1] row pointers):
    (words int32 [BLOCK_M, NT, 8], word u of tile t holding bytes x[32t + u + 8b] / scale
    rounded, scale and the sums of the tile's two halves, float32 [BLOCK_M, NT]). Loaded as four [NT, 8] slabs (b = 0..3), so a
    tile's 32 values sit in one thread and its absmax, sum and byte packing need no shuffles."""
    t = tl.arange(0, NT)
    u = tl.arange(0, 8)
    k = k0 + t[:, None] * 32 + u[None, :]  # [NT, 8]: byte 0 of every word
    v0 = _x_slab(xrow, k, K, 0, EVEN, ACT)
    v1 = _x_slab(xrow, k, K, 8, EVEN, ACT)
    v2 = _x_slab(xrow, k, K, 16, EVEN, ACT)
    v3 = _x_slab(xrow, k, K, 24, EVEN, ACT)
    amax = tl.max(tl.maximum(tl.maximum(tl.abs(v0), tl.abs(v1)), tl.maximum(tl.abs(v2), tl.abs(v3))), axis=2)
    half0 = tl.sum(v0 + v1, axis=2)  # codes 32t .. 32t + 15 (bytes 0, 1 of the words)
    half1 = tl.sum(v2 + v3, axis=2)
    inv = tl.where(amax > 0, 127.0 / tl.maximum(amax, 1e-30), 0.0)[:, :, None]
    words = (_x_byte(v0, inv) | (_x_byte(v1, inv) << 8)) | ((_x_byte(v2, inv) << 16) | (_x_byte(v3, inv) << 24))
    return words, amax / 127.0, half0, half1


@jit
def _x_slice(words, P: tl.constexpr, d: tl.constexpr):
    """Words [BM, NT, 8] -> [BM, NT, P]: words P*d .. P*d + P - 1 of each tile (what dp4a d of a
    P-bit plane's word w meets), by register moves (reshape, permute, split)."""
    BM: tl.constexpr = words.shape[0]
    NT: tl.constexpr = words.shape[1]
    if P == 8:
        out = words
    else:
        y = tl.permute(tl.reshape(words, (BM, NT, 8 // P, P)), (0, 1, 3, 2))  # [BM, NT, P, D]
        if P == 4:
            a, b = tl.split(y)
            out = b if d == 1 else a
        elif P == 2:
            lo, hi = tl.split(tl.reshape(y, (BM, NT, P, 2, 2)))  # d = 2 * d_hi + d_lo
            a, b = tl.split(hi if d % 2 == 1 else lo)
            out = b if d >= 2 else a
        else:  # P == 1, D == 8: d = 4 d2 + 2 d1 + d0
            y = tl.reshape(y, (BM, NT, P, 2, 2, 2))
            lo, hi = tl.split(y)
            z = hi if d % 2 == 1 else lo
            lo, hi = tl.split(z)
            z = hi if (d // 2) % 2 == 1 else lo
            lo, hi = tl.split(z)
            out = hi if d >= 4 else lo
    return out


@jit
def _plane_dp4a(wp, xqrow, xwords, rows, k0, KP, P: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN: tl.constexpr, ASM: tl.constexpr,
                FUSE_X: tl.constexpr, HALF: tl.constexpr):
    """int32 [BLOCK_M, BLOCK_N, BLOCK_K / 32]: per 32-code tile, the sum of one plane's codes
    times the int8 activations: read from xq (xqrow [BLOCK_M, 1, 1, 1] row pointers), or with
    FUSE_X sliced from this program's own packed words (xwords [BLOCK_M, NT, 8], `_x_tiles`).
    HALF 0 or 1 (groups of 16 codes): only that half of each tile, bytes 0-1 or 2-3 of every
    word (code 32t + u + 8b is in group 2t + b // 2), the other bytes masked off the activations."""
    NT: tl.constexpr = BLOCK_K // 32
    D: tl.constexpr = 8 // P  # dp4a per weight word
    MASK: tl.constexpr = (1 << P) - 1 if P == 8 else ((1 << P) - 1) * 0x01010101
    wi = tl.arange(0, NT * P)
    row_words = tl.multiple_of(KP // 32 * P, P)
    wptr = wp + rows[:, None] * row_words + (k0 // 32 * P + wi)[None, :]
    t = tl.arange(0, NT)
    w = tl.arange(0, P)
    if EVEN:
        words = tl.load(wptr)
    else:
        words = tl.load(wptr, mask=(k0 + (wi // P) * 32 < KP)[None, :], other=0)
    words = tl.reshape(words, (1, BLOCK_N, NT, P))
    acc = tl.zeros((BLOCK_M, BLOCK_N, NT, P), dtype=tl.int32)
    for d in tl.static_range(D):
        if FUSE_X:
            xw = tl.expand_dims(_x_slice(xwords, P, d), 1)
        else:
            xo = (k0 // 32 + t)[:, None] * 8 + (P * d + w)[None, :]  # [NT, P]
            if EVEN:
                xw = tl.load(xqrow + xo[None, None, :, :])
            else:
                xw = tl.load(xqrow + xo[None, None, :, :], mask=(k0 + t * 32 < KP)[None, None, :, None], other=0)
        if P == 8:
            a = words
        else:
            a = (words >> (d * P)) & MASK
        if HALF == 0:  # on the activations' words: shared by the program's weight rows
            xw = xw & 0xFFFF
        elif HALF == 1:
            xw = xw & -65536  # 0xFFFF0000
        acc = _dp4a(tl.broadcast_to(a, acc.shape), tl.broadcast_to(xw, acc.shape), acc, ASM)
    return tl.sum(acc, axis=3)


@jit
def _qgemv_dp4a_kernel(x, xq, xs, xsum, out, w0, w1, sp, mp, subp, submp, M, N, K, KP, NG, NSUP, stride_xm,
                       stride_om, P0: tl.constexpr, P1: tl.constexpr, GROUP: tl.constexpr, GDIV: tl.constexpr,
                       ZERO: tl.constexpr, MIN_KIND: tl.constexpr, SUPER: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN: tl.constexpr, ASM: tl.constexpr,
                       FUSE_X: tl.constexpr, ACT: tl.constexpr, PDL: tl.constexpr = False):
    """BLOCK_N weight rows times BLOCK_M int8 activation rows: per tile, an integer dot per plane
    (the high plane's codes count 2^P0), then acc += float(dot) * x_scale * s + m * sum(x) with the
    group's scale s and min m (groups of >= 32 codes: one per tile). The activations come
    quantized (`_quant_x_kernel`'s xq, xs, xsum) or, FUSE_X, are quantized here from x by every
    program (no second launch; the same bytes as the separate kernel), ACT 1 from a gate | up row
    [2K] as silu(gate) * up in float32 (SwiGLU's down projection: no activation kernel either)."""
    offs_n, n_mask, rows, offs_m, m_mask = _program_tile(M, N, BLOCK_M, BLOCK_N)
    pdl_wait(PDL)
    mrow = tl.where(m_mask, offs_m, M - 1).to(tl.int64)  # rows past M re-read row M-1, never stored
    NT: tl.constexpr = BLOCK_K // 32
    xqrow = xq + mrow[:, None, None, None] * (KP // 4)
    xrow = x + mrow[:, None, None] * stride_xm
    t = tl.arange(0, NT)
    acc = tl.zeros((BLOCK_M, BLOCK_N, NT), dtype=tl.float32)
    for k0 in range(0, KP, BLOCK_K):
        if FUSE_X:
            xwords, xsc, xh0, xh1 = _x_tiles(xrow, k0, K, NT, EVEN, ACT)
            xsc = xsc[:, None, :]
            xsm = (xh0 + xh1)[:, None, :]
        else:
            xwords = tl.zeros((BLOCK_M, NT, 8), dtype=tl.int32)
        if GROUP == 16:  # two groups per tile: a dot per half (FUSE_X only: the half sums of x)
            for hh in tl.static_range(2):
                ih = _plane_dp4a(w0, xqrow, xwords, rows, k0, KP, P0, BLOCK_M, BLOCK_N, BLOCK_K, EVEN, ASM, FUSE_X,
                                 hh)
                if P1 > 0:
                    ih += _plane_dp4a(w1, xqrow, xwords, rows, k0, KP, P1, BLOCK_M, BLOCK_N, BLOCK_K, EVEN, ASM,
                                      FUSE_X, hh) << P0
                sh, mh = _scale_min(sp, mp, subp, submp, rows[:, None], ((k0 + t * 32) // 16 + hh)[None, :], NG,
                                    NSUP, GROUP, ZERO, MIN_KIND, SUPER)
                if hh == 1:
                    xh = xh1
                else:
                    xh = xh0
                acc += ih.to(tl.float32) * xsc * sh[None, :, :] + mh[None, :, :] * xh[:, None, :]
        else:
            isum = _plane_dp4a(w0, xqrow, xwords, rows, k0, KP, P0, BLOCK_M, BLOCK_N, BLOCK_K, EVEN, ASM, FUSE_X, -1)
            if P1 > 0:
                isum += _plane_dp4a(w1, xqrow, xwords, rows, k0, KP, P1, BLOCK_M, BLOCK_N, BLOCK_K, EVEN, ASM,
                                    FUSE_X, -1) << P0
            if not FUSE_X:
                to = mrow[:, None, None] * (KP // 32) + (k0 // 32 + t)[None, None, :]
                if EVEN:
                    xsc = tl.load(xs + to)
                    xsm = tl.load(xsum + to)
                else:
                    tm = (k0 + t * 32 < KP)[None, None, :]
                    xsc = tl.load(xs + to, mask=tm, other=0.0)
                    xsm = tl.load(xsum + to, mask=tm, other=0.0)
            s, m = _scale_min(sp, mp, subp, submp, rows[:, None], ((k0 + t * 32) // GDIV)[None, :], NG, NSUP,
                              GROUP, ZERO, MIN_KIND, SUPER)
            acc += isum.to(tl.float32) * xsc * s[None, :, :] + m[None, :, :] * xsm
    y = tl.sum(acc, axis=2)
    o_ptrs = out + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    pdl_trigger(PDL)  # late: see _triton.py (a wide grid lets its successor in only near its end)
    tl.store(o_ptrs, y.to(out.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def quantize_x(x: torch.Tensor, kp: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`_quant_x_kernel`: (xq int32 [M, kp / 4], xs, xsum float32 [M, kp / 32])."""
    M, K = x.shape
    xq = torch.empty((M, kp // 4), dtype=torch.int32, device=x.device)
    xs = torch.empty((M, kp // 32), dtype=torch.float32, device=x.device)
    xsum = torch.empty_like(xs)
    bt = min(QUANT_X_TILES, 1 << (kp // 32 - 1).bit_length())
    _quant_x_kernel[(M, cdiv(kp // 32, bt))](x, xq, xs, xsum, K, kp, x.stride(0), BLOCK_T=bt, num_warps=4,
                                             **pdl_kwargs())
    return xq, xs, xsum


def quantize_x_ref(x: torch.Tensor, kp: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PyTorch `quantize_x`, but with the int8 values unpacked: (q float [M, kp] in natural order,
    xs [M, kp / 32], xsum [M, kp / 32])."""
    M, K = x.shape
    v = torch.zeros((M, kp), dtype=torch.float32, device=x.device)
    v[:, :K] = x.float()
    v = v.view(M, kp // 32, 32)
    amax = v.abs().amax(dim=2)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.round(v * inv[..., None])  # half to even, as the kernel's magic add
    return q.view(M, kp), amax / 127.0, v.sum(dim=2)


def qmatmul_dp4a_ref(x: torch.Tensor, w: QWeight) -> torch.Tensor:
    """What kind="dp4a" computes, in float64: sum over tiles of s * x_scale * (codes . int8 x)
    + m' * sum(x), with m' = m - zero * s (exact up to the kernel's float32 sums)."""
    _check(x, w)
    q, xs, _ = quantize_x_ref(x, w.kp)
    codes = unpack_codes(w.planes, w.layout.planes, w.kp).double().to(x.device)
    s, m = group_scales(w)
    g = w.layout.group or w.kp
    s = s.double().to(x.device).repeat_interleave(g, dim=1)  # per code
    m = torch.zeros_like(s) if m is None else m.double().to(x.device).repeat_interleave(g, dim=1)
    m = m - w.layout.zero * s
    xhat = q.double() * xs.double().repeat_interleave(32, dim=1)
    part = xhat @ (codes * s).T
    # the min meets each group's exact sum of x (the kernel sums x per tile or half-tile)
    xe = torch.zeros((x.shape[0], w.kp), dtype=torch.float64, device=x.device)
    xe[:, : w.k] = x.double()
    return (part + xe @ m.T).to(x.dtype)


def _default_kind(m: int, w: QWeight) -> str:
    """qmatmul's kernel for m rows of w: dp4a up to DP4A_MAX_ROWS where the layout allows it,
    else `strategy(m)`."""
    if m <= DP4A_MAX_ROWS and dp4a_supported(w) and w.layout.bits <= DP4A_MAX_BITS and (
            w.layout.group != 16 or DP4A_G16):
        return "dp4a"
    return strategy(m)


def dp4a_supported(w: QWeight, fuse_x: bool | None = None) -> bool:
    """kind="dp4a" takes every plane split with groups of >= 32 codes (or one per row): a 32-code
    tile then has one scale and one min; groups of 16 (Q2_K, Q3_K, Q6_K) when the GEMV quantizes
    its own activations (`fuse_x`, default DP4A_FUSE_X), which gives it each half-tile's sum."""
    lay = w.layout if isinstance(w, QWeight) else w
    fuse = DP4A_FUSE_X if fuse_x is None else fuse_x
    return lay.group == 0 or lay.group >= 32 or (lay.group == 16 and fuse)


MAGIC16 = 0x64006400  # two float16 1024.0: see _qgemv_tc_kernel
# (block_m, block_n, block_k, num_warps, num_stages): from sm_90 compiles only (no GPU timing yet):
# 256-row slabs, 8 warps, 2 stages: 127 registers, ~3.6 SASS instructions per code in the loop
# (the register GEMV: ~6.5), as the tile's x work (16 rows, mostly masked at batch 1) is shared
# by more weight rows. benchmarks/weights.py times it beside the GEMV and the GEMM.
TC_CONFIG = (16, 256, 128, 8, 2)
# kind="dp4a" by activation rows, with the activations quantized in the GEMV: the H200 sweep's
# best per row count over the llama3-8b layers (benchmarks/results/weights-20261204-185435).
DP4A_CONFIGS = {1: (1, 8, 4096, 4, 1), 4: (4, 16, 1024, 4, 1), 16: (16, 8, 1024, 4, 1)}
# qmatmul's default takes kind="dp4a" up to DP4A_MAX_ROWS rows where the layout allows (0: never,
# the module default, so kernel tests see exact activations). The GPU runner sets DP4A_ROWS unless
# EngineConfig.int8_activations is "off": in the H200 sweep (benchmarks/results/weights-20261204-
# 182848) dp4a beat the float GEMV at one row on every llama3-8b layer (int4-g128 gate|up 47.2 ->
# 26.9 us, down 24.7 -> 11.5) and the tl.dot GEMM at 4 rows, and lost to the GEMM at 16.
# DP4A_MAX_BITS: the widest weights it takes by default. The int8 activations' rounding is what
# an 8-bit weight's own rounding costs, or more (SmolLM2-135M teacher-forced decode, H200: +1.1%
# perplexity from int8 activations on the same weights), so "auto" keeps 8-bit weights on float
# activations, where dp4a also gains least (~20% per GEMV).
DP4A_MAX_ROWS = 0
DP4A_ROWS = 4
DP4A_MAX_BITS = 8
# Quantize the activations inside the dp4a GEMV (each program redoes its K range's tiles) instead
# of one `_quant_x_kernel` launch per product. H200, int4-g128, one row (weights-20261204-185329):
# q|k|v 8.25 -> 6.73 us, o 6.68 -> 4.90, gate|up 27.2 -> 24.1; end to end 382 -> 427 tok/s.
DP4A_FUSE_X = True
# act="silu_mul" (SwiGLU's down projection) can compute silu(gate) * up in the fused GEMV's load
# instead of a SiLU-and-multiply kernel: one launch fewer per layer, but ~0.9 more instructions
# per code (two MUFU ops and the conversions per activation, redone by every program; sm_90: 2.4
# per code at 16-row programs). Measured slower on the H200 (weights-20261204-190723: int4-g128
# decode batch 1 404.1 tok/s fused against 422.5 with the separate kernel), so off.
DP4A_FUSE_ACT = False
# Groups of 16 (Q6_K, Q3_K, Q2_K) through dp4a by default (a dot per half-tile, 4.1 instructions
# per Q6_K code in the sm_90 compile; fused activation quantization only): a Llama-3-8B-shaped
# Q4_K_M decodes at batch 1 at 345.5 tok/s with it against 236.4 with those layers (attn_v, half
# of ffn_down, the output) in the float GEMV (H200, weights-20261204-204103, one run).
DP4A_G16 = True
DP4A_ACT_CONFIGS = {1: (1, 16, 4096, 4, 1), 4: (4, 16, 1024, 4, 1), 16: (16, 8, 1024, 4, 1)}
QUANT_X_TILES = 32  # 32-code tiles per program of _quant_x_kernel


def tc_supported(w: QWeight) -> bool:
    """`kind="tc"` takes one 4-bit plane (int4, Q4_0/Q4_1, Q4_K) in groups of >= 32 codes (a
    tile is a whole number of 32-code tiles within one group)."""
    lay = w.layout if isinstance(w, QWeight) else w
    return lay.planes == (4,) and (lay.group == 0 or lay.group >= 32)


# ---- wrappers ----------------------------------------------------------------------------------

# Launch tables: (block_m, block_n, block_k, num_warps, num_stages). The GEMV's BLOCK_K is in
# codes. One activation row: the fastest configuration per low plane width in the H200 sweep
# (benchmarks/results/weights-20261204-160337: every llama3-8b layer, 24 configurations each):
# a whole 4096-code row slab per loop step, 4 warps, slabs of 4 (8-bit), 8 (4-bit; 4 with K-quant
# super-blocks, whose sub-scales cost registers) or 16 (2- and 1-bit) rows. At 2-4 rows the
# register GEMV (one accumulator per row) lost to the skinny tl.dot GEMM in that sweep, so
# GEMV_MAX_ROWS is 1; its multi-row form stays for tests and sweeps.
GEMV_CONFIGS = {1: (1, 8, 4096, 4, 1), 2: (2, 8, 2048, 4, 1), 4: (4, 8, 2048, 4, 1)}
GEMV_ONE_ROW = {8: (1, 4, 2048, 4, 1), 4: (1, 8, 4096, 4, 1), 2: (1, 16, 4096, 4, 1), 1: (1, 16, 4096, 4, 1)}
GEMV_ONE_ROW_SUPER = (1, 4, 4096, 4, 1)
# The GEMM's candidates were compiled for sm_90 (benchmarks/compile_check_weights.py): these
# keep 80 / 120 / 173 registers per thread and no spills for int4-g128 with bf16 activations.
GEMM_CONFIGS = {16: (16, 64, 128, 4, 3), 64: (64, 64, 64, 8, 3), 256: (64, 128, 64, 8, 3)}
DEQUANT_CONFIG = (64, 64, 8)  # (block_n, block_k, num_warps): ~70-80 registers, no spills (64x128x4 spilled)


def consts_tc(consts: dict) -> dict:
    return {k: v for k, v in consts.items() if k not in ("P0", "P1")}


def _check(x: torch.Tensor, w: QWeight) -> None:
    require(x.dim() == 2 and x.shape[1] == w.k, f"x must be [M, K={w.k}], got {tuple(x.shape)}")
    require(x.dtype in FLOAT_DTYPES, f"unsupported dtype {x.dtype}")
    require(x.stride(1) == 1, "x must be contiguous along K")


def _args(w: QWeight):
    lay = w.layout
    p1 = lay.planes[1] if len(lay.planes) > 1 else 0
    mins = w.mins if w.mins is not None else w.scales
    sub = w.sub if w.sub is not None else w.scales
    sub_min = w.sub_min if w.sub_min is not None else sub
    ng = w.kp // lay.group if lay.group else 1
    nsup = w.kp // lay.super_block if lay.super_block else 1
    tensors = (w.planes[0], w.planes[1] if p1 else w.planes[0], w.scales, mins, sub, sub_min)
    consts = dict(P0=lay.planes[0], P1=p1, GROUP=lay.group, GDIV=lay.group or 1, ZERO=lay.zero,
                  MIN_KIND=MIN_KINDS.index(lay.min_kind), SUPER=lay.super_block)
    return tensors, ng, nsup, consts


def default_config(m: int, kind: str, layout: QLayout | None = None) -> tuple[int, int, int, int, int]:
    if kind == "tc":
        return TC_CONFIG
    if kind == "dp4a":
        return DP4A_CONFIGS[min((r for r in DP4A_CONFIGS if r >= m), default=max(DP4A_CONFIGS))]
    if kind == "gemv" and m == 1 and layout is not None:
        return GEMV_ONE_ROW_SUPER if layout.super_block else GEMV_ONE_ROW[layout.planes[0]]
    table = GEMV_CONFIGS if kind == "gemv" else GEMM_CONFIGS
    rows = min((r for r in table if r >= m), default=max(table))
    return table[rows]


def strategy(m: int) -> str:
    """Which kernel `qmatmul` runs for m activation rows."""
    if m <= GEMV_MAX_ROWS:
        return "gemv"
    if m < DEQUANT_MIN_ROWS:
        return "gemm"
    return "dequant"


def _fit_block_k(bk: int, w: QWeight, kind: str) -> int:
    """A tile of whole words for every plane, whole groups (or a divisor of one), within kp. The
    tensor-core kernel takes a tile within one group, or (groups smaller than the tile) whole
    groups that it scales in the tile: `0 < group < block_k` says which."""
    g = w.layout.group
    if kind == "tc":
        bk = max(32, min(bk, 1 << (w.kp - 1).bit_length()))
        return bk if 0 < g < bk else min(bk, max(32, g or w.kp))
    bk = max(bk, 32)
    if kind == "dp4a":  # whole 32-code tiles (every group >= 32 is whole tiles)
        return min(bk, max(32, 1 << (w.kp - 1).bit_length()))
    if kind == "gemm" and g and g < bk:
        bk = max(bk // g, 1) * g
    return min(bk, max(32, 1 << (w.kp - 1).bit_length()))


def qmatmul(x: torch.Tensor, w: QWeight, *, kind: str | None = None,
            config: tuple[int, int, int, int, int] | None = None, out: torch.Tensor | None = None,
            fuse_x: bool | None = None, act: str | None = None) -> torch.Tensor:
    """x: [M, k] float (contiguous along K) -> x @ W.T [M, n] in x's dtype, W dequantized on the
    fly. `fuse_x` (kind "dp4a"): quantize the activations inside the GEMV (default DP4A_FUSE_X).
    `act` "silu_mul": x is [M, 2k] (gate | up) and the product is silu(gate) * up @ W.T, computed
    inside the fused dp4a GEMV in float32, else by the SiLU-and-multiply kernel first (rounded to
    x's dtype). `kind` forces "gemv" / "gemm" / "dequant" (default `strategy(M)`); `config` (block_m,
    block_n, block_k, num_warps, num_stages) overrides the launch table; `out` an optional
    [M, n] buffer."""
    fuse = DP4A_FUSE_X if fuse_x is None else fuse_x
    if act is not None:
        require(act == "silu_mul", f"unknown activation {act!r}; known: silu_mul")
        require(x.dim() == 2 and x.shape[1] == 2 * w.k and x.stride(1) == 1 and x.dtype in FLOAT_DTYPES,
                f"act='silu_mul' takes x [M, 2 * K = {2 * w.k}] (gate | up), got {tuple(x.shape)}")
        M = x.shape[0]
        kind = kind or _default_kind(M, w)
        if not (kind == "dp4a" and fuse and DP4A_FUSE_ACT):
            from bitfold.kernels.ops import silu_and_mul_op

            return qmatmul(silu_and_mul_op(x), w, kind=kind, config=config, out=out, fuse_x=fuse_x)
        if config is None:
            config = DP4A_ACT_CONFIGS[min((r for r in DP4A_ACT_CONFIGS if r >= M), default=max(DP4A_ACT_CONFIGS))]
    else:
        _check(x, w)
    M = x.shape[0]
    if out is None:
        out = torch.empty((M, w.n), dtype=x.dtype, device=x.device)
    require(out.shape == (M, w.n) and out.stride(1) == 1 and out.dtype == x.dtype, "out must be [M, n] in x's dtype")
    if M == 0:
        return out
    if kind is None:
        kind = _default_kind(M, w)
    if kind == "dequant":
        if out.is_contiguous():
            return torch.matmul(x, dequantize(w, x.dtype).t(), out=out)
        return out.copy_(x @ dequantize(w, x.dtype).t())  # a column slice of a wider output
    require_launchable(x, *w.tensors(), out)
    tensors, ng, nsup, consts = _args(w)
    bm, bn, bk, warps, stages = config or default_config(M, kind, w.layout)
    bk = _fit_block_k(bk, w, kind)
    even = w.kp % bk == 0 and w.k == w.kp
    grid = (cdiv(w.n, bn), cdiv(M, bm))
    if kind == "tc":
        require(tc_supported(w), f"kind='tc' takes one 4-bit plane, not {w.layout.planes}")
        _qgemv_tc_kernel[grid](x, out, tensors[0], *tensors[2:], M, w.n, w.k, w.kp, ng, nsup, x.stride(0),
                               out.stride(0), MAGIC16, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, EVEN=even,
                               IN_TILE=0 < w.layout.group < bk, num_warps=warps, num_stages=stages,
                               **consts_tc(consts))
    elif kind == "dp4a":
        require(dp4a_supported(w, fuse), f"kind='dp4a' takes groups of >= 32 codes (16 with fuse_x), not "
                f"{w.layout.group}")
        require(bm <= 16, f"the dp4a GEMV keeps block_m <= 16 rows in registers, got {bm}")
        xq, xs, xsum = (x, x, x) if fuse else quantize_x(x, w.kp)  # fused: unused pointers
        _qgemv_dp4a_kernel[grid](x, xq, xs, xsum, out, *tensors, M, w.n, w.k, w.kp, ng, nsup, x.stride(0),
                                 out.stride(0), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                                 EVEN=w.kp % bk == 0 and (not fuse or w.k == w.kp), ASM=not interpreting(),
                                 FUSE_X=fuse, ACT=1 if act else 0, num_warps=warps, num_stages=stages,
                                 **pdl_kwargs(), **consts)  # the GEMVs take part in PDL (tc and gemm do not)
    elif kind == "gemv":
        require(bm <= 16, f"the GEMV keeps block_m <= 16 rows in registers, got {bm}")
        _qgemv_kernel[grid](x, out, *tensors, M, w.n, w.k, w.kp, ng, nsup, x.stride(0), out.stride(0), MAGIC,
                            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, EVEN=even, num_warps=warps, num_stages=stages,
                            **pdl_kwargs(), **consts)
    else:
        require(bm >= 16, f"tl.dot needs block_m >= 16, got {bm}")
        # float32 activations keep float32 products (not tf32): they are the accuracy path
        _qgemm_kernel[grid](x, out, *tensors, M, w.n, w.k, w.kp, ng, nsup, x.stride(0), out.stride(0),
                            PRECISION="ieee" if x.dtype == torch.float32 else "tf32", BLOCK_M=bm, BLOCK_N=bn,
                            BLOCK_K=bk, EVEN=even, num_warps=warps, num_stages=stages, **consts)
    return out


def dequantize(w: QWeight, dtype: torch.dtype = torch.bfloat16, *, block_n: int | None = None,
               block_k: int | None = None) -> torch.Tensor:
    """The weight [n, k] in `dtype`, written by the dequantization kernel (for cuBLAS)."""
    out = torch.empty((w.n, w.k), dtype=dtype, device=w.device)
    if w.n == 0:
        return out
    require_launchable(*w.tensors())
    tensors, ng, nsup, consts = _args(w)
    bn, bk, warps = DEQUANT_CONFIG
    bn, bk = block_n or bn, _fit_block_k(block_k or bk, w, "gemm")
    _dequant_kernel[(cdiv(w.n, bn), cdiv(w.kp, bk))](out, *tensors, w.n, w.k, w.kp, ng, nsup, out.stride(0),
                                                       BLOCK_N=bn, BLOCK_K=bk, EVEN=w.kp % bk == 0, num_warps=warps,
                                                       **consts)
    return out
