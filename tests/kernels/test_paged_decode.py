import pytest
import torch

from bitfold.kernels.paged_decode import paged_decode, paged_decode_ref, split_plan

from ._util import (DEVICE, assert_close, attention_f64, gather_f64, make_paged_kv, need_triton, randn,
                    skip_interpreted_bf16_dot)

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

# (block_size, num_kv_heads, group, head_dim, context_lens, sliding_window, dtype, kernel knobs)
CASES = {
    # one token, exactly one block, one past it, ragged; GQA 1 -> broadcast-reduce path
    "mha-edges": (16, 2, 1, 64, [1, 16, 17, 45], 0, F32, {}),
    # GQA 4, split-K with a merge; contexts end on / one past a 32-token page
    "gqa4-splits": (32, 2, 4, 128, [32, 33, 70], 0, F32, dict(num_splits=3, block_n=16)),
    # GQA 8, sliding window spanning splits; window start not page-aligned
    "gqa8-window": (16, 1, 8, 64, [5, 40, 100], 40, F32, dict(min_split_tokens=16, block_n=16)),
    # default knobs, long enough that the auto plan picks 2 splits of 320 tokens
    "auto-long": (16, 1, 8, 64, [600], 0, F32, {}),
    # forced paths: tl.dot with one real row padded to 16; broadcast with 4 rows
    "dot-mha": (16, 2, 1, 64, [20, 49], 0, F32, dict(use_dot=True, num_splits=2, block_n=16)),
    "bcast-gqa4": (16, 2, 4, 64, [20, 49], 7, F32, dict(use_dot=False, num_splits=2, block_n=16)),
    # a wider ragged batch: block_size 32, GQA 8, head_dim 128, window on, auto plan
    "ragged-gqa8-d128": (32, 2, 8, 128, [3, 31, 32, 64, 65, 90], 50, F32, dict(min_split_tokens=16, block_n=16)),
    "fp16-gqa4": (16, 2, 4, 64, [17, 48], 0, F16, dict(num_splits=2, block_n=16)),
    "bf16-mha": (16, 2, 1, 128, [16, 33], 0, BF16, dict(num_splits=2, block_n=16)),
    "bf16-gqa4": (16, 2, 4, 64, [17, 48], 10, BF16, dict(block_n=16)),
}


def _inputs(case, seed=0):
    block_size, hkv, group, d, lens, window, dtype, knobs = CASES[case]
    gen = torch.Generator().manual_seed(seed)
    k_cache, v_cache, tables, ctx = make_paged_kv(lens, block_size, hkv, d, dtype, gen)
    q = randn(len(lens), hkv * group, d, dtype=dtype, gen=gen)
    return q, k_cache, v_cache, tables, ctx, d ** -0.5, window, knobs


@pytest.mark.parametrize("case", CASES)
def test_ref_matches_float64(case):
    q, k_cache, v_cache, tables, ctx, scale, window, _ = _inputs(case)
    out = paged_decode_ref(q, k_cache, v_cache, tables, ctx, scale, window)
    for b, n in enumerate(ctx.tolist()):
        k, v = gather_f64(k_cache, tables, b, n), gather_f64(v_cache, tables, b, n)
        expected = attention_f64(q[b:b + 1], k, v, [n - 1], scale, window)[0]
        assert_close(out[b], expected, q.dtype)


@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_ref(case):
    need_triton()
    q, k_cache, v_cache, tables, ctx, scale, window, knobs = _inputs(case)
    use_dot = knobs.get("use_dot", q.shape[1] > k_cache.shape[2])
    if use_dot:
        skip_interpreted_bf16_dot(q.dtype)
    out = paged_decode(q, k_cache, v_cache, tables, ctx, scale, window, **knobs)
    assert_close(out, paged_decode_ref(q, k_cache, v_cache, tables, ctx, scale, window), q.dtype, kernel=True)


@pytest.mark.parametrize("window", [0, 40])
@pytest.mark.parametrize("bound", [400, 100_000])
def test_upper_bound_max_context_len(bound, window):
    """The engine may pass any upper bound (CUDA graphs pass the model's max length): each
    sequence re-cuts its own span into the launched splits, the merge must agree."""
    need_triton()
    q, k_cache, v_cache, tables, ctx, scale, _, _ = _inputs("gqa4-splits")
    out = paged_decode(q, k_cache, v_cache, tables, ctx, scale, window, max_context_len=bound,
                       min_split_tokens=16, block_n=16)
    assert_close(out, paged_decode_ref(q, k_cache, v_cache, tables, ctx, scale, window), q.dtype)


