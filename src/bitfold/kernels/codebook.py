"""4-bit codebook weights: w[n, k] = scale[n, k // group] * codebook[code[n, k]] with any 16
values in the codebook (NF4's normal quantiles, or a codebook fitted to the layer). The codes
index a table instead of being the value, so the kernels look each one up: FLUTE's idea
(Guo et al., arXiv 2407.10960: a lookup table for non-uniform codes, read by a fused kernel),
where uniform int4 (`qmatmul.py`) gets a value from its bits by arithmetic.

Layout (both devices): codes int32 [N, KP / 8], nibble j of word i the code of input 8i + j
(KP = K padded to whole groups); scales fp16 [N, KP / group]; codebook float32 [16].

- GPU: `_cb4_gemv_kernel`, one activation row per grid column, BLOCK_N weight rows per program
  (a decode at batch 1-4 is a weight stream: one 32-bit load gives 8 codes, and each byte of
  two codes one 64-bit load of both values from a 256-entry pair table, FLUTE's trick, then a
  fused multiply-add each);
  `_cb4_dequant_kernel` + cuBLAS for more rows (prefill).
- CPU: `bitfold_cb4_gemm` (kernels/cpu/lut_gemm.cpp; AVX2: two 8-entry permutes and a blend
  per 8 codes), float32 activations, no tables of activations.

`cb4_matmul_ref` is the PyTorch reference (the weight dequantized in float32, then a matmul).
"""
from __future__ import annotations

import torch

from bitfold.kernels._triton import (FLOAT_DTYPES, cdiv, jit, pdl_kwargs, pdl_trigger, pdl_wait, require,
                                     require_launchable, tl)
from bitfold.kernels.cpu_lib import ISAS, load_cpu_library

GEMV_MAX_ROWS = 4  # above: dequantize + matmul
GEMV_CONFIG = (16, 256, 4)  # block_n, block_k, num_warps


