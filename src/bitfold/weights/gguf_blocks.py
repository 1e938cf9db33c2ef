"""GGUF block types as data (ggml's type-traits table): how each block decodes into codes and
scales, and which bitfold low-bit format its codes are.

Every type decodes (`BlockType.decode`, torch ops, so it runs on the device the bytes are on)
into a `BlockCodes`: codes q uint8 and, per group of `group` weights,

    w = s * (q - zero) + m,   s = d (one fp16 per group)           Q4_0 Q4_1 Q5_0 Q5_1 Q8_0
                              s = d * sub (fp16 per 256, integer    Q2_K Q3_K Q4_K Q5_K Q6_K
                                  sub-scale per group)
                              m = min (Q4_1, Q5_1) or -(dmin * sub_min) (Q2_K, Q4_K, Q5_K) or 0

in float32 and in the order the `gguf` package computes it, so `BlockCodes.dequantize` equals
gguf's decoding bit for bit (tests/weights/test_gguf_blocks.py checks every type).

Byte layouts (ggml-common.h; fp16 little-endian):
    Q4_0  18 B / 32: d, qs[16]; weight j = qs[j] & 15, 16+j = qs[j] >> 4; w = d*(q-8)
    Q4_1  20 B / 32: d, m, qs[16] as Q4_0; w = d*q + m
    Q5_0  22 B / 32: d, qh[4] (bit j of the LE uint32 = bit 4 of weight j), qs[16]; w = d*(q-16)
    Q5_1  24 B / 32: d, m, qh[4], qs[16]; w = d*q + m
    Q8_0  34 B / 32: d, qs[32] int8; w = d*qs (q = qs + 128, zero 128)
    Q2_K  84 B / 256: scales[16] (sc | m << 4 per 16), qs[64], d, dmin; weight 128h + 32s + j =
          (qs[32h+j] >> 2s) & 3; w = d*sc*q - dmin*m
    Q3_K 110 B / 256: hmask[32], qs[64], scales[12] (16 six-bit scales - 32), d; low 2 bits as
          Q2_K's, bit 2 of weight 32s + j = (hmask[j] >> s) & 1; w = d*sc*(q-4)
    Q4_K 144 B / 256: d, dmin, scales[12] (8 six-bit sc and m), qs[128]; sub-block 2c is the low
          nibbles of qs[32c:32c+32], 2c+1 the high ones; w = d*sc*q - dmin*m
    Q5_K 176 B / 256: d, dmin, scales[12], qh[32], qs[128]; low nibbles as Q4_K, bit 4 of
          sub-block c's weight j = (qh[j] >> c) & 1
    Q6_K 210 B / 256: ql[128], qh[64], scales[16] int8, d; w = d*sc*(q-32) per 16 weights

On a GPU (`native`) every type keeps its own codes and scales in a `kernels.qmatmul.QLayout`
that the fused Triton kernels read: the same bytes per weight as the file for Q4_0, Q4_1, Q5_0,
Q5_1, Q8_0, Q2_K and Q6_K; Q4_K/Q5_K keep their 6-bit sub-scales and mins as a byte each
(+4 B per 256 weights: +2.8% / +2.3%) and Q3_K its 6-bit scales (+4 B: +3.6%), so the kernels
need no 12-byte unpacking. Lossless: the kernels compute w = d*sub*(q - zero) + m in float32.

As low-bit codes (`GGUFBlocks.codes`, what the CPU's LUT layers take): scale = fp16(s), min =
fp16(m - zero * scale). Exact for Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 (zero * d is exact in fp16); the
K-quants round the products d*sc and dmin*m to fp16 (half an ulp each). Codes of fewer bits or
of a group that the asked group divides are the same numbers in the wider spec (Q4_K into
int6-g16: same codes, each scale repeated), so a merged layer of mixed types stays lossless.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

from bitfold.kernels import qmatmul as qm
from bitfold.weights.lowbit import LowBitSpec
from bitfold.weights.packed import Codes, PackedWeight


@dataclass
class BlockCodes:
    """Decoded blocks of one type, rows of `n` blocks flattened: q uint8 [n, block]; d float32
    [n, groups] (no sub-scales) or [n, 1]; sub int32 [n, groups] or None; m float32 [n, groups]
    or None; dmin float32 [n, 1] and sub_min int32 [n, groups] or None."""

    q: torch.Tensor
    group: int
    zero: int
    d: torch.Tensor
    sub: torch.Tensor | None = None
    m: torch.Tensor | None = None
    dmin: torch.Tensor | None = None
    sub_min: torch.Tensor | None = None

    def scales(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-group float32 (s [n, groups], m [n, groups] or None), as gguf computes them."""
        s = self.d if self.sub is None else self.d * self.sub.float()
        if self.m is not None:
            return s, self.m
        if self.sub_min is not None:
            return s, -(self.dmin * self.sub_min.float())
        return s, None

    def dequantize(self) -> torch.Tensor:
        """float32 [n, block]: s * (q - zero) + m per group."""
        n, block = self.q.shape
        s, m = self.scales()
        q = self.q.view(n, -1, self.group).float()
        w = s[..., None] * (q - self.zero if self.zero else q)
        return (w if m is None else w + m[..., None]).reshape(n, block)


