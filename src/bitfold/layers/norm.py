"""RMSNorm as a module; the math lives in kernels/rms_norm.py (Triton on GPU) and
kernels/cpu_ops.py (C++ for CPU float32), the reference elsewhere."""
from __future__ import annotations

import torch
from torch import nn

from bitfold.kernels import cpu_ops
from bitfold.kernels.rms_norm import fused_add_rms_norm, fused_add_rms_norm_ref, rms_norm, rms_norm_ref


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """x: [T, dim]. With `residual`, returns (norm(x + residual), x + residual)."""
        if not x.is_cuda and cpu_ops.usable(x, self.weight):  # C++ on CPU float32 (one call)
            return cpu_ops.add_rms_norm(x, residual, self.weight, self.eps)
        if residual is None:
            return (rms_norm if x.is_cuda else rms_norm_ref)(x, self.weight, self.eps)
        return (fused_add_rms_norm if x.is_cuda else fused_add_rms_norm_ref)(x, residual, self.weight, self.eps)
