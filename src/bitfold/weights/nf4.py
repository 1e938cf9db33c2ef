"""NF4: 4-bit codes into a codebook of 16 normal-distribution quantiles (QLoRA, Dettmers et al.,
arXiv 2305.14314) with one absmax scale per group: w ~= absmax(group) * NF4[code]. Its levels sit
where a Gaussian weight's values are dense, instead of int4's even grid; the kernels read any
16-value codebook (`kernels/codebook.py`: a lookup per code, FLUTE's idea), on both devices.

`nf4` = `nf4-g64` (QLoRA's block size); `nf4-g32`, `nf4-g128`. Storage, the same on both
devices: `cb4_codes` int32 [out, in_padded / 8], `cb4_scales` fp16 [out, in_padded / group],
`cb4_codebook` float32 [16] (a buffer, so a fitted codebook could replace NF4's per layer).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bitfold.kernels import codebook as cb
from bitfold.kernels import cpu_lib
from bitfold.weights.base import WEIGHT_FORMATS, WeightFormat

# QLoRA's NF4 values (bitsandbytes' table): the 8 positive and 7 negative quantiles of N(0, 1)
# scaled to [-1, 1], with an exact zero.
NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
       0.7229568362236023, 1.0)
CHUNK_ROWS = 4096  # rows quantized at once (bounds the temporaries)


def quantize_cb4(w: torch.Tensor, group: int, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w float [N, KP] (KP a multiple of group) -> (codes uint8 [N, KP], scales fp16 [N, KP / group]):
    per group the absmax scale (rounded to fp16 first, so the codes fit the scale that is stored)
    and each weight's nearest codebook value of w / scale (codebook sorted ascending)."""
    n, kp = w.shape
    mids = ((codebook[1:] + codebook[:-1]) / 2).to(w.device, torch.float32)
    codes = torch.empty(n, kp, dtype=torch.uint8, device=w.device)
    scales = torch.empty(n, kp // group, dtype=torch.float16, device=w.device)
    for r in range(0, n, CHUNK_ROWS):
        g = w[r:r + CHUNK_ROWS].float().view(-1, kp // group, group)
        s = g.abs().amax(-1).half()
        inv = torch.where(s > 0, 1.0 / s.float(), torch.zeros_like(s, dtype=torch.float32))
        codes[r:r + CHUNK_ROWS] = torch.bucketize((g * inv[..., None]).clamp(-1, 1), mids).view(-1, kp).to(torch.uint8)
        scales[r:r + CHUNK_ROWS] = s
    return codes, scales


class CodebookFormat(WeightFormat):
    """A registered 4-bit codebook format; subclasses fix `group` and `values` (see `_register`)."""

    group: int
    values: tuple[float, ...]
    devices = ("cpu", "cuda")
    rounded = True  # its codes are always rounded here (a stored-quantized weight is dequantized first)

    def create_weights(self, layer, in_features, out_features, dtype):
        layer.in_padded = -(-in_features // self.group) * self.group
        self._device = torch.empty(0).device  # the model is built under its device's context
        self._gpu = self.gpu_storage(self._device)
        self._out = out_features
        self._rows_in = torch.zeros(out_features, dtype=torch.bool)
        layer.register_buffer("cb4_codes", torch.zeros(out_features, layer.in_padded // 8, dtype=torch.int32))
        layer.register_buffer("cb4_scales", torch.zeros(out_features, layer.in_padded // self.group, dtype=torch.float16))
        layer.register_buffer("cb4_codebook", torch.tensor(self.values, dtype=torch.float32))
        layer.register_buffer("cb4_pairs", cb.pair_table(layer.cb4_codebook))  # the GPU kernels' lookup table

    def load(self, layer, weight, row_offset):
        rows, cols = weight.shape
        if cols != layer.in_features or row_offset + rows > self._out:
            raise ValueError(f"weight of shape {tuple(weight.shape)} does not fit rows [{row_offset}, "
                             f"{row_offset + rows}) of a layer of shape ({self._out}, {layer.in_features})")
        w = F.pad(weight.to(layer.cb4_codes.device, torch.float32), (0, layer.in_padded - cols))
        codes, scales = quantize_cb4(w, self.group, layer.cb4_codebook)
        layer.cb4_codes[row_offset:row_offset + rows] = cb.pack_cb4(codes)
        layer.cb4_scales[row_offset:row_offset + rows] = scales
        self._rows_in[row_offset:row_offset + rows] = True

    def process_after_loading(self, layer):
        if not bool(self._rows_in.all()):
            raise ValueError(f"{int((~self._rows_in).sum())} of {self._out} rows of a {self.name} layer were never loaded")

    def dequantize(self, layer) -> torch.Tensor:
        """float32 [out, in_features] (tests, `--weights dense` comparisons)."""
        return cb.dequantize_ref(layer.cb4_codes, layer.cb4_scales, layer.cb4_codebook, self.group)[:, :layer.in_features]

    def can_gather(self, layer) -> bool:
        """`rows` works once every row is in (the storage is the same on both devices)."""
        return bool(self._rows_in.all())

    def rows(self, layer, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` (int64 [T], repeats allowed) of `dequantize(layer)`, exactly: float32
        [T, in_features], from those rows' code words and scales only."""
        return cb.dequantize_ref(layer.cb4_codes[ids], layer.cb4_scales[ids], layer.cb4_codebook,
                                 self.group)[:, :layer.in_features]

    def apply(self, layer, x):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self._gpu:
            y = cb.cb4_matmul(x2 if x2.stride(-1) == 1 else x2.contiguous(), layer.cb4_codes, layer.cb4_scales,
                              layer.cb4_codebook, self.group, pairs=layer.cb4_pairs)
        elif cpu_lib.available():
            y = cb.cb4_gemm_cpu(x2, layer.cb4_codes, layer.cb4_scales, layer.cb4_codebook, self.group)
        else:  # no compiler: correct but slow
            y = cb.cb4_matmul_ref(x2.float(), layer.cb4_codes, layer.cb4_scales, layer.cb4_codebook, self.group)
        return y.to(x.dtype).view(*shape[:-1], self._out)


def _register(group: int, *aliases: str) -> None:
    name = f"nf4-g{group}"
    cls = type(f"NF4_g{group}", (CodebookFormat,), {"name": name, "group": group, "values": NF4})
    WEIGHT_FORMATS.register(name, *aliases)(cls)


for _g in (32, 64, 128):
    _register(_g, *(["nf4"] if _g == 64 else []))
