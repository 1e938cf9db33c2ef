"""`gguf`: a GGUF model's linear layers kept in the block types the file stores them in, what
`--weights auto` picks for a GGUF whose linear tensors are block-quantized.

One layer's shards may come in different types (a Q4_K_M file keeps attn_v and some ffn_down in
Q6_K beside Q4_K q and k, and a merged q|k|v layer holds all three), so the layer gathers its
shards and decides once every row is in (`process_after_loading`), then hands itself to that
format (`layer.fmt` is replaced, so the fused CPU step, `bitfold quantize` and the tests see an
ordinary layer of it):

- on the CPU, the low-bit LUT format all its shards' codes fit without rounding (the most bits
  and the narrowest group among them, `gguf_blocks.fits`): Q4_0/Q4_1 -> int4-g32 exactly,
  Q8_0 -> int8-g32 (two LUT passes), Q4_K + Q6_K -> int6-g16 (the K-quants' d*sc products
  rounded to fp16, see gguf_blocks.py);
- a shard stored as floats (F16/F32 tensors) makes the layer dense, and so does a GPU for now.
"""
from __future__ import annotations

import torch

from bitfold.weights.base import WEIGHT_FORMATS, WeightFormat
from bitfold.weights.lowbit import LowBitSpec
from bitfold.weights.packed import PackedWeight


def cpu_format(parts: list) -> str:
    """The format a CPU layer of these shards (floats or GGUFBlocks) takes."""
    specs = [getattr(getattr(p, "block_type", None), "spec", None) for p in parts]
    if not specs or any(s is None for s in specs):
        return "dense"
    return LowBitSpec(max(s.bits for s in specs), min(s.group for s in specs)).name


@WEIGHT_FORMATS.register("gguf")
class GGUFFormat(WeightFormat):
    name = "gguf"
    devices = ("cpu", "cuda")

    def create_weights(self, layer, in_features, out_features, dtype):
        self._args = (in_features, out_features, dtype)
        self._device = torch.empty(0).device  # the model is built under its device's context
        self._parts: list[tuple[int, torch.Tensor | PackedWeight]] = []
        self._rows_in = torch.zeros(out_features, dtype=torch.bool)

    def _stage(self, layer, weight, row_offset: int) -> None:
        rows, cols = weight.shape
        in_features, out_features, _ = self._args
        if cols != in_features or row_offset + rows > out_features:
            raise ValueError(f"weight of shape {tuple(weight.shape)} does not fit rows [{row_offset}, "
                             f"{row_offset + rows}) of a layer of shape ({out_features}, {in_features})")
        self._parts.append((row_offset, weight))
        self._rows_in[row_offset : row_offset + rows] = True

    def load(self, layer, weight, row_offset):
        self._stage(layer, weight, row_offset)

    def load_packed(self, layer, packed, row_offset):
        self._stage(layer, packed, row_offset)

    def target(self) -> str:
        """The format this layer becomes, from its shards and device."""
        if self._device.type != "cpu":
            return "dense"
        return cpu_format([p for _, p in self._parts])

    def process_after_loading(self, layer):
        if not bool(self._rows_in.all()):
            missing = int((~self._rows_in).sum())
            raise ValueError(f"{missing} of {self._args[1]} rows of a GGUF layer were never loaded")
        fmt = WEIGHT_FORMATS.get(self.target())()
        with torch.device(self._device):
            fmt.create_weights(layer, *self._args)
        for off, part in self._parts:
            if isinstance(part, PackedWeight):
                fmt.load_packed(layer, part, off)
            else:
                fmt.load(layer, part, off)
        fmt.process_after_loading(layer)
        self._parts = []
        layer.fmt = fmt

    def apply(self, layer, x):
        raise RuntimeError("a GGUF layer runs once its weights are loaded (process_after_loading)")
