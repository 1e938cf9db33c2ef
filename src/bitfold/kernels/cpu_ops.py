"""float32 C++ versions of a decode layer's small operations for the CPU path (see
cpu/decode_ops.cpp for why). Same signatures and meaning as the references they stand in for:
`rms_norm` / `fused_add_rms_norm` (both `add_rms_norm`) = rms_norm_ref / fused_add_rms_norm_ref,
`rotary` = rotary_ref, `silu_mul` = silu_and_mul_ref, `paged_decode` = paged_decode_ref (with or
without its fused KV write). `usable(*tensors)` says whether a call can take the C++ path (CPU,
float32, library built); `kernels/ops.py` picks these for CPU float32 tensors, the references
otherwise. The fused decode step (runner/cpu_step.py) calls the same kernels.
"""
from __future__ import annotations

import torch

from bitfold.kernels.cpu_lib import available, load_cpu_library


def usable(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors) and available()


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    """x, residual: float32 [T, D]; weight [D]. Returns norm(x) * w, or with a residual
    (norm(x + residual) * w, x + residual)."""
    lib = load_cpu_library()
    x = x.contiguous()
    T, D = x.shape
    out = torch.empty_like(x)
    if residual is None:
        lib.bitfold_add_rms_norm(x.data_ptr(), None, weight.data_ptr(), out.data_ptr(), None, T, D, eps)
        return out
    residual = residual.contiguous()
    res_out = torch.empty_like(x)
    lib.bitfold_add_rms_norm(x.data_ptr(), residual.data_ptr(), weight.data_ptr(), out.data_ptr(), res_out.data_ptr(),
                             T, D, eps)
    return out, res_out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """As rms_norm_ref: x float32 [T, D], weight [D] -> norm(x) * w."""
    return add_rms_norm(x, None, weight, eps)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """As fused_add_rms_norm_ref: (norm(x + residual) * w, x + residual)."""
    return add_rms_norm(x, residual, weight, eps)


def rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor):
    """q [T, H, D], k [T, KVH, D] float32; positions int64 [T]; cache [max_pos, D] -> (q, k) rotated."""
    q, k = q.contiguous(), k.contiguous()
    positions = positions.to(torch.int64).contiguous()
    T, H, D = q.shape
    if T and int(positions.max()) >= cos_sin_cache.shape[0]:
        raise ValueError(f"position {int(positions.max())} beyond the rotary cache ({cos_sin_cache.shape[0]})")
    qo, ko = torch.empty_like(q), torch.empty_like(k)
    load_cpu_library().bitfold_rotary(q.data_ptr(), k.data_ptr(), positions.data_ptr(), cos_sin_cache.data_ptr(),
                                      qo.data_ptr(), ko.data_ptr(), T, H, k.shape[1], D)
    return qo, ko


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor, scale: float, sliding_window: int = 0, *,
                 new_k: torch.Tensor | None = None, new_v: torch.Tensor | None = None,
                 slot_mapping: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, H, D]; caches [blocks, block_size, KVH, D] float32; block_tables [B, max_blocks];
    context_lens [B] -> [B, H, D]. With new_k/new_v [B, KVH, D] and slot_mapping int64 [B] the
    new token's K/V are written first (fused, as paged_decode_ref does); else already written."""
    q = q.contiguous()
    B, H, D = q.shape
    out = torch.empty_like(q)
    if B == 0:
        return out
    bt = block_tables.to(torch.int32).contiguous()
    lens = context_lens.to(torch.int32).contiguous()
    fused = new_k is not None
    if fused:
        new_k, new_v = new_k.contiguous(), new_v.contiguous()
        slot_mapping = slot_mapping.to(torch.int64).contiguous()
        if new_k.shape != (B, k_cache.shape[2], D) or slot_mapping.shape != (B,):
            raise ValueError(f"fused write expects new_k [{B}, {k_cache.shape[2]}, {D}] and slot_mapping [{B}]")
    load_cpu_library().bitfold_paged_decode(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), bt.data_ptr(), lens.data_ptr(), out.data_ptr(),
        B, H, k_cache.shape[2], D, k_cache.shape[1], bt.shape[1], scale, sliding_window,
        new_k.data_ptr() if fused else None, new_v.data_ptr() if fused else None,
        slot_mapping.data_ptr() if fused else None)
    return out


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """x float32 [T, 2*I] (gate | up) -> silu(gate) * up [T, I], as silu_and_mul_ref."""
    x = x.contiguous()
    T, I = x.shape[0], x.shape[1] // 2
    if x.shape[1] != 2 * I:
        raise ValueError(f"x must be [T, 2*I], got {tuple(x.shape)}")
    out = torch.empty(T, I, dtype=torch.float32)
    if T:
        load_cpu_library().bitfold_silu_mul(x.data_ptr(), out.data_ptr(), T, I, I)
    return out
