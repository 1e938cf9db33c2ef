"""Shared helpers for the kernel tests: devices, tolerances, random paged caches and the
float64 oracles that never go through the code under test."""
import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = DEVICE == "cpu"

# (atol, rtol) for comparing a result rounded to `dtype` against float32/float64 math.
TOL = {torch.float32: (1e-5, 1e-4), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.5e-2, 1e-2)}


def need_triton():
    """Skip the kernel half of a test where Triton is missing; the ref half still runs."""
    pytest.importorskip("triton")
    if INTERPRETED:
        assert os.environ.get("TRITON_INTERPRET") == "1", "conftest.py must set TRITON_INTERPRET before Triton loads"


def skip_interpreted_bf16_dot(dtype):
    """Triton's interpreter stores bf16 as uint16 and its tl.dot multiplies the raw bit
    patterns (triton-lang/triton#11584, "we just don't support it yet"); those kernel paths
    are covered only when the suite runs on a GPU."""
    if INTERPRETED and dtype == torch.bfloat16:
        pytest.skip("Triton interpreter cannot run bf16 tl.dot (triton-lang/triton#11584)")


def assert_close(actual, expected, dtype, kernel=False):
    """`kernel=True` marks a Triton result: under the interpreter, fp32 -> bf16 casts
    truncate instead of rounding to nearest (a GPU rounds), so a kernel that rounds twice
    (e.g. the fused residual, then the output) may sit 2 bf16 ulps from the ref."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert not torch.isnan(actual).any(), "NaN in output"
    atol, rtol = TOL[dtype]
    if kernel and INTERPRETED and dtype == torch.bfloat16:
        atol, rtol = 2 * atol, 2 * rtol
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), atol=atol, rtol=rtol)


def randn(*shape, dtype=torch.float32, gen=None):
    return torch.randn(*shape, generator=gen, dtype=torch.float32).to(dtype).to(DEVICE)


def make_paged_kv(context_lens, block_size, num_kv_heads, head_dim, dtype, gen, spare_blocks=3):
    """Random caches plus shuffled, non-contiguous block tables; unused entries are -1 so a
    kernel that follows one reads out of bounds (or wrong data) and fails."""
    need = [-(-n // block_size) for n in context_lens]
    num_blocks = sum(need) + spare_blocks
    perm = torch.randperm(num_blocks, generator=gen)
    width = max(need) + 1  # one never-used column past every sequence
    tables = torch.full((len(context_lens), width), -1, dtype=torch.int32)
    used = 0
    for b, n in enumerate(need):
        tables[b, :n] = perm[used:used + n].to(torch.int32)
        used += n
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache, v_cache = randn(*shape, dtype=dtype, gen=gen), randn(*shape, dtype=dtype, gen=gen)
    lens = torch.tensor(context_lens, dtype=torch.int32, device=DEVICE)
    return k_cache, v_cache, tables.to(DEVICE), lens


def gather_f64(cache, tables, b, length):
    """Sequence b's first `length` cached rows, `[length, num_kv_heads, head_dim]` float64,
    one position at a time straight from the paging rule."""
    bs = cache.shape[1]
    rows = [cache[int(tables[b, p // bs]), p % bs] for p in range(length)]
    return torch.stack(rows).double().cpu()


def attention_f64(q, k, v, q_positions, scale, window):
    """Masked softmax attention in float64 with an explicit loop over heads.
    q: `[n, H, D]`; k, v: `[L, Hkv, D]`; q_positions: absolute position of each query row."""
    q = q.double().cpu()
    n, H, _ = q.shape
    group = H // k.shape[1]
    kv_pos = torch.arange(k.shape[0], dtype=torch.float64)
    qp = torch.tensor(q_positions, dtype=torch.float64)[:, None]
    allowed = (kv_pos[None, :] <= qp)
    if window > 0:
        allowed &= qp - kv_pos[None, :] < window
    out = torch.empty_like(q)
    for h in range(H):
        kh = h // group
        s = (q[:, h] @ k[:, kh].T) * scale
        s = s.masked_fill(~allowed, float("-inf"))
        out[:, h] = torch.softmax(s, dim=-1) @ v[:, kh]
    return out
