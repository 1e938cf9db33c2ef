"""Checkpoint weights that arrive still quantized: a loader yields a `PackedWeight` in place of
a float tensor, and the layer that takes it decides. A low-bit layer of exactly the stored
format takes the codes as they are (no float round trip, no re-rounding); any other layer
asks for floats.

Two kinds exist: `BitfoldCodes` (the checkpoints `bitfold quantize` writes) and GGUF blocks
(`loader/gguf_blocks.py`: Q4_0 / Q4_1 / Q4_K / Q2_K convert to int4-g32 / int2-g16 codes).
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from bitfold.weights.lowbit import LowBitSpec, dequantize, unpack_bitplanes

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
    (see `lowbit.pack_bitplanes`), scales and mins fp16 [rows, K / group]. The loader checks
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
        g = self.spec.group
        if -(-cols // g) * g != self.shape[1]:
            raise ValueError(f"stored with {self.shape[1]} columns, but {cols} inputs pad to "
                             f"{-(-cols // g) * g} in groups of {g}")
        q = unpack_bitplanes(self.planes)
        return dequantize(q, self.scales, self.mins, g)[:, :cols]


def as_float(weight: torch.Tensor | PackedWeight, cols: int) -> torch.Tensor:
    """A float tensor of a checkpoint weight, whatever form it came in."""
    return weight.dequantize(cols) if isinstance(weight, PackedWeight) else weight
