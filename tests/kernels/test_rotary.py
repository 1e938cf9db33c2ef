import math

import pytest
import torch

from bitfold.kernels.rotary import rotary, rotary_ref

from ._util import DEVICE, assert_close, need_triton, randn

MAX_POS, THETA = 4096, 10000.0
# (T, num_heads, num_kv_heads, head_dim, dtype)
CASES = [(1, 4, 4, 64, torch.float32), (6, 8, 2, 128, torch.float32), (5, 3, 1, 64, torch.float16),
         (5, 8, 1, 128, torch.bfloat16)]


def _angles_f64(positions, head_dim):
    inv_freq = 1.0 / THETA ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    return positions.double().cpu()[:, None] * inv_freq[None, :]  # [T, head_dim/2]


def _inputs(T, H, Hkv, D, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k = randn(T, H, D, dtype=dtype, gen=gen), randn(T, Hkv, D, dtype=dtype, gen=gen)
    positions = torch.randint(0, MAX_POS, (T,), generator=gen)
    positions[0] = MAX_POS - 1  # the last cache row
    a = _angles_f64(torch.arange(MAX_POS), D)
    cache = torch.cat([a.cos(), a.sin()], dim=-1).float()
    return q, k, positions.to(DEVICE), cache.to(DEVICE)


def _hf_f64(x, positions):
    """HF apply_rotary_pos_emb in float64: x * cat(cos, cos) + rotate_half(x) * cat(sin, sin)."""
    a = _angles_f64(positions, x.shape[-1])
    cos, sin = torch.cat([a.cos(), a.cos()], -1)[:, None], torch.cat([a.sin(), a.sin()], -1)[:, None]
    xd = x.double().cpu()
    x1, x2 = xd.chunk(2, dim=-1)
    return xd * cos + torch.cat([-x2, x1], dim=-1) * sin


@pytest.mark.parametrize("T,H,Hkv,D,dtype", CASES)
def test_ref_matches_float64(T, H, Hkv, D, dtype):
    q, k, positions, cache = _inputs(T, H, Hkv, D, dtype)
    q_out, k_out = rotary_ref(q, k, positions, cache)
    assert_close(q_out, _hf_f64(q, positions), dtype)
    assert_close(k_out, _hf_f64(k, positions), dtype)


@pytest.mark.parametrize("T,H,Hkv,D,dtype", CASES)
def test_kernel_matches_ref(T, H, Hkv, D, dtype):
    need_triton()
    q, k, positions, cache = _inputs(T, H, Hkv, D, dtype)
    q_out, k_out = rotary(q, k, positions, cache)
    q_ref, k_ref = rotary_ref(q, k, positions, cache)
    assert_close(q_out, q_ref, dtype, kernel=True)
    assert_close(k_out, k_ref, dtype, kernel=True)


def test_empty_and_bad_inputs():
    q, k, positions, cache = _inputs(3, 4, 2, 64, torch.float32)
    for fn in (rotary, rotary_ref):
        q_out, k_out = fn(q[:0], k[:0], positions[:0], cache)
        assert q_out.shape == (0, 4, 64) and k_out.shape == (0, 2, 64)
        with pytest.raises(ValueError, match="positions must be int64"):
            fn(q, k, positions.int(), cache)
        with pytest.raises(ValueError, match="rotary_dim == head_dim"):
            fn(q, k, positions, cache[:, :32].contiguous())
        with pytest.raises(ValueError, match="cos_sin_cache must be float32"):
            fn(q, k, positions, cache.double())


@pytest.mark.parametrize("fn", ["kernel", "ref"])
def test_strided_tokens_from_a_fused_qkv_row(fn):
    """q and k as views of a fused q|k|v output (tokens a whole row apart, heads contiguous), as
    the attention layer passes them: same result as contiguous copies, contiguous outputs; a
    layout whose heads are not contiguous within a token is refused."""
    if fn == "kernel":
        need_triton()
    f = rotary if fn == "kernel" else rotary_ref
    T, H, Hkv, D = 5, 4, 2, 64
    q, k, positions, cache = _inputs(T, H, Hkv, D, torch.float32)
    fused = torch.cat([q.reshape(T, -1), k.reshape(T, -1), randn(T, Hkv * D, dtype=torch.float32)], dim=1)
    qv = fused[:, : H * D].reshape(T, H, D)
    kv = fused[:, H * D : (H + Hkv) * D].reshape(T, Hkv, D)
    assert not qv.is_contiguous()
    q_out, k_out = f(qv, kv, positions, cache)
    q_ref, k_ref = rotary_ref(q, k, positions, cache)
    assert q_out.is_contiguous() and k_out.is_contiguous()
    torch.testing.assert_close(q_out, q_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(k_out, k_ref, rtol=1e-6, atol=1e-6)
    if fn == "kernel":
        with pytest.raises(ValueError, match="contiguous within a token"):
            f(q.transpose(0, 1).contiguous().transpose(0, 1), k, positions, cache)
