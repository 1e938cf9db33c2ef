"""Skinny matmul `y = x @ W.T` for a few rows of activations (decode at small batch).

At batch 1..16 a decode step's linear layers are pure weight streaming: every byte of W is read
once and used for at most 16 multiply-adds, so time = bytes(W) / bandwidth and the only goal is
to keep enough loads in flight on every SM. cuBLAS picks tiles made for larger M (and for the
long-K down / o projections a split-K GEMM plus a separate reduce kernel); this kernel gives
each program a thin slab of BLOCK_N full rows of W, walked along K in 16-byte loads, so no
reduction across programs is needed and a weight matrix becomes hundreds of small programs,
several resident per SM (their loads in flight together cover the memory latency).

Two inner loops, chosen by BLOCK_M:
- BLOCK_M == 1 (one activation row): multiply-add in float32 registers, `acc[BLOCK_N,
  BLOCK_K] += W * x`, one tree sum over K at the end;
- BLOCK_M >= 16: `tl.dot` of a `[BLOCK_M, BLOCK_K]` activation tile with the weight slab's
  transpose (tensor cores; rows past M are masked to zero). The arithmetic is 16x what the
  rows need and still far under the matrix units' rate.

Both accumulate in float32 and round once into the activations' dtype, like cuBLAS.
"""
import torch
import torch.nn.functional as F

from bitfold.kernels._triton import (FLOAT_DTYPES, cdiv, jit, pdl_kwargs, pdl_trigger, pdl_wait, require,
                                     require_launchable, tl)


@jit
def _gemv_kernel(x, w, out, M, N, K, stride_xm, stride_wn, stride_om,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                 PDL: tl.constexpr = False):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    # Rows past N re-read row N-1 instead of masking, so every weight load stays unpredicated
    # along N; their results are never stored.
    rows = tl.where(n_mask, offs_n, N - 1).to(tl.int64)
    pdl_wait(PDL)
    w_ptrs = w + rows[:, None] * stride_wn + offs_k[None, :]
    if BLOCK_M == 1:
        x_ptrs = x + pid_m.to(tl.int64) * stride_xm + offs_k
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                wt = tl.load(w_ptrs)
                xv = tl.load(x_ptrs)
            else:
                k_mask = k0 + offs_k < K
                wt = tl.load(w_ptrs, mask=k_mask[None, :], other=0.0)
                xv = tl.load(x_ptrs, mask=k_mask, other=0.0)
            acc += wt.to(tl.float32) * xv.to(tl.float32)[None, :]
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
        y = tl.sum(acc, axis=1)
        pdl_trigger(PDL)  # late: see _triton.py (a wide grid lets its successor in only near its end)
        tl.store(out + pid_m.to(tl.int64) * stride_om + offs_n, y.to(out.dtype.element_ty), mask=n_mask)
    else:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        x_ptrs = x + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                wt = tl.load(w_ptrs)
                xt = tl.load(x_ptrs, mask=m_mask[:, None], other=0.0)
            else:
                k_mask = k0 + offs_k < K
                wt = tl.load(w_ptrs, mask=k_mask[None, :], other=0.0)
                xt = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            acc = tl.dot(xt, tl.trans(wt), acc)
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
        o_ptrs = out + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
        pdl_trigger(PDL)
        tl.store(o_ptrs, acc.to(out.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


# (block_m, block_n, block_k, num_warps, num_stages), chosen on an H100 by benchmarks/gemv.py
# (sweep: benchmarks/results/gemv-llama3-8b-20261122-074241, every layer of llama3-8b x rows
# 1..16): one row takes the register loop, more rows tl.dot; "wide" matrices (N > K: q|k|v,
# gate|up, lm_head) ran fastest with 4-row slabs, square / tall ones (o, down) with 16-row
# slabs and 8 warps (measured, not derived). With this table at one row (gemv-...-074611): q|k|v
# 94%, gate|up 104%, down 95%, lm_head 107% of the copy bandwidth (a read-only stream can beat
# a copy), o 83% (34 MB in 14 us: launch and tail weigh); cuBLAS 79 / 97 / 91 / 81 / 72%.
_CONFIGS = {  # (rows, wide) -> config
    (1, True): (1, 4, 1024, 4, 1), (1, False): (1, 16, 512, 8, 1),
    (16, True): (16, 64, 128, 4, 5), (16, False): (16, 32, 256, 4, 5),
}


def default_config(M: int, N: int, K: int) -> tuple[int, int, int, int, int]:
    """The launch configuration for `M` rows of a `[N, K]` weight: the table's smallest row
    bucket >= M (else its largest), wide (N > K) or not."""
    rows = min((m for m, _ in _CONFIGS if m >= M), default=max(m for m, _ in _CONFIGS))
    return _CONFIGS[(rows, N > K)]


def _check(x, weight):
    require(x.dim() == 2, f"x must be [M, K], got {tuple(x.shape)}")
    require(weight.dim() == 2 and weight.shape[1] == x.shape[1],
            f"weight must be [N, K={x.shape[1]}], got {tuple(weight.shape)}")
    require(x.dtype in FLOAT_DTYPES and weight.dtype == x.dtype,
            f"x and weight must share a float dtype, got {x.dtype} and {weight.dtype}")
    require(x.stride(1) == 1 and weight.stride(1) == 1, "x and weight must be contiguous along K")


def gemv(x: torch.Tensor, weight: torch.Tensor, *, config: tuple[int, int, int, int, int] | None = None,
         out: torch.Tensor | None = None) -> torch.Tensor:
    """x: `[M, K]`, weight: `[N, K]` (an `nn.Linear` weight), both one float dtype, contiguous
    along K. Returns `x @ weight.T`, `[M, N]` in x's dtype. Any M works; it pays for M <= 16.
    `config`: (block_m, block_n, block_k, num_warps, num_stages); block_m 1 (the register
    loop, one grid column per row) or >= 16 (`tl.dot` over row tiles); default from
    `default_config`. `out`: an optional `[M, N]` buffer to write."""
    _check(x, weight)
    M, K = x.shape
    N = weight.shape[0]
    if out is None:
        out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    require(out.shape == (M, N) and out.stride(1) == 1 and out.dtype == x.dtype, "out must be [M, N] in x's dtype")
    if M == 0 or N == 0:
        return out
    if K == 0:
        return out.zero_()
    require_launchable(x, weight, out)
    bm, bn, bk, warps, stages = config or default_config(M, N, K)
    require(bm == 1 or bm >= 16, f"block_m must be 1 or >= 16, got {bm}")
    grid = (cdiv(N, bn), M if bm == 1 else cdiv(M, bm))
    _gemv_kernel[grid](x, weight, out, M, N, K, x.stride(0), weight.stride(0), out.stride(0),
                       BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, EVEN_K=K % bk == 0, num_warps=warps, num_stages=stages,
                       **pdl_kwargs())
    return out


def gemv_ref(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch `gemv`: `F.linear` in float32, rounded once to x's dtype."""
    _check(x, weight)
    return F.linear(x.float(), weight.float()).to(x.dtype)
