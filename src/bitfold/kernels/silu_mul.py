"""SwiGLU activation: `silu(gate) * up` (Shazeer 2020, "GLU Variants Improve Transformer",
arXiv 2002.05202), as used by Llama/Mistral/Qwen MLPs.

The gate and up projections are one fused matmul whose output is `[T, 2*I]` with gate first;
this kernel reads both halves once and writes `[T, I]`, computing in float32 and rounding
once (HF rounds silu(gate) to the compute dtype before the multiply; the difference is
within one ulp of the output dtype).
"""
import torch

from bitfold.kernels._triton import (FLOAT_DTYPES, cdiv, jit, next_pow2, pdl_kwargs, pdl_trigger, pdl_wait, require,
                                     require_launchable, tl)


@jit
def _silu_and_mul_kernel(x, out, I, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_trigger(PDL)
    pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < I
    gate = tl.load(x + row * 2 * I + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x + row * 2 * I + I + offs, mask=mask, other=0.0).to(tl.float32)
    y = gate * tl.sigmoid(gate) * up
    tl.store(out + row * I + offs, y.to(out.dtype.element_ty), mask=mask)


def _check(x):
    require(x.dim() == 2 and x.shape[1] % 2 == 0, f"x must be [T, 2*I], got {tuple(x.shape)}")
    require(x.dtype in FLOAT_DTYPES, f"unsupported dtype {x.dtype}")
    require(x.is_contiguous(), "x must be contiguous")


def silu_and_mul(x: torch.Tensor, *, block: int = 1024, num_warps: int = 4) -> torch.Tensor:
    """x: `[T, 2*I]` (gate = first half, up = second half). Returns `[T, I]` in x's dtype.
    `block`: output elements per program (tuning knob; a power of two)."""
    _check(x)
    T, I = x.shape[0], x.shape[1] // 2
    out = torch.empty((T, I), dtype=x.dtype, device=x.device)
    if T == 0 or I == 0:
        return out
    require_launchable(x)
    BLOCK = min(block, next_pow2(I))
    _silu_and_mul_kernel[(T, cdiv(I, BLOCK))](x, out, I, BLOCK=BLOCK, num_warps=num_warps, **pdl_kwargs())
    return out


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch `silu_and_mul`."""
    _check(x)
    gate, up = x.float().chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(x.dtype)
