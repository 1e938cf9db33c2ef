"""The C++ CPU decode ops against the PyTorch references they stand in for (random inputs, edge
sizes: one token, block boundaries, GQA ratios 1/4/8, head dims 64/128, sliding windows)."""
import pytest
import torch

from bitfold.kernels import cpu_ops
from bitfold.kernels.paged_decode import paged_decode_ref
from bitfold.kernels.rms_norm import fused_add_rms_norm_ref, rms_norm_ref
from bitfold.kernels.rotary import rotary_ref
from bitfold.kernels.silu_mul import silu_and_mul_ref
from bitfold.layers.rotary import cos_sin_cache

pytestmark = pytest.mark.skipif(not cpu_ops.available(), reason="the C++ CPU kernels could not be built")


@pytest.mark.parametrize("T,D", [(1, 64), (3, 576), (17, 1536), (2, 7)])
def test_rms_norm(T, D):
    g = torch.Generator().manual_seed(T * D)
    x, r, w = torch.randn(T, D, generator=g), torch.randn(T, D, generator=g), torch.randn(D, generator=g)
    torch.testing.assert_close(cpu_ops.add_rms_norm(x, None, w, 1e-6), rms_norm_ref(x, w, 1e-6), rtol=1e-5, atol=1e-5)
    out, res = cpu_ops.add_rms_norm(x, r, w, 1e-5)
    out_ref, res_ref = fused_add_rms_norm_ref(x, r, w, 1e-5)
    torch.testing.assert_close(res, res_ref, rtol=0, atol=0)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T,H,KVH,D", [(1, 9, 3, 64), (5, 32, 8, 128), (3, 4, 4, 64)])
def test_rotary(T, H, KVH, D):
    cache = cos_sin_cache(D, 300, 10000.0, None)
    g = torch.Generator().manual_seed(T)
    q, k = torch.randn(T, H, D, generator=g), torch.randn(T, KVH, D, generator=g)
    pos = torch.randint(0, 300, (T,), generator=g)
    pos[0] = 299
    qa, ka = cpu_ops.rotary(q, k, pos, cache)
    qb, kb = rotary_ref(q, k, pos, cache)
    torch.testing.assert_close(qa, qb, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ka, kb, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="beyond the rotary cache"):
        cpu_ops.rotary(q, k, pos + 300, cache)


@pytest.mark.parametrize("lens", [[1], [16], [17, 33], [5, 64, 1, 100], [1500]])
@pytest.mark.parametrize("H,KVH,D", [(4, 4, 64), (8, 2, 64), (16, 2, 128), (6, 3, 80)])  # 80: the any-D path
@pytest.mark.parametrize("window", [0, 9, 2000])
def test_paged_decode(lens, H, KVH, D, window):
    g = torch.Generator().manual_seed(sum(lens) + H + window)
    bs, nblocks = 16, 100
    kc, vc = torch.randn(nblocks, bs, KVH, D, generator=g), torch.randn(nblocks, bs, KVH, D, generator=g)
    B, maxb = len(lens), -(-max(lens) // bs)
    tables = torch.randperm(nblocks, generator=g)[: B * maxb].view(B, maxb).to(torch.int32)
    ctx = torch.tensor(lens, dtype=torch.int32)
    q = torch.randn(B, H, D, generator=g)
    out = cpu_ops.paged_decode(q, kc, vc, tables, ctx, D**-0.5, window)
    ref = paged_decode_ref(q, kc, vc, tables, ctx, D**-0.5, window)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_engine_picks_cpu_backend_for_float32(smollm2_llm):
    assert smollm2_llm.engine.runner.backend.name == "cpu"


@pytest.mark.parametrize("skip_slot", [False, True])
def test_paged_decode_fused_write(skip_slot):
    g = torch.Generator().manual_seed(5)
    bs, KVH, H, D = 16, 2, 8, 64
    kc, vc = torch.randn(10, bs, KVH, D, generator=g), torch.randn(10, bs, KVH, D, generator=g)
    tables = torch.tensor([[3, 7, 1], [2, 5, 9]], dtype=torch.int32)
    lens = torch.tensor([20, 33], dtype=torch.int32)
    slots = torch.tensor([7 * bs + 3, 9 * bs + 0], dtype=torch.int64)
    if skip_slot:
        slots[1] = -1
    q, nk, nv = (torch.randn(2, n, D, generator=g) for n in (H, KVH, KVH))
    k1, v1, k2, v2 = kc.clone(), vc.clone(), kc.clone(), vc.clone()
    out = cpu_ops.paged_decode(q, k1, v1, tables, lens, 0.1, 0, new_k=nk, new_v=nv, slot_mapping=slots)
    ref = paged_decode_ref(q, k2, v2, tables, lens, 0.1, 0, new_k=nk, new_v=nv, slot_mapping=slots)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(k1, k2) and torch.equal(v1, v2)  # same cache writes


@pytest.mark.parametrize("T,I", [(1, 8960), (3, 160), (2, 7)])
def test_silu_mul(T, I):
    g = torch.Generator().manual_seed(T * I)
    x = torch.randn(T, 2 * I, generator=g) * 6
    x[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -88.5])  # saturating exp, both ends
    torch.testing.assert_close(cpu_ops.silu_mul(x), silu_and_mul_ref(x), rtol=1e-6, atol=1e-6)
    nan = torch.full((1, 2 * I), float("nan"))
    assert cpu_ops.silu_mul(nan).isnan().all()
