"""Calibrated rounding of one linear layer into the low-bit codes of `lowbit.quantize_rtn`.

Both methods return exactly what `quantize_rtn(w, spec)` returns, (q uint8 [N, K], scale fp16
[N, G], min fp16 [N, G]) with w[n, k] ~= scale[n, k // group] * q[n, k] + min[n, k // group],
so their checkpoints load with the existing loader and run on the CPU LUT path and the GPU
kernels unchanged. What they add is data: the layer's inputs X [T, K] on calibration text,
summarized as H = X^T X [K, K] (float64 sums over tokens) and, for AWQ, the mean |x| per input
channel. Pure torch on the CPU, float32 (float64 where asked).

- `gptq_quantize`: GPTQ (Frantar et al., arXiv 2210.17323). Columns are rounded one by one and
  each rounding error is spread over the columns not yet rounded through the inverse Hessian,
  the optimal-brain-surgeon update, so the layer's output error ||X W^T - X Q^T||^2 rather than
  the weight error is what rounding minimizes.
- `awq_scales`: AWQ (Lin et al., arXiv 2306.00978). Input channel k is scaled by
  s_k = mean|x_k|^alpha before round-to-nearest (weights of channels with large activations get
  relatively finer steps); alpha is searched on a grid for the least layer output error, and the
  scale is folded back where that is exact (see `bitfold.calibration`).

Only the uniform formats qualify (`supports`): int2-int8 groups (asymmetric, scale and min
searched per group as quantize_rtn does) and int8-ch (symmetric per row). int1 and ternary are
not a grid GPTQ can round onto with searched ranges, and are refused.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from bitfold.weights.lowbit import LowBitSpec, quantize_rtn

GPTQ_BLOCK = 128  # columns per lazy batch update (the paper's B); a multiple of every group size
GPTQ_DAMP = 0.01  # dampening: this fraction of the mean diagonal of H is added to it
AWQ_GRID = 20  # alpha in 0, 1/20, ..., 19/20 (the paper's grid); alpha = 0 is plain RTN


def supports(spec: LowBitSpec) -> str | None:
    """None if GPTQ/AWQ can produce this spec's codes, else why not."""
    if spec.ternary or spec.bits == 1:
        return (f"{spec.name} has no uniform grid with a searched range (int1: two group means; ternary: "
                "absmean); use int2-int8")
    return None