def test_split_plan():
    # short context or a batch that already fills the GPU: one split, no merge kernel
    assert split_plan(programs=8, span=200, sms=132, block_n=64, min_split_tokens=256) == (1, 256)
    assert split_plan(programs=512, span=8192, sms=132, block_n=64, min_split_tokens=256)[0] == 1
    # one long sequence: split until ~2 waves, whole tiles, covering the span
    n, tokens = split_plan(programs=8, span=4096, sms=132, block_n=64, min_split_tokens=256)
    assert n == 16 and tokens == 256
    n, tokens = split_plan(programs=1, span=1000, sms=132, block_n=64, min_split_tokens=256)
    assert tokens % 64 == 0 and n * tokens >= 1000 and (n - 1) * tokens < 1000


def test_empty_batch_and_bad_inputs():
    q, k_cache, v_cache, tables, ctx, scale, _, _ = _inputs("mha-edges")
    for fn in (paged_decode, paged_decode_ref):
        assert fn(q[:0], k_cache, v_cache, tables[:0], ctx[:0], scale).shape == (0, *q.shape[1:])
        with pytest.raises(ValueError, match="context_lens must be int32"):
            fn(q, k_cache, v_cache, tables, ctx.long(), scale)
        with pytest.raises(ValueError, match="share one float dtype"):
            fn(q.half(), k_cache, v_cache, tables, ctx, scale)
        with pytest.raises(ValueError, match="multiple of num_kv_heads"):
            fn(q[:, :1].contiguous(), k_cache, v_cache, tables, ctx, scale)
        with pytest.raises(ValueError, match="q must be contiguous"):
            fn(q.transpose(0, 1).contiguous().transpose(0, 1), k_cache, v_cache, tables, ctx, scale)


