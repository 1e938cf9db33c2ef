"""Unquantized weights in the compute dtype; the matmul goes to PyTorch (cuBLAS / MKL)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bitfold.weights.base import WEIGHT_FORMATS, WeightFormat


@WEIGHT_FORMATS.register("dense", "auto")
class DenseFormat(WeightFormat):
    name = "dense"

    def create_weights(self, layer, in_features, out_features, dtype):
        layer.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)

    def load(self, layer, weight, row_offset):
        rows = weight.shape[0]
        if row_offset + rows > layer.weight.shape[0] or weight.shape[1] != layer.weight.shape[1]:
            raise ValueError(
                f"weight of shape {tuple(weight.shape)} does not fit rows [{row_offset}, {row_offset + rows}) "
                f"of a layer of shape {tuple(layer.weight.shape)}"
            )
        layer.weight.data[row_offset : row_offset + rows].copy_(weight)

    def apply(self, layer, x):
        return F.linear(x, layer.weight)
