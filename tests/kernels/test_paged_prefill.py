import pytest
import torch

from bitfold.kernels.paged_prefill import paged_prefill, paged_prefill_ref

from ._util import (DEVICE, assert_close, attention_f64, gather_f64, make_paged_kv, need_triton, randn,
                    skip_interpreted_bf16_dot)

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
SMALL = dict(block_m=16, block_n=16)  # several tiles per sequence at interpreter-friendly sizes

# (block_size, num_kv_heads, group, head_dim, context_lens, q_lens, sliding_window, dtype, knobs)
CASES = {
    # plain prefill: one token, exactly one block, one past it, a tile-straddling length
    "prefill-edges": (16, 2, 1, 64, [1, 16, 17, 35], [1, 16, 17, 35], 0, F32, SMALL),
    # chunked prefill with cached prefixes, decode-like q_len 1 rows mixed in, GQA 8, d=128
    "chunked-gqa8": (16, 1, 8, 128, [40, 33, 5, 64], [8, 1, 5, 1], 0, F32, SMALL),
    # sliding window narrower than a tile, block_size 32, GQA 4
    "window-gqa4": (32, 2, 4, 64, [50, 30, 64], [20, 30, 1], 12, F32, SMALL),
    # default 64x64 tiles
    "default-tiles": (16, 2, 4, 64, [70, 20, 16], [70, 3, 16], 0, F32, {}),
    # block_size 32, GQA 8, head_dim 128: page-boundary contexts, chunks, q_len 1, window
    "ragged-gqa8-d128": (32, 1, 8, 128, [32, 33, 64, 65, 9], [32, 1, 20, 65, 1], 24, F32, SMALL),
    "fp16-chunked": (16, 2, 4, 64, [48, 17], [16, 17], 20, F16, SMALL),
    "bf16-chunked": (16, 2, 4, 64, [48, 17], [16, 17], 0, BF16, SMALL),
}


def _inputs(case, seed=0):
    block_size, hkv, group, d, lens, q_lens, window, dtype, knobs = CASES[case]
    gen = torch.Generator().manual_seed(seed)
    k_cache, v_cache, tables, ctx = make_paged_kv(lens, block_size, hkv, d, dtype, gen)
    cu = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(DEVICE)
    q = randn(sum(q_lens), hkv * group, d, dtype=dtype, gen=gen)
    return q, k_cache, v_cache, tables, cu, ctx, d ** -0.5, window, knobs


@pytest.mark.parametrize("case", CASES)
def test_ref_matches_float64(case):
    q, k_cache, v_cache, tables, cu, ctx, scale, window, _ = _inputs(case)
    out = paged_prefill_ref(q, k_cache, v_cache, tables, cu, ctx, scale, window)
    bounds = cu.tolist()
    for b, n in enumerate(ctx.tolist()):
        s, e = bounds[b], bounds[b + 1]
        k, v = gather_f64(k_cache, tables, b, n), gather_f64(v_cache, tables, b, n)
        positions = list(range(n - (e - s), n))
        assert_close(out[s:e], attention_f64(q[s:e], k, v, positions, scale, window), q.dtype)


@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_ref(case):
    need_triton()
    q, k_cache, v_cache, tables, cu, ctx, scale, window, knobs = _inputs(case)
    skip_interpreted_bf16_dot(q.dtype)
    out = paged_prefill(q, k_cache, v_cache, tables, cu, ctx, scale, window, **knobs)
    assert_close(out, paged_prefill_ref(q, k_cache, v_cache, tables, cu, ctx, scale, window), q.dtype, kernel=True)


def test_empty_and_bad_inputs():
    q, k_cache, v_cache, tables, cu, ctx, scale, _, _ = _inputs("prefill-edges")
    for fn in (paged_prefill, paged_prefill_ref):
        empty_cu = torch.zeros(1, dtype=torch.int32, device=DEVICE)
        assert fn(q[:0], k_cache, v_cache, tables[:0], empty_cu, ctx[:0], scale).shape == (0, *q.shape[1:])
        with pytest.raises(ValueError, match=r"cu_seqlens_q must be int32 \[B\+1"):
            fn(q, k_cache, v_cache, tables, cu[:-1], ctx, scale)
        with pytest.raises(ValueError, match="block_tables must be int32"):
            fn(q, k_cache, v_cache, tables.long(), cu, ctx, scale)
        with pytest.raises(ValueError, match="head_dim"):
            fn(q[..., :32].contiguous(), k_cache, v_cache, tables, cu, ctx, scale)
