"""GGUF block types that line up with bitfold's low-bit formats: their codes are taken as they
are (no dequantize + round to nearest) when a layer asks for exactly that format.

    Q4_0 -> int4-g32   scale d, min -8d                          exact
    Q4_1 -> int4-g32   scale d, min m                            exact
    Q4_K -> int4-g32   scale d*sc, min -dmin*m (products in fp16) exact up to fp16 rounding
    Q2_K -> int2-g16   scale d*sc, min -dmin*m (products in fp16) exact up to fp16 rounding

Byte layouts (ggml-common.h; fp16 little-endian; the tests check every one against the `gguf`
package's dequantizers):
    Q4_0  18 B / 32 weights: d, qs[16]; weight j = qs[j] & 15, weight 16+j = qs[j] >> 4; w = d*(q-8)
    Q4_1  20 B / 32 weights: d, m, qs[16] as Q4_0; w = d*q + m
    Q4_K 144 B / 256 weights: d, dmin, scales[12] (8 six-bit scales sc and mins m, packed), qs[128];
          sub-block 2c (32 weights) is the low nibbles of qs[32c:32c+32], 2c+1 the high ones;
          w = d*sc*q - dmin*m
    Q2_K  84 B / 256 weights: scales[16] (sc low nibble, m high nibble, per 16 weights), qs[64],
          d, dmin; weight 128h + 32s + j = (qs[32h+j] >> 2s) & 3; w = d*sc*q - dmin*m
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

from bitfold.weights.lowbit import LowBitSpec
from bitfold.weights.packed import Codes, PackedWeight


def _f16(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The fp16 at byte `offset` of every block, as float32 [n]."""
    return np.ascontiguousarray(blocks[:, offset:offset + 2]).view(np.float16)[:, 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[n, 16] bytes -> [n, 32] codes: low nibbles first, then high (Q4_0/Q4_1's order)."""
    return np.concatenate([qs & 15, qs >> 4], axis=1)


def q4_0(blocks: np.ndarray):
    d = _f16(blocks, 0)
    return _nibbles(blocks[:, 2:18]), d[:, None], -8 * d[:, None]  # x8 is exact in fp16


def q4_1(blocks: np.ndarray):
    return _nibbles(blocks[:, 4:20]), _f16(blocks, 0)[:, None], _f16(blocks, 2)[:, None]


def q4_k(blocks: np.ndarray):
    n = len(blocks)
    d, dmin, s = _f16(blocks, 0), _f16(blocks, 2), blocks[:, 4:16].astype(np.uint8)
    sc = np.empty((n, 8), np.uint8)
    m = np.empty((n, 8), np.uint8)
    sc[:, :4], m[:, :4] = s[:, 0:4] & 63, s[:, 4:8] & 63
    sc[:, 4:] = (s[:, 8:12] & 15) | ((s[:, 0:4] >> 6) << 4)
    m[:, 4:] = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    qs = blocks[:, 16:144].reshape(n, 4, 32)
    q = np.stack([qs & 15, qs >> 4], axis=2).reshape(n, 256)  # [chunk, low/high, 32]
    return q, d[:, None] * sc, -(dmin[:, None] * m)


def q2_k(blocks: np.ndarray):
    n = len(blocks)
    scales, qs = blocks[:, 0:16], blocks[:, 16:80].reshape(n, 2, 1, 32)
    d, dmin = _f16(blocks, 80), _f16(blocks, 82)
    q = ((qs >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & 3).reshape(n, 256)  # [half, shift, 32]
    return q, d[:, None] * (scales & 15), -(dmin[:, None] * (scales >> 4))


# (GGUF type, low-bit spec) -> a function of blocks uint8 [n, type_size] giving (codes [n, block],
# scale and min [n, groups per block]) in float32.
CONVERSIONS: dict[tuple[Q, LowBitSpec], Callable] = {
    (Q.Q4_0, LowBitSpec(4, 32)): q4_0, (Q.Q4_1, LowBitSpec(4, 32)): q4_1,
    (Q.Q4_K, LowBitSpec(4, 32)): q4_k, (Q.Q2_K, LowBitSpec(2, 16)): q2_k,
}
BLOCK_TYPES = frozenset(t for t, _ in CONVERSIONS)


def convert(raw: np.ndarray, qtype: Q, spec: LowBitSpec) -> Codes | None:
    """raw uint8 [rows, bytes per row] of `qtype` blocks -> `spec` codes (q uint8 [rows, cols],
    scale and min fp16 [rows, cols / group]), or None when the pair does not convert or a
    scale or min overflows fp16."""
    fn = CONVERSIONS.get((qtype, spec))
    if fn is None:
        return None
    block, size = GGML_QUANT_SIZES[qtype]
    rows = raw.shape[0]
    q, scale, mins = fn(np.ascontiguousarray(raw).reshape(-1, size))
    with np.errstate(over="ignore"):  # checked just below
        scale16, mins16 = scale.astype(np.float16), mins.astype(np.float16)
    if not (np.isfinite(scale16) | ~np.isfinite(scale)).all() or not (np.isfinite(mins16) | ~np.isfinite(mins)).all():
        return None
    cols = raw.shape[1] // size * block
    return (torch.from_numpy(np.ascontiguousarray(q, dtype=np.uint8).reshape(rows, cols)),
            torch.from_numpy(scale16.reshape(rows, -1)), torch.from_numpy(mins16.reshape(rows, -1)))


class GGUFBlocks(PackedWeight):
    """One 2-D GGUF tensor of a convertible block type, rows in HF order (un-permuted)."""

    def __init__(self, raw: np.ndarray, qtype: Q, origin: str):
        block, size = GGML_QUANT_SIZES[qtype]
        self.raw, self.qtype, self.origin = raw, qtype, origin
        self.shape = (raw.shape[0], raw.shape[1] // size * block)

    def codes(self, spec: LowBitSpec) -> Codes | None:
        return convert(self.raw, self.qtype, spec)

    def dequantize(self, cols: int) -> torch.Tensor:
        from gguf import quants

        if cols != self.shape[1]:
            raise ValueError(f"holds {self.shape[1]} columns, expected {cols}")
        w = quants.dequantize(self.raw, self.qtype).reshape(self.shape)
        return torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))
