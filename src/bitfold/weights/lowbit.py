"""Group-wise 1-4-bit weights multiplied by lookup tables on the CPU (T-MAC, arXiv 2407.00088).

w[n, k] ~= scale[n, g] * q[n, k] + min[n, g], q in [0, 2^bits), g = k // group; scale and min
are fp16. Registered names: int1/int2/int3/int4 and ternary, each with -g16/-g32/-g64/-g128
(the bare name means -g64). At 64 weights per group the scale+min cost 0.5 bit per weight:
int4-g64 is 4.5 bits/weight like llama.cpp's Q4_0, int2-g64 2.5 like Q2_K's 2.625.

Quantization belongs to the layer: `load` quantizes each checkpoint shard as it arrives (round
to nearest, `quantize_rtn`), `load_codes` takes already-quantized codes (bitfold quantize's
checkpoints, converted GGUF blocks), and once every row is in the codes are packed into the
kernel's bit-plane layout (`bitfold.kernels.lut_gemm.pack_lut`). Only the packed form is kept.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from bitfold.kernels import lut_gemm as lut
from bitfold.weights.base import WEIGHT_FORMATS, WeightFormat

log = logging.getLogger("bitfold")

GROUPS = (16, 32, 64, 128)
DEFAULT_GROUP = 64


@dataclass(frozen=True)
class LowBitSpec:
    bits: int  # bit planes stored (ternary: 2)
    group: int
    ternary: bool = False  # q in {0, 1, 2} meaning {-1, 0, +1} * scale

    @property
    def name(self) -> str:
        return f"{'ternary' if self.ternary else f'int{self.bits}'}-g{self.group}"

    @property
    def bits_per_weight(self) -> float:
        return self.bits + 32 / self.group  # + fp16 scale and min per group


def quantize_rtn(w: torch.Tensor, spec: LowBitSpec):
    """Round-to-nearest group quantization.

    w: float [N, K] with K a multiple of spec.group -> (q uint8 [N, K], scale fp16 [N, G],
    min fp16 [N, G]), G = K // group. Asymmetric min/max per group (int2-4); int1 splits each
    group at its mean into the means of the two halves; ternary uses BitNet b1.58's absmean
    scale. q is computed against the fp16-rounded scale and min, so dequantization is exact to
    what is stored.
    """
    N, K = w.shape
    g = w.float().view(N, K // spec.group, spec.group)
    if spec.ternary:
        s = g.abs().mean(-1).clamp_min(1e-8).half()
        m = -s
    elif spec.bits == 1:
        mean = g.mean(-1, keepdim=True)
        hi = g >= mean
        lo_mean = (g * ~hi).sum(-1) / (~hi).sum(-1).clamp_min(1)
        hi_mean = (g * hi).sum(-1) / hi.sum(-1).clamp_min(1)
        m = lo_mean.half()
        s = (hi_mean - lo_mean).clamp_min(1e-8).half()
    else:
        lo, hi = g.amin(-1), g.amax(-1)
        m = lo.half()
        s = ((hi - lo) / (2**spec.bits - 1)).clamp_min(1e-8).half()
    levels = 2 if spec.ternary else 2**spec.bits - 1
    q = ((g - m.float()[..., None]) / s.float()[..., None]).round().clamp(0, levels).to(torch.uint8)
    return q.view(N, K), s, m


def dequantize(q: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor, group: int) -> torch.Tensor:
    """q uint8 [N, K], scale/min [N, K // group] -> float32 [N, K]."""
    N, K = q.shape
    return (q.float().view(N, K // group, group) * scale.float()[..., None] + mins.float()[..., None]).view(N, K)


class LowBitFormat(WeightFormat):
    """A registered low-bit format; subclasses fix `spec` (see `_register`)."""

    spec: LowBitSpec
    devices = ("cpu",)

    def create_weights(self, layer, in_features, out_features, dtype):
        group = self.spec.group
        layer.in_padded = -(-in_features // group) * group  # K padded to whole groups (zeros)
        layer.lowbit_spec = self.spec
        self._staged: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._rows_in = torch.zeros(out_features, dtype=torch.bool)
        self._out = out_features
        self._kernel = None  # the ctypes function, resolved at first use
        layer.register_buffer("lut_packed", torch.empty(0, dtype=torch.uint8))
        layer.register_buffer("lut_scales", torch.empty(0, dtype=torch.float16))
        layer.register_buffer("lut_mins", torch.empty(0, dtype=torch.float16))

    def load(self, layer, weight, row_offset):
        self._check_rows(layer, weight.shape, row_offset)
        w = F.pad(weight.float(), (0, layer.in_padded - weight.shape[1]))
        self.load_codes(layer, *quantize_rtn(w, self.spec), row_offset)

    def load_codes(self, layer, q: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor, row_offset: int) -> None:
        """Take quantized rows: q uint8 [rows, in_padded], scale/mins [rows, in_padded // group]."""
        rows = q.shape[0]
        groups = layer.in_padded // self.spec.group
        if q.shape != (rows, layer.in_padded) or scale.shape != (rows, groups) or mins.shape != (rows, groups):
            raise ValueError(f"quantized rows q{tuple(q.shape)} scale{tuple(scale.shape)} do not fit a "
                             f"{self.spec.name} layer with {layer.in_padded} padded inputs")
        if q.numel() and int(q.max()) >= 2**self.spec.bits:
            raise ValueError(f"codes exceed {self.spec.bits} bits")
        if row_offset + rows > self._out:
            raise ValueError(f"rows [{row_offset}, {row_offset + rows}) exceed the layer's {self._out}")
        if self._staged is None:
            self._staged = (torch.zeros(self._out, layer.in_padded, dtype=torch.uint8),
                            torch.zeros(self._out, groups, dtype=torch.float16),
                            torch.zeros(self._out, groups, dtype=torch.float16))
        sq, ss, sm = self._staged
        sq[row_offset : row_offset + rows] = q
        ss[row_offset : row_offset + rows] = scale.half()
        sm[row_offset : row_offset + rows] = mins.half()
        self._rows_in[row_offset : row_offset + rows] = True
        if bool(self._rows_in.all()):
            self._pack(layer)  # every shard is in: keep only the packed form

    def _pack(self, layer) -> None:
        q, s, m = self._staged
        layer.lut_packed, layer.lut_scales, layer.lut_mins = lut.pack_lut(q, s, m, self.spec.bits, self.spec.group)
        self._staged = None

    def _check_rows(self, layer, shape, row_offset) -> None:
        rows, cols = shape
        if cols != layer.in_features or row_offset + rows > self._out:
            raise ValueError(f"weight of shape {tuple(shape)} does not fit rows [{row_offset}, {row_offset + rows}) "
                             f"of a layer of shape ({self._out}, {layer.in_features})")

    def process_after_loading(self, layer):
        if layer.lut_packed.numel() == 0:
            missing = int((~self._rows_in).sum())
            raise ValueError(f"{missing} of {self._out} rows of a {self.spec.name} layer were never loaded")

    def codes(self, layer):
        """(q uint8 [out, in_padded], scale fp16, min fp16) of the packed weight (for saving)."""
        return lut.unpack_lut(layer.lut_packed, layer.lut_scales, layer.lut_mins, self._out, self.spec.bits,
                              self.spec.group)

    def apply(self, layer, x):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.dtype != torch.float32 or not x2.is_contiguous():
            x2 = x2.float().contiguous()
        if layer.in_padded != shape[-1]:
            x2 = F.pad(x2, (0, layer.in_padded - shape[-1]))
        if self._kernel is None:
            self._kernel = lut.load_cpu_library().bitfold_lut_gemm if lut.available() else False
        if self._kernel:
            # The hot path of a CPU decode step (every linear layer): shapes were checked when
            # the weight was packed, so straight to the kernel.
            y = torch.empty(x2.shape[0], self._out)
            self._kernel(x2.data_ptr(), x2.shape[0], layer.in_padded, layer.lut_packed.data_ptr(),
                         layer.lut_scales.data_ptr(), layer.lut_mins.data_ptr(), self._out, self.spec.bits,
                         self.spec.group, y.data_ptr(), torch.get_num_threads(), -1)
        else:  # no compiler: correct but slow (dequantize every call); said once
            if not getattr(LowBitFormat, "_warned", False):
                log.warning("LUT kernel unavailable; low-bit layers dequantize on every call")
                LowBitFormat._warned = True
            w = lut.dequantize_ref(layer.lut_packed, layer.lut_scales, layer.lut_mins, self._out, self.spec.bits,
                                   self.spec.group)
            y = x2 @ w.t()
        return y.to(x.dtype).view(*shape[:-1], self._out)


def _register(spec: LowBitSpec, *aliases: str) -> None:
    # Below 4 bits the output projection stays at 4 bits (llama.cpp's Q2_K/Q3_K keep it at Q6_K):
    # logits are where 2-bit rounding hurts most, and it is one matrix of many.
    head = None if spec.bits == 4 and not spec.ternary else f"int4-g{spec.group}"
    cls = type(f"LowBit_{spec.name.replace('-', '_')}", (LowBitFormat,),
               {"spec": spec, "name": spec.name, "lm_head_format": head})
    WEIGHT_FORMATS.register(spec.name, *aliases)(cls)


for _g in GROUPS:
    for _bits in (1, 2, 3, 4):
        _spec = LowBitSpec(_bits, _g)
        _register(_spec, *([f"int{_bits}"] if _g == DEFAULT_GROUP else []))
    _register(LowBitSpec(2, _g, ternary=True), *(["ternary"] if _g == DEFAULT_GROUP else []))


def lowbit_spec(name: str) -> LowBitSpec | None:
    """The spec of a registered low-bit format name (aliases too), or None for other formats."""
    cls = WEIGHT_FORMATS.get(name)
    return getattr(cls, "spec", None)


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
