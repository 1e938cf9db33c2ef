"""RMSNorm and residual-add + RMSNorm (Zhang & Sennrich 2019, arXiv 1910.07467).

Numerics follow HF Llama's `LlamaRMSNorm`: normalize in float32, cast the normalized row to
the input dtype, THEN multiply by the weight. Matching that order bit for bit matters more
than the last ulp, because checkpoints were trained and evaluated with it. The fused variant
rounds `x + residual` to the input dtype before normalizing, exactly as HF does when it
keeps the residual stream in bf16.
"""
import torch

from bitfold.kernels._triton import (FLOAT_DTYPES, jit, next_pow2, pdl_kwargs, pdl_trigger, pdl_wait, require,
                                     require_launchable, tl)


@jit
def _rms_norm_kernel(x, residual, weight, out, new_residual, eps, N,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    # One program per row; the whole row lives in registers (BLOCK >= hidden), so the row is
    # read once for the variance and reused for the output.
    pdl_trigger(PDL)
    pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    h = tl.load(x + row * N + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        h = h.to(tl.float32) + tl.load(residual + row * N + offs, mask=mask, other=0.0).to(tl.float32)
        h = h.to(x.dtype.element_ty)  # HF adds in the compute dtype: normalize the rounded sum
        tl.store(new_residual + row * N + offs, h, mask=mask)
    h = h.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(h * h, axis=0) / N + eps)
    normed = (h * rstd).to(x.dtype.element_ty).to(tl.float32)
    w = tl.load(weight + offs, mask=mask, other=0.0).to(tl.float32)
    # Both factors have <= 11 mantissa bits (or are fp32), so one fp32 multiply then one
    # rounding equals the product HF computes in the low-precision dtype.
    tl.store(out + row * N + offs, (normed * w).to(out.dtype.element_ty), mask=mask)


def _check(x, residual, weight):
    require(x.dim() == 2, f"x must be [T, hidden], got {tuple(x.shape)}")
    require(x.dtype in FLOAT_DTYPES, f"unsupported dtype {x.dtype}")
    require(x.is_contiguous(), "x must be contiguous")
    require(weight.shape == (x.shape[1],), f"weight must be [hidden={x.shape[1]}], got {tuple(weight.shape)}")
    require(weight.dtype in FLOAT_DTYPES and weight.is_contiguous(), f"weight must be a contiguous float tensor, got {weight.dtype}")
    if residual is not None:
        require(residual.shape == x.shape, f"residual {tuple(residual.shape)} != x {tuple(x.shape)}")
        require(residual.dtype == x.dtype, f"residual dtype {residual.dtype} != x dtype {x.dtype}")
        require(residual.is_contiguous(), "residual must be contiguous")


def _launch(x, residual, weight, eps, num_warps):
    out = torch.empty_like(x)
    new_residual = torch.empty_like(x) if residual is not None else out  # dummy when unused
    T, N = x.shape
    if T > 0:
        require_launchable(*(t for t in (x, residual, weight) if t is not None))
        BLOCK = next_pow2(N)
        require(BLOCK <= 65536, f"hidden size {N} too large for a one-row-per-program kernel")
        warps = num_warps or min(16, max(1, BLOCK // 512))  # ~4 fp32 elements per thread per pass
        _rms_norm_kernel[(T,)](x, residual if residual is not None else x, weight, out, new_residual,
                               float(eps), N, HAS_RESIDUAL=residual is not None, BLOCK=BLOCK,
                               num_warps=warps, **pdl_kwargs())
    return out, new_residual


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, num_warps: int = 0) -> torch.Tensor:
    """x: `[T, hidden]`; weight: `[hidden]`; returns `[T, hidden]` in x's dtype.
    `num_warps=0` picks from the hidden size."""
    _check(x, None, weight)
    return _launch(x, None, weight, eps, num_warps)[0]


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                       *, num_warps: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual: `[T, hidden]`; weight: `[hidden]`. Returns `(out, new_residual)`, both
    `[T, hidden]` in x's dtype, with `new_residual = x + residual` and
    `out = rms_norm(new_residual, weight, eps)`. One pass over memory instead of three."""
    _check(x, residual, weight)
    return _launch(x, residual, weight, eps, num_warps)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Pure-PyTorch `rms_norm` (HF `LlamaRMSNorm.forward`)."""
    _check(x, None, weight)
    h = x.float()
    normed = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return (normed.float() * weight.float()).to(x.dtype)


def fused_add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-PyTorch `fused_add_rms_norm`."""
    _check(x, residual, weight)
    new_residual = (x.float() + residual.float()).to(x.dtype)
    return rms_norm_ref(new_residual, weight, eps), new_residual
