"""Which kernel family runs a layer's small operations, as one table.

Every op has up to three implementations of one signature (the reference's): Triton on CUDA
tensors, the C++ CPU kernels (`cpu_ops.py`) on CPU float32 tensors, and the pure-PyTorch `*_ref`
anywhere. `OPS` lists them per op, in preference order, each with the family whose condition it
needs (`FAMILIES`); `pick` takes the first that can run on the op's first tensor argument and
remembers the choice per (op, device type, dtype). Layers call the functions at the bottom, so
adding a kernel family (or an op) is a column (a row) of this table, not another `if` in a layer.

Paged attention is not here: which kernels read a KV cache's pages is the codec's side of the
attention seam (`KVCodec.ops(backend)`), chosen once per runner.
"""
from __future__ import annotations

from typing import Callable

import torch

from bitfold.kernels import cpu_ops
from bitfold.kernels._triton import HAS_TRITON
from bitfold.kernels.rms_norm import fused_add_rms_norm, fused_add_rms_norm_ref, rms_norm, rms_norm_ref
from bitfold.kernels.rotary import rotary, rotary_ref
from bitfold.kernels.silu_mul import silu_and_mul, silu_and_mul_ref

# family -> can it run on (device type, dtype)
FAMILIES: dict[str, Callable[[str, torch.dtype], bool]] = {
    "triton": lambda dev, dtype: dev == "cuda" and HAS_TRITON,
    "cpu": lambda dev, dtype: dev == "cpu" and dtype == torch.float32 and cpu_ops.available(),
    "ref": lambda dev, dtype: True,
}

# op -> ((family, implementation), ...) in preference order; every implementation has the
# signature of the reference (the last entry).
OPS: dict[str, tuple[tuple[str, Callable], ...]] = {
    "rms_norm": (("triton", rms_norm), ("cpu", cpu_ops.rms_norm), ("ref", rms_norm_ref)),
    "fused_add_rms_norm": (("triton", fused_add_rms_norm), ("cpu", cpu_ops.fused_add_rms_norm),
                           ("ref", fused_add_rms_norm_ref)),
    "rotary": (("triton", rotary), ("cpu", cpu_ops.rotary), ("ref", rotary_ref)),
    "silu_and_mul": (("triton", silu_and_mul), ("cpu", cpu_ops.silu_mul), ("ref", silu_and_mul_ref)),
}

_CHOSEN: dict[tuple[str, str, torch.dtype], Callable] = {}


def pick(op: str, x: torch.Tensor) -> Callable:
    """The implementation of `op` for tensors like `x` (its first tensor argument)."""
    key = (op, x.device.type, x.dtype)
    fn = _CHOSEN.get(key)
    if fn is None:
        fn = _CHOSEN[key] = next(f for family, f in OPS[op] if FAMILIES[family](x.device.type, x.dtype))
    return fn


def family(op: str, x: torch.Tensor) -> str:
    """The family `pick` runs `op` with on tensors like `x` (for tests and logs)."""
    fn = pick(op, x)
    return next(fam for fam, f in OPS[op] if f is fn)


def rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, D], weight [D] -> [T, D] (see kernels/rms_norm.py)."""
    return pick("rms_norm", x)(x, weight, eps)


def fused_add_rms_norm_op(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """x, residual [T, D] -> (norm(x + residual) [T, D], x + residual [T, D])."""
    return pick("fused_add_rms_norm", x)(x, residual, weight, eps)


def rotary_op(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor):
    """q [T, H, D], k [T, KVH, D], positions int64 [T], cache float32 [max_pos, D] -> rotated (q, k)."""
    return pick("rotary", q)(q, k, positions, cos_sin_cache)


def silu_and_mul_op(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2*I] (gate | up) -> silu(gate) * up [T, I]."""
    return pick("silu_and_mul", x)(x)