def _f16(b: torch.Tensor, offset: int) -> torch.Tensor:
    """The fp16 at byte `offset` of every block, as float32 [n, 1]."""
    return b[:, offset:offset + 2].contiguous().view(torch.float16).float()


def _shifts(*values: int, device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8, device=device)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[n, 16] bytes -> [n, 32] codes: low nibbles first, then high (Q4_0..Q5_1's order)."""
    return torch.cat([qs & 15, qs >> 4], dim=1)


def _bits32(qh: torch.Tensor) -> torch.Tensor:
    """[n, 4] bytes of a little-endian uint32 -> its 32 bits [n, 32] (bit j = weight j)."""
    return ((qh[:, :, None] >> _shifts(*range(8), device=qh.device)) & 1).reshape(len(qh), 32)


def _q4_0(b):
    return BlockCodes(_nibbles(b[:, 2:18]), 32, 8, _f16(b, 0))


def _q4_1(b):
    return BlockCodes(_nibbles(b[:, 4:20]), 32, 0, _f16(b, 0), m=_f16(b, 2))


def _q5_0(b):
    return BlockCodes(_nibbles(b[:, 6:22]) | (_bits32(b[:, 2:6]) << 4), 32, 16, _f16(b, 0))


def _q5_1(b):
    return BlockCodes(_nibbles(b[:, 8:24]) | (_bits32(b[:, 4:8]) << 4), 32, 0, _f16(b, 0), m=_f16(b, 2))


def _q8_0(b):
    return BlockCodes(b[:, 2:34] ^ 0x80, 32, 128, _f16(b, 0))  # int8 x -> x + 128 as a byte


def _k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 bytes -> (sc, m) six-bit values int32 [n, 8]."""
    s = s.to(torch.int32)
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([d & 63, (md & 15) | ((d >> 2) & 48)], dim=1)
    mn = torch.cat([m & 63, (md >> 4) | ((m >> 2) & 48)], dim=1)
    return sc, mn


def _q2_k(b):
    n, dev = len(b), b.device
    scales, qs = b[:, 0:16], b[:, 16:80].reshape(n, 2, 1, 32)
    q = ((qs >> _shifts(0, 2, 4, 6, device=dev)[:, None]) & 3).reshape(n, 256)  # [half, shift, 32]
    return BlockCodes(q, 16, 0, _f16(b, 80), sub=(scales & 15).to(torch.int32), dmin=_f16(b, 82),
                      sub_min=(scales >> 4).to(torch.int32))


def _q3_k(b):
    n, dev = len(b), b.device
    hmask, qs, sc12 = b[:, 0:32], b[:, 32:96].reshape(n, 2, 1, 32), b[:, 96:108]
    low = ((qs >> _shifts(0, 2, 4, 6, device=dev)[:, None]) & 3).reshape(n, 256)
    high = ((hmask.reshape(n, 1, 32) >> _shifts(*range(8), device=dev)[:, None]) & 1).reshape(n, 256)
    lsc = (sc12[:, None, 0:8] >> _shifts(0, 4, device=dev)[:, None]).reshape(n, 16)
    hsc = (sc12[:, None, 8:12] >> _shifts(0, 2, 4, 6, device=dev)[:, None]).reshape(n, 16)
    sub = ((lsc & 15) | ((hsc & 3) << 4)).to(torch.int32) - 32
    return BlockCodes(low | (high << 2), 16, 4, _f16(b, 108), sub=sub)


def _q4_k(b):
    n, dev = len(b), b.device
    sc, mn = _k_scales(b[:, 4:16])
    qs = b[:, 16:144].reshape(n, 4, 1, 32)
    q = ((qs >> _shifts(0, 4, device=dev)[:, None]) & 15).reshape(n, 256)  # [chunk, low/high, 32]
    return BlockCodes(q, 32, 0, _f16(b, 0), sub=sc, dmin=_f16(b, 2), sub_min=mn)


def _q5_k(b):
    n, dev = len(b), b.device
    sc, mn = _k_scales(b[:, 4:16])
    qh, qs = b[:, 16:48], b[:, 48:176].reshape(n, 4, 1, 32)
    low = ((qs >> _shifts(0, 4, device=dev)[:, None]) & 15).reshape(n, 256)
    high = ((qh.reshape(n, 1, 32) >> _shifts(*range(8), device=dev)[:, None]) & 1).reshape(n, 256)
    return BlockCodes(low | (high << 4), 32, 0, _f16(b, 0), sub=sc, dmin=_f16(b, 2), sub_min=mn)


def _q6_k(b):
    n, dev = len(b), b.device
    ql = ((b[:, 0:128].reshape(n, 2, 1, 64) >> _shifts(0, 4, device=dev)[:, None]) & 15).reshape(n, 256)
    qh = ((b[:, 128:192].reshape(n, 2, 1, 32) >> _shifts(0, 2, 4, 6, device=dev)[:, None]) & 3).reshape(n, 256)
    sub = b[:, 192:208].contiguous().view(torch.int8).to(torch.int32)
    return BlockCodes(ql | (qh << 4), 16, 32, _f16(b, 208), sub=sub)


@dataclass(frozen=True)
class BlockType:
    """One GGUF block type: weights and bytes per block, its decoder, the low-bit spec its codes
    are (`exact`: without rounding any scale to fp16) and its GPU layout."""

    qtype: Q
    decode: Callable[[torch.Tensor], BlockCodes]
    spec: LowBitSpec
    exact: bool
    layout: qm.QLayout

    @property
    def block(self) -> int:
        return GGML_QUANT_SIZES[self.qtype][0]

    @property
    def type_size(self) -> int:
        return GGML_QUANT_SIZES[self.qtype][1]


BLOCK_TYPES: dict[Q, BlockType] = {bt.qtype: bt for bt in (
    BlockType(Q.Q4_0, _q4_0, LowBitSpec(4, 32), True, qm.QLayout((4,), 32, 8, "none")),
    BlockType(Q.Q4_1, _q4_1, LowBitSpec(4, 32), True, qm.QLayout((4,), 32, 0, "fp16")),
    BlockType(Q.Q5_0, _q5_0, LowBitSpec(5, 32), True, qm.QLayout((4, 1), 32, 16, "none")),
    BlockType(Q.Q5_1, _q5_1, LowBitSpec(5, 32), True, qm.QLayout((4, 1), 32, 0, "fp16")),
    BlockType(Q.Q8_0, _q8_0, LowBitSpec(8, 32), True, qm.QLayout((8,), 32, 128, "none")),
    BlockType(Q.Q2_K, _q2_k, LowBitSpec(2, 16), False, qm.QLayout((2,), 16, 0, "nibble", 256)),
    BlockType(Q.Q3_K, _q3_k, LowBitSpec(3, 16), False, qm.QLayout((2, 1), 16, 4, "none", 256)),
    BlockType(Q.Q4_K, _q4_k, LowBitSpec(4, 32), False, qm.QLayout((4,), 32, 0, "sub", 256)),
    BlockType(Q.Q5_K, _q5_k, LowBitSpec(5, 32), False, qm.QLayout((4, 1), 32, 0, "sub", 256)),
    BlockType(Q.Q6_K, _q6_k, LowBitSpec(6, 16), False, qm.QLayout((4, 2), 16, 32, "none", 256)),
)}


def fits(stored: LowBitSpec, spec: LowBitSpec) -> bool:
    """Whether codes of `stored` are, unchanged, codes of `spec`: no fewer bits, a group that
    divides the stored one, and a plain asymmetric grid (scale and min per group)."""
    return (not spec.ternary and not spec.symmetric and spec.group > 0 and spec.bits >= stored.bits
            and stored.group % spec.group == 0)


def decode(raw: torch.Tensor, qtype: Q) -> BlockCodes:
    """raw uint8 [rows, bytes per row] of `qtype` blocks -> BlockCodes of rows x blocks."""
    bt = BLOCK_TYPES[qtype]
    return bt.decode(raw.contiguous().view(-1, bt.type_size))


def native(raw: torch.Tensor, qtype: Q) -> qm.QWeight:
    """raw uint8 [rows, bytes per row] of `qtype` blocks -> the QWeight of the type's GPU layout
    (on raw's device; lossless)."""
    bt = BLOCK_TYPES[qtype]
    lay = bt.layout
    rows, k = raw.shape[0], raw.shape[1] // bt.type_size * bt.block
    bc = decode(raw, qtype)
    planes = qm.pack_codes(bc.q.reshape(rows, k), lay.planes)
    per_row = lambda t, dtype: t.reshape(rows, -1).to(dtype).contiguous()  # noqa: E731
    scales = per_row(bc.d, torch.float16)  # decoded from fp16: exact
    if not lay.super_block:
        return qm.QWeight(lay, rows, k, planes, scales, per_row(bc.m, torch.float16) if bc.m is not None else None)
    if lay.min_kind == "nibble":  # Q2_K: the file's scale bytes as they are
        sub = per_row(bc.sub | (bc.sub_min << 4), torch.uint8)
        return qm.QWeight(lay, rows, k, planes, scales, per_row(bc.dmin, torch.float16), sub)
    sub = per_row(bc.sub, torch.int8)
    if lay.min_kind == "sub":
        return qm.QWeight(lay, rows, k, planes, scales, per_row(bc.dmin, torch.float16), sub,
                          per_row(bc.sub_min, torch.uint8))
    return qm.QWeight(lay, rows, k, planes, scales, None, sub)


def convert(raw: torch.Tensor, qtype: Q, spec: LowBitSpec) -> Codes | None:
    """raw uint8 [rows, bytes per row] of `qtype` blocks -> `spec` codes (q uint8 [rows, cols],
    scale and min fp16 [rows, cols / group]), or None when the type's codes do not fit `spec`
    or a scale or min overflows fp16."""
    bt = BLOCK_TYPES.get(qtype)
    if bt is None or not fits(bt.spec, spec):
        return None
    rows = raw.shape[0]
    bc = decode(raw, qtype)
    s, m = bc.scales()
    s16 = s.half()
    m32 = (torch.zeros_like(s) if m is None else m.half().float()) - bc.zero * s16.float()
    m16 = m32.half()
    if not (torch.isfinite(s16) | ~torch.isfinite(s)).all() or not (torch.isfinite(m16) | ~torch.isfinite(m32)).all():
        return None
    rep = bt.spec.group // spec.group  # a narrower asked group: each scale repeated
    s16, m16 = s16.reshape(rows, -1), m16.reshape(rows, -1)
    if rep > 1:
        s16, m16 = s16.repeat_interleave(rep, dim=1), m16.repeat_interleave(rep, dim=1)
    return bc.q.reshape(rows, -1), s16, m16


class GGUFBlocks(PackedWeight):
    """One 2-D GGUF tensor of a block type, rows in HF order (un-permuted): raw uint8 [rows,
    bytes per row]."""

    def __init__(self, raw: np.ndarray | torch.Tensor, qtype: Q, origin: str):
        bt = BLOCK_TYPES[qtype]
        if not isinstance(raw, torch.Tensor):
            with warnings.catch_warnings():  # a read-only memory map: nothing here ever writes to it
                warnings.simplefilter("ignore", UserWarning)
                raw = torch.from_numpy(np.ascontiguousarray(raw))
        self.raw = raw
        self.qtype, self.origin = qtype, origin
        self.shape = (self.raw.shape[0], self.raw.shape[1] // bt.type_size * bt.block)

    @property
    def block_type(self) -> BlockType:
        return BLOCK_TYPES[self.qtype]

    def codes(self, spec: LowBitSpec) -> Codes | None:
        return convert(self.raw, self.qtype, spec)

    def dequantize(self, cols: int) -> torch.Tensor:
        if cols != self.shape[1]:
            raise ValueError(f"holds {self.shape[1]} columns, expected {cols}")
        return decode(self.raw, self.qtype).dequantize().reshape(self.shape)
