"""RMSNorm as a module; the math lives in kernels/rms_norm.py (Triton on GPU) and
kernels/cpu_ops.py (C++ for CPU float32), the reference elsewhere (kernels/ops.py picks)."""
from __future__ import annotations

import torch
from torch import nn

from bitfold.kernels.ops import fused_add_rms_norm_op, rms_norm_op


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """x: [T, dim]. With `residual`, returns (norm(x + residual), x + residual)."""
        if residual is None:
            return rms_norm_op(x, self.weight, self.eps)
        return fused_add_rms_norm_op(x, residual, self.weight, self.eps)
