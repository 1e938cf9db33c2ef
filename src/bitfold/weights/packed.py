"""Checkpoint weights that arrive still quantized: a loader yields a `PackedWeight` in place of
a float tensor, and the layer that takes it decides. A low-bit layer of exactly the stored
format takes the codes as they are (no float round trip, no re-rounding); any other layer
asks for floats.

Two kinds exist: `BitfoldCodes` (the checkpoints `bitfold quantize` writes, in the bit-plane
layout of `pack_bitplanes`) and GGUF blocks (`weights/gguf_blocks.py`). They live beside the
formats, not in loader/, so that loading a weight never reaches back from a layer to a loader.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch

from bitfold.weights.lowbit import LowBitSpec, dequantize

Codes = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # q uint8 [rows, K], scale fp16 [rows, G], min fp16 [rows, G]


class PackedWeight(ABC):
    """A weight [rows, cols] in a stored quantized form.

    `shape` is (rows, stored columns): the logical columns, or for bitfold checkpoints the
    columns padded to whole groups. `origin` names the file and tensor, for error messages.
    """

    shape: tuple[int, int]
    origin: str

    @abstractmethod
    def codes(self, spec: LowBitSpec) -> Codes | None:
        """The weight as `spec` codes with K = shape[1], if it is stored in a form that converts
        to `spec` without dequantizing; None otherwise (the caller then asks for floats)."""

    @abstractmethod
    def dequantize(self, cols: int) -> torch.Tensor:
        """float32 [rows, cols]; ValueError when `cols` does not fit the stored columns."""


class BitfoldCodes(PackedWeight):
    """One linear weight of a `bitfold quantize` checkpoint: planes uint8 [bits, rows, K / 8]
    (see `pack_bitplanes`), scales and mins fp16 [rows, K / group]. The loader checks
    the shapes against each other before building one."""

    def __init__(self, spec: LowBitSpec, planes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, origin: str):
        self.spec, self.planes, self.scales, self.mins, self.origin = spec, planes, scales, mins, origin
        self.shape = (planes.shape[1], planes.shape[2] * 8)

    def codes(self, spec: LowBitSpec) -> Codes | None:
        if spec != self.spec:
            return None
        q = unpack_bitplanes(self.planes)
        if self.spec.ternary and q.numel() and int(q.max()) > 2:
            raise ValueError(f"ternary codes must be 0, 1 or 2, found {int(q.max())}")
        return q, self.scales, self.mins

    def dequantize(self, cols: int) -> torch.Tensor:
        if self.spec.padded(cols) != self.shape[1]:
            raise ValueError(f"stored with {self.shape[1]} columns, but {cols} inputs pad to "
                             f"{self.spec.padded(cols)} for {self.spec.name}")
        q = unpack_bitplanes(self.planes)
        return dequantize(q, self.scales, self.mins, self.spec.group_size(self.shape[1]))[:, :cols]


def as_float(weight: torch.Tensor | PackedWeight, cols: int) -> torch.Tensor:
    """A float tensor of a checkpoint weight, whatever form it came in."""
    return weight.dequantize(cols) if isinstance(weight, PackedWeight) else weight


# ---- checkpoint layout (bitfold quantize) ------------------------------------------------------

def pack_bitplanes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes as bit planes, the checkpoint layout of `bitfold quantize`.

    q: uint8 [N, K] codes < 2^bits, K a multiple of 8 -> uint8 [bits, N, K // 8]: plane p holds
    bit p of every code; code k of a row is bit k % 8 of byte k // 8 (little-endian bit order,
    numpy's `packbits(bitorder="little")`).
    """
    N, K = q.shape
    if K % 8:
        raise ValueError(f"{K} codes per row do not fill whole bytes")
    qn = q.to(torch.uint8).contiguous().numpy()
    # numpy's packbits is one C loop; the same in uint8 torch ops is ~20x slower on the CPU
    return torch.from_numpy(np.stack([np.packbits((qn >> p) & 1, axis=1, bitorder="little") for p in range(bits)]))


def unpack_bitplanes(planes: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_bitplanes`: uint8 [bits, N, K // 8] -> codes uint8 [N, K]."""
    pn = planes.contiguous().numpy()
    q = np.zeros((pn.shape[1], pn.shape[2] * 8), dtype=np.uint8)
    for p in range(pn.shape[0]):
        q |= np.unpackbits(pn[p], axis=1, bitorder="little") << np.uint8(p)
    return torch.from_numpy(q)