@pytest.mark.parametrize("case", ["mha-edges", "ragged-gqa8-d128"])
def test_unwritten_cache_slots_never_leak(case):
    """The engine allocates KV pages uninitialized: poison every slot no sequence owns with
    NaN; the ref and the kernel must give the same finite result as before."""
    q, k_cache, v_cache, tables, ctx, scale, window, knobs = _inputs(case)
    expected = paged_decode_ref(q, k_cache, v_cache, tables, ctx, scale, window)
    bs = k_cache.shape[1]
    owned = torch.zeros(k_cache.shape[:2], dtype=torch.bool, device=k_cache.device)
    for b, n in enumerate(ctx.tolist()):
        p = torch.arange(n, device=k_cache.device)
        owned[tables[b].long()[p // bs], p % bs] = True
    k_cache[~owned] = float("nan")
    v_cache[~owned] = float("nan")
    out = paged_decode_ref(q, k_cache, v_cache, tables, ctx, scale, window)
    assert torch.isfinite(out).all()
    assert_close(out, expected, q.dtype)
    if knobs.get("use_dot", q.shape[1] > k_cache.shape[2]) and q.dtype == torch.bfloat16:
        return
    need_triton()
    assert_close(paged_decode(q, k_cache, v_cache, tables, ctx, scale, window, **knobs), expected, q.dtype, kernel=True)


def _new_kv(q, k_cache, tables, ctx, gen, skip_row=None):
    """Random K/V of each sequence's newest token and the slot of position ctx-1; the slot of
    `skip_row` is -1 (a CUDA-graph padding row: written nowhere, still attended)."""
    B, hkv, d, bs = q.shape[0], k_cache.shape[2], k_cache.shape[3], k_cache.shape[1]
    new_k = randn(B, hkv, d, dtype=q.dtype, gen=gen)
    new_v = randn(B, hkv, d, dtype=q.dtype, gen=gen)
    slots = [int(tables[b, (n - 1) // bs]) * bs + (n - 1) % bs for b, n in enumerate(ctx.tolist())]
    if skip_row is not None:
        slots[skip_row] = -1
    return new_k, new_v, torch.tensor(slots, dtype=torch.int64, device=q.device)


@pytest.mark.parametrize("case", ["mha-edges", "gqa4-splits", "gqa8-window", "auto-long", "ragged-gqa8-d128",
                                  "bcast-gqa4", "fp16-gqa4", "bf16-mha", "bf16-gqa4"])
def test_fused_kv_write(case):
    """new_k/new_v/slot_mapping: the launch writes the new token's K/V (as write_kv would) and
    attends to it; the slot is poisoned with NaN first, so a program that read it from the
    cache before the write landed would fail."""
    q, k_cache, v_cache, tables, ctx, scale, window, knobs = _inputs(case)
    if knobs.get("use_dot", q.shape[1] > k_cache.shape[2]):
        skip_interpreted_bf16_dot(q.dtype)
    need_triton()
    gen = torch.Generator().manual_seed(7)
    skip = 1 if q.shape[0] > 1 else None
    new_k, new_v, slots = _new_kv(q, k_cache, tables, ctx, gen, skip_row=skip)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    expected = paged_decode_ref(q, ref_k, ref_v, tables, ctx, scale, window, new_k=new_k, new_v=new_v,
                                slot_mapping=slots)
    flat_k, flat_v = k_cache.view(-1, *k_cache.shape[2:]), v_cache.view(-1, *v_cache.shape[2:])
    live = slots[slots >= 0]
    flat_k[live], flat_v[live] = float("nan"), float("nan")
    if skip is not None:  # the skipped row's own new-token slot: never written, never read
        bs, n = k_cache.shape[1], int(ctx[skip]) - 1
        own = int(tables[skip, n // bs]) * bs + n % bs
        flat_k[own], flat_v[own] = float("nan"), float("nan")
    out = paged_decode(q, k_cache, v_cache, tables, ctx, scale, window, new_k=new_k, new_v=new_v, slot_mapping=slots,
                       **knobs)
    assert_close(out, expected, q.dtype, kernel=True)
    if skip is not None:
        flat_k[own], flat_v[own] = ref_k.view_as(flat_k)[own], ref_v.view_as(flat_v)[own]
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v), "the cache must hold what write_kv writes"


def test_fused_ref_equals_write_then_decode():
    q, k_cache, v_cache, tables, ctx, scale, window, _ = _inputs("ragged-gqa8-d128")
    new_k, new_v, slots = _new_kv(q, k_cache, tables, ctx, torch.Generator().manual_seed(3))
    from bitfold.kernels.kv_write import write_kv_ref

    k2, v2 = k_cache.clone(), v_cache.clone()
    write_kv_ref(k2, v2, new_k, new_v, slots)
    expected = paged_decode_ref(q, k2, v2, tables, ctx, scale, window)
    out = paged_decode_ref(q, k_cache, v_cache, tables, ctx, scale, window, new_k=new_k, new_v=new_v, slot_mapping=slots)
    assert torch.equal(out, expected) and torch.equal(k_cache, k2) and torch.equal(v_cache, v2)
    with pytest.raises(ValueError, match="go together"):
        paged_decode_ref(q, k_cache, v_cache, tables, ctx, scale, new_k=new_k)
    with pytest.raises(ValueError, match="slot_mapping must be int64"):
        paged_decode_ref(q, k_cache, v_cache, tables, ctx, scale, new_k=new_k, new_v=new_v, slot_mapping=slots.int())


@pytest.mark.parametrize("case", ["mha-edges", "gqa4-splits", "gqa8-window", "ragged-gqa8-d128", "bcast-gqa4",
                                  "fp16-gqa4", "bf16-gqa4"])
def test_fused_rotary(case):
    """rope=: q and the new K arrive before rotary, as strided views of one fused q|k|v row per
    token (the model's layout), and the launch rotates them (rotary fused into the KV write).
    Against rotary_ref + the reference decode: the same output, and the cache holds the rotated
    K (rounded to the cache's dtype as the rotary kernel rounds it) and the given V."""
    from bitfold.kernels.rotary import rotary_ref
    from bitfold.layers.rotary import cos_sin_cache

    q, k_cache, v_cache, tables, ctx, scale, window, knobs = _inputs(case)
    if knobs.get("use_dot", q.shape[1] > k_cache.shape[2]):
        skip_interpreted_bf16_dot(q.dtype)
    need_triton()
    B, H, D = q.shape
    hkv = k_cache.shape[2]
    gen = torch.Generator().manual_seed(11)
    new_k, new_v, slots = _new_kv(q, k_cache, tables, ctx, gen, skip_row=1 if B > 1 else None)
    fused = torch.cat([q.reshape(B, -1), new_k.reshape(B, -1), new_v.reshape(B, -1)], dim=1)  # [B, (H + 2 KVH) D]
    qv, kv, vv = (t.view(B, -1, D) for t in fused.split([H * D, hkv * D, hkv * D], dim=1))
    assert qv.stride(0) == (H + 2 * hkv) * D  # strided: no copies
    pos = (ctx.long() - 1) * 3 + 5  # positions need not equal the context length
    cs = cos_sin_cache(D, int(pos.max()) + 1, 10000.0, None).to(q.device)
    qr, kr = rotary_ref(qv, kv, pos, cs)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    expected = paged_decode_ref(qr, ref_k, ref_v, tables, ctx, scale, window, new_k=kr, new_v=new_v, slot_mapping=slots)
    out = paged_decode(qv, k_cache, v_cache, tables, ctx, scale, window, new_k=kv, new_v=vv, slot_mapping=slots,
                       rope=(pos, cs), **knobs)
    assert_close(out, expected, q.dtype, kernel=True)
    assert torch.allclose(k_cache.float(), ref_k.float(), atol=1e-5 if q.dtype == F32 else 1e-2, rtol=0)
    assert torch.equal(v_cache, ref_v)
    assert torch.equal(paged_decode_ref(qv, k_cache.clone(), v_cache.clone(), tables, ctx, scale, window, new_k=kv,
                                        new_v=vv, slot_mapping=slots, rope=(pos, cs)), expected)
    with pytest.raises(ValueError, match="rope= rotates the new K too"):
        paged_decode(qv, k_cache, v_cache, tables, ctx, scale, window, rope=(pos, cs))