def pack_cb4(codes: torch.Tensor) -> torch.Tensor:
    """codes uint8 [N, KP] in 0..15, KP a multiple of 8 -> int32 words [N, KP / 8]."""
    require(codes.dim() == 2 and codes.shape[1] % 8 == 0, f"codes must be [N, KP], KP % 8 == 0, got {tuple(codes.shape)}")
    c = codes.to(torch.int64).view(codes.shape[0], -1, 8)
    words = (c << (4 * torch.arange(8, device=codes.device))).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_cb4(words: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_cb4`: uint8 [N, 8 * words.shape[1]]."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    return ((w[..., None] >> (4 * torch.arange(8, device=words.device))) & 15).to(torch.uint8).flatten(-2)


def _check(words: torch.Tensor, scales: torch.Tensor, codebook: torch.Tensor, group: int, k: int) -> None:
    require(words.dim() == 2 and words.dtype == torch.int32, f"codes must be int32 [N, KP/8], got {words.dtype} "
            f"{tuple(words.shape)}")
    kp = words.shape[1] * 8
    require(group >= 8 and group % 8 == 0 and kp % group == 0, f"group must be a multiple of 8 dividing KP={kp}, "
            f"got {group}")
    require(0 < k <= kp and kp - k < group, f"K={k} does not pad to KP={kp} with groups of {group}")
    require(scales.shape == (words.shape[0], kp // group) and scales.dtype == torch.float16,
            f"scales must be float16 [N={words.shape[0]}, KP/group={kp // group}], got {scales.dtype} "
            f"{tuple(scales.shape)}")
    require(codebook.shape == (16,) and codebook.dtype == torch.float32, f"codebook must be float32 [16], got "
            f"{codebook.dtype} {tuple(codebook.shape)}")


def dequantize_ref(words: torch.Tensor, scales: torch.Tensor, codebook: torch.Tensor, group: int) -> torch.Tensor:
    """float32 [N, KP]: scale * codebook[code]."""
    codes = unpack_cb4(words).long()
    n, kp = codes.shape
    w = codebook.float()[codes].view(n, kp // group, group) * scales.float()[..., None]
    return w.view(n, kp)


def cb4_matmul_ref(x: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, codebook: torch.Tensor,
                   group: int) -> torch.Tensor:
    """x [M, K] float -> x @ W.T [M, N] in x's dtype (float32 math)."""
    k = x.shape[-1]
    _check(words, scales, codebook, group, k)
    return (x.float() @ dequantize_ref(words, scales, codebook, group)[:, :k].t()).to(x.dtype)


def pair_table(codebook: torch.Tensor) -> torch.Tensor:
    """int64 [256]: for a byte of two codes (low nibble first), both values as float32 bits, the
    first in the low word: the GPU kernels look codes up two at a time (FLUTE's paired table)."""
    require(codebook.shape == (16,) and codebook.dtype == torch.float32, "codebook must be float32 [16]")
    bits = codebook.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    b = torch.arange(256, device=codebook.device)
    return bits[b & 15] | (bits[b >> 4] << 32)


@jit
def _cb4_tile(words_ptr, sp, pairs, rows, k0, KP, NG, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr):
    """float32 [BLOCK_N, BLOCK_K]: the dequantized weight at inputs k0 .. k0 + BLOCK_K of `rows`
    (tiles past KP read zero codes and the last group's scale: their activations are 0). Each
    byte of codes is one 64-bit load from the 2 KB pair table (L1-resident): both its values.
    (`tl.gather` from a register copy of the 16 values compiled to ~30 compare-and-selects per
    code on sm_90.)"""
    wi = tl.arange(0, BLOCK_K // 8)
    in_k = k0 + wi * 8 < KP
    words = tl.load(words_ptr + rows[:, None] * (KP // 8) + (k0 // 8 + wi)[None, :], mask=in_k[None, :], other=0)
    byte = (words[:, :, None] >> (tl.arange(0, 4) * 8)[None, None, :]) & 255  # [BLOCK_N, BLOCK_K / 8, 4]
    pv = tl.load(pairs + byte)
    lo = (pv & 0xFFFFFFFF).to(tl.int32).to(tl.float32, bitcast=True)  # input 8i + 2b
    hi = (pv >> 32).to(tl.int32).to(tl.float32, bitcast=True)  # input 8i + 2b + 1
    vals = tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_K))
    GT: tl.constexpr = BLOCK_K // GROUP if BLOCK_K >= GROUP else 1
    gi = tl.minimum((k0 + tl.arange(0, GT) * GROUP) // GROUP, NG - 1)
    s = tl.load(sp + rows[:, None] * NG + gi[None, :]).to(tl.float32)  # [BLOCK_N, GT]
    if BLOCK_K >= GROUP:
        vals = tl.reshape(tl.reshape(vals, (BLOCK_N, GT, GROUP)) * s[:, :, None], (BLOCK_N, BLOCK_K))
    else:  # the tile lies within one group
        vals = vals * s
    return vals


@jit
def _cb4_gemv_kernel(x, out, words, sp, pairs, N, K, KP, NG, stride_xm, stride_om, GROUP: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr = False):
    pid_n = tl.program_id(0)
    m = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    rows = tl.where(n_mask, offs_n, N - 1).to(tl.int64)  # rows past N re-read row N-1, never stored
    pdl_wait(PDL)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, KP, BLOCK_K):
        w = _cb4_tile(words, sp, pairs, rows, k0, KP, NG, GROUP, BLOCK_N, BLOCK_K)
        xv = tl.load(x + m * stride_xm + k0 + offs_k, mask=k0 + offs_k < K, other=0.0).to(tl.float32)
        acc += w * xv[None, :]
    y = tl.sum(acc, axis=1)
    pdl_trigger(PDL)  # late, as the other GEMVs (kernels/_triton.py)
    tl.store(out + m * stride_om + offs_n, y.to(out.dtype.element_ty), mask=n_mask)


@jit
def _cb4_dequant_kernel(out, words, sp, pairs, N, KP, NG, stride_on, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    n_mask = offs_n < N
    rows = tl.where(n_mask, offs_n, N - 1).to(tl.int64)
    w = _cb4_tile(words, sp, pairs, rows, k0, KP, NG, GROUP, BLOCK_N, BLOCK_K)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    tl.store(out + rows[:, None] * stride_on + offs_k[None, :], w.to(out.dtype.element_ty),
             mask=n_mask[:, None] & (offs_k < KP)[None, :])


def _block_k(group: int, kp: int, bk: int) -> int:
    """A power of two tile of whole groups (or within one group) no wider than KP needs."""
    bk = min(bk, 1 << (kp - 1).bit_length())
    return max(bk, 8) if group % bk == 0 or bk % group == 0 else group


def dequantize(words: torch.Tensor, scales: torch.Tensor, codebook: torch.Tensor, group: int,
               dtype: torch.dtype = torch.bfloat16, *, pairs: torch.Tensor | None = None) -> torch.Tensor:
    """The weight [N, KP] in `dtype` (Triton). `pairs`: `pair_table(codebook)`, if the caller keeps it."""
    _check(words, scales, codebook, group, words.shape[1] * 8)
    pairs = pair_table(codebook) if pairs is None else pairs
    n, kp = words.shape[0], words.shape[1] * 8
    out = torch.empty(n, kp, dtype=dtype, device=words.device)
    require_launchable(words, scales, codebook, out)
    bn, bk = 32, _block_k(group, kp, 128)
    _cb4_dequant_kernel[(cdiv(n, bn), cdiv(kp, bk))](out, words, scales, pairs, n, kp, kp // group, out.stride(0),
                                                      GROUP=group, BLOCK_N=bn, BLOCK_K=bk, num_warps=4)
    return out


def cb4_matmul(x: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, codebook: torch.Tensor, group: int, *,
               kind: str | None = None, config: tuple[int, int, int] | None = None,
               pairs: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] float (contiguous along K) -> x @ W.T [M, N] in x's dtype (Triton). kind "gemv"
    (default up to GEMV_MAX_ROWS rows) or "dequant"; config (block_n, block_k, num_warps);
    `pairs`: `pair_table(codebook)`, kept by the caller (a decode step builds none)."""
    M, k = x.shape
    _check(words, scales, codebook, group, k)
    require(x.dtype in FLOAT_DTYPES and x.stride(1) == 1, f"x must be float and contiguous along K, got {x.dtype}")
    n, kp = words.shape[0], words.shape[1] * 8
    kind = kind or ("gemv" if M <= GEMV_MAX_ROWS else "dequant")
    pairs = pair_table(codebook) if pairs is None else pairs
    if kind == "dequant":
        return x @ dequantize(words, scales, codebook, group, x.dtype, pairs=pairs)[:, :k].t()
    require(kind == "gemv", f"unknown kind {kind!r}: gemv or dequant")
    out = torch.empty(M, n, dtype=x.dtype, device=x.device)
    if M == 0:
        return out
    require_launchable(x, words, scales, codebook, out)
    bn, bk, warps = config or GEMV_CONFIG
    bk = _block_k(group, kp, bk)
    _cb4_gemv_kernel[(cdiv(n, bn), M)](x, out, words, scales, pairs, n, k, kp, kp // group, x.stride(0),
                                       out.stride(0), GROUP=group, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
                                       **pdl_kwargs())
    return out


def cb4_gemm_cpu(x: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, codebook: torch.Tensor, group: int, *,
                 num_threads: int | None = None, isa: str | None = None) -> torch.Tensor:
    """x float32 [B, K] (CPU) -> y float32 [B, N]: the C++ kernel `bitfold_cb4_gemm` (x padded to
    KP with zeros here). isa 'avx2' / 'scalar' forces a path."""
    lib = load_cpu_library()
    B, k = x.shape
    _check(words, scales, codebook, group, k)
    n, kp = words.shape[0], words.shape[1] * 8
    x = torch.nn.functional.pad(x.float(), (0, kp - k)).contiguous()
    for name, t in (("codes", words), ("scales", scales), ("codebook", codebook)):
        require(t.is_contiguous() and t.device.type == "cpu", f"{name} must be contiguous CPU tensors")
    y = torch.empty(B, n, dtype=torch.float32)
    if B == 0 or n == 0:
        return y
    rc = lib.bitfold_cb4_gemm(x.data_ptr(), B, kp, words.data_ptr(), scales.data_ptr(), codebook.data_ptr(), n, group,
                              y.data_ptr(), num_threads or torch.get_num_threads(), -1 if isa is None else ISAS[isa])
    require(rc == 0, f"bitfold_cb4_gemm rejected B={B} KP={kp} N={n} group={group}")
    return y