def levels(spec: LowBitSpec) -> int:
    return 2**spec.bits - 1


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor, spec: LowBitSpec) -> torch.Tensor:
    """codes [N, K] + fp16 scale/min [N, G] -> float32 [N, K] (what the kernels compute with)."""
    N, K = q.shape
    g = spec.group_size(K)
    return (q.float().view(N, K // g, g) * scale.float()[..., None] + mins.float()[..., None]).view(N, K)


def output_error(w: torch.Tensor, w_q: torch.Tensor, H: torch.Tensor) -> float:
    """||X w^T - X w_q^T||_F^2 = sum_n d_n H d_n^T, d = w - w_q, from H = X^T X (float64)."""
    d = (w.double() - w_q.double())
    return float(((d @ H.double()) * d).sum())


def hessian_add(H: torch.Tensor, x: torch.Tensor) -> None:
    """H [K, K] float64 += x^T x for inputs x [..., K] (the matmul in float32, summed in float64)."""
    x = x.reshape(-1, x.shape[-1]).float()
    H += (x.t() @ x).double()


def gptq_quantize(w: torch.Tensor, H: torch.Tensor, spec: LowBitSpec, *, block: int = GPTQ_BLOCK,
                  damp: float = GPTQ_DAMP, act_order: bool = False, static_groups: bool = False,
                  dtype: torch.dtype = torch.float32):
    """GPTQ (arXiv 2210.17323, Algorithm 1) of one layer.

    w: float [N, K] (K = the layer's padded inputs, a multiple of the group); H: [K, K], the sum
    of x^T x over calibration inputs x [T, K] (any positive multiple of the paper's 2 X X^T).
    -> (q uint8 [N, K], scale fp16 [N, G], min fp16 [N, G], loss), loss = the paper's
    sum (w - q)^2 / (2 [H^-1]_kk) over all weights: the output error it predicts.

    Steps: columns k with H_kk = 0 (never active, e.g. padding) are zeroed; H += damp *
    mean(diag H) * I; U = the upper Cholesky factor of H^-1, whose row k restricted to columns
    >= k is, up to the factor U_kk, the row of the inverse Hessian of the columns not yet
    rounded. Column k is rounded to nearest on its group's grid, its error e = (w_k - q_k) / U_kk
    is subtracted as e * U[k, k:] from the columns to its right: at once within a block of
    `block` columns, and once per block for the rest (the lazy batch update, the same result in
    far fewer memory passes). A group's scale and min are chosen (quantize_rtn's range search)
    when its first column is reached, from the weights as updated by then; with `static_groups`
    (and always under `act_order`, which visits columns by decreasing H_kk so the ones with the
    most activation energy are rounded first while the most columns remain to absorb their error)
    every group's scale and min come from the original weights before any update, so codes stay
    in the storage's contiguous groups.
    """
    N, K = w.shape
    group = spec.group_size(K)
    if K % group or block % group and spec.group:
        raise ValueError(f"{K} columns, group {group}, block {block}: the groups must tile both")
    W = w.to(dtype).clone()
    H = H.to(dtype).clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    static = static_groups or act_order or spec.group == 0
    G = K // group
    S = torch.empty(N, G, dtype=torch.float16)
    M = torch.empty(N, G, dtype=torch.float16)
    if static:
        _, S, M = quantize_rtn(W.float(), spec)
    perm = torch.argsort(H.diagonal(), descending=True, stable=True) if act_order else torch.arange(K)
    W, H = W[:, perm], H[perm][:, perm]
    H.diagonal().add_(damp * H.diagonal().mean())
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    codes = torch.zeros(N, K, dtype=torch.uint8)
    top = levels(spec)
    group_spec = LowBitSpec(spec.bits, group, spec.ternary, spec.symmetric)
    loss = torch.zeros((), dtype=torch.float64)
    order = perm.tolist()
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            k = order[i1 + i]
            g = k // group
            if not static and k % group == 0:  # a new group starts here (columns in storage order)
                _, s_g, m_g = quantize_rtn(W1[:, i:i + group].float(), group_spec)
                S[:, g], M[:, g] = s_g[:, 0], m_g[:, 0]
            s, m = S[:, g].to(dtype), M[:, g].to(dtype)
            col = W1[:, i]
            q = ((col - m) / s).round_().clamp_(0, top).nan_to_num_(0.0)
            err = (col - (q * s + m)) / U[i1 + i, i1 + i]
            loss += (err.double() ** 2).sum() / 2
            W1[:, i:] -= err[:, None] * U[i1 + i, i1 + i:i2][None, :]
            E1[:, i] = err
            codes[:, k] = q.to(torch.uint8)
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return codes, S, M, float(loss)


def awq_scales(w: torch.Tensor, x: torch.Tensor, x_absmean: torch.Tensor, spec: LowBitSpec,
               grid: int = AWQ_GRID):
    """AWQ's scale search (arXiv 2306.00978, section 3.2) for one layer.

    w: float [N, K] (unpadded); x: float [T, K], calibration inputs of the layer (a sample of tokens);
    x_absmean: [K], the mean |x| per input channel over all calibration tokens (channels that
    must share a scale, e.g. the heads of one GQA group, share their mean). For each alpha in
    0, 1/grid, ..., (grid-1)/grid: s = x_absmean^alpha normalized by sqrt(max s * min s), the
    weight becomes Q(w * s) / s with Q = quantize_rtn, and the output error ||x w^T - x
    (Q(w s) / s)^T||^2 is measured; the best alpha wins. alpha = 0 (s = 1) is plain RTN, so the
    result is never worse than RTN on this objective.
    -> (s float32 [K], {"alpha", "error", "rtn_error"}); quantize with quantize_rtn(w * s, spec)
    and divide the layer's input by s (fold it into the op before).
    """
    x, w = x.float(), w.float()
    K = w.shape[1]
    pad = spec.padded(K) - K  # quantize_rtn wants whole groups; the padding columns stay zero
    ref = x @ w.t()
    xm = x_absmean.float()
    xm = xm.clamp_min(max(float(xm.max()) * 1e-5, 1e-12))  # a dead channel must not set the normalization
    best = None
    rtn_err = math.inf
    for j in range(grid):
        alpha = j / grid
        s = xm.pow(alpha)
        s = (s / (s.max() * s.min()).sqrt()).clamp_min(1e-4)
        wq = dequantize_codes(*quantize_rtn(F.pad(w * s, (0, pad)), spec), spec)[:, :K] / s
        err = float((ref - x @ wq.t()).pow(2).sum())
        if j == 0:
            rtn_err = err
        if best is None or err < best[1]:
            best = (alpha, err, s)
    alpha, err, s = best
    return s, {"alpha": alpha, "error": err, "rtn_error": rtn_err}
