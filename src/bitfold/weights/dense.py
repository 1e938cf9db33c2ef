"""Unquantized weights in the compute dtype. On a GPU, a few rows of activations (decode at
small batch) go through the Triton skinny matmul `kernels/gemv.py`, which streams the weight
closer to the copy bandwidth than cuBLAS's small-M tiles; everything else goes to PyTorch
(cuBLAS / MKL)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bitfold.kernels._triton import HAS_TRITON
from bitfold.kernels.gemv import gemv
from bitfold.weights.base import WEIGHT_FORMATS, WeightFormat

GEMV_MAX_ROWS = 16
"""Activation rows up to which CUDA matmuls use the Triton GEMV (0 = always cuBLAS; the
benchmarks set it to compare the two)."""


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
        return matmul(x, layer.weight)


def matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ w[N, K].T: the Triton skinny matmul for a few 16-bit rows on CUDA, else PyTorch."""
    if (x.is_cuda and HAS_TRITON and x.dim() == 2 and x.shape[0] <= GEMV_MAX_ROWS
            and w.dtype in (torch.bfloat16, torch.float16) and x.dtype == w.dtype and x.stride(1) == 1):
        return gemv(x, w)
    return F.linear(x, w)
