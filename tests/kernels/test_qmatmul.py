"""kernels/qmatmul.py: the plane packing against a bit-by-bit oracle, and every kernel (GEMV
register path, tensor-core GEMM, dequantize + matmul) against the reference and a float64
oracle built from the codes before packing, for every plane split, scale kind (fp16 scales and
mins, symmetric, K-quant super-blocks with signed, unsigned and nibble-packed sub-scales),
group size, edge shapes (K not a multiple of the tile or the group, N not a multiple of the
block, one row) and launch configuration. Runs through Triton's interpreter on the CPU."""
from __future__ import annotations

import pytest
import torch

from bitfold.kernels import qmatmul as qm

from ._util import DEVICE, assert_close, need_triton, skip_interpreted_bf16_dot


def make_weight(n: int, k: int, layout: qm.QLayout, seed: int = 0):
    """A random QWeight and its float64 oracle [n, k], computed from the codes and scales
    directly (not through the kernel file)."""
    g = torch.Generator().manual_seed(seed)
    kp = layout.padded(k)
    q = torch.randint(0, 2**layout.bits, (n, kp), dtype=torch.uint8, generator=g)
    groups = kp // layout.group if layout.group else 1
    gsize = layout.group or kp
    sub = sub_min = mins = None
    if layout.super_block:
        nsup = kp // layout.super_block
        scales = (torch.rand(n, nsup, generator=g) * 0.01 + 1e-3).half()
        if layout.min_kind == "nibble":
            sub = torch.randint(0, 256, (n, groups), dtype=torch.uint8, generator=g)
            s_sub, m_sub = (sub & 15).double(), (sub >> 4).double()
        else:
            lo, hi = (-32, 32) if layout.zero else (0, 64)
            sub = torch.randint(lo, hi, (n, groups), dtype=torch.int8, generator=g)
            s_sub = sub.double()
            if layout.min_kind == "sub":
                sub_min = torch.randint(0, 64, (n, groups), dtype=torch.uint8, generator=g)
                m_sub = sub_min.double()
        per = layout.super_block // layout.group
        d = scales.double().repeat_interleave(per, 1)
        s = d * s_sub
        m = None
        if layout.min_kind in ("sub", "nibble"):
            mins = (torch.rand(n, nsup, generator=g) * 0.01).half()
            m = -mins.double().repeat_interleave(per, 1) * m_sub
    else:
        scales = (torch.rand(n, groups, generator=g) * 0.05 + 1e-3).half()
        s = scales.double()
        m = None
        if layout.min_kind == "fp16":
            mins = (torch.randn(n, groups, generator=g) * 0.05).half()
            m = mins.double()
    w64 = (q.double().view(n, groups, gsize) - layout.zero) * s[..., None]
    if m is not None:
        w64 = w64 + m[..., None]
    w64 = w64.reshape(n, kp)[:, :k]
    to = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    w = qm.QWeight(layout, n, k, [p.to(DEVICE) for p in qm.pack_codes(q, layout.planes)], to(scales), to(mins),
                   to(sub), to(sub_min))
    return w, w64, q


LAYOUTS = {
    "int4-g32": qm.QLayout((4,), 32), "int3-g64": qm.QLayout((2, 1), 64), "int2-g128": qm.QLayout((2,), 128),
    "int1-g16": qm.QLayout((1,), 16), "int5-g32": qm.QLayout((4, 1), 32), "int6-g16": qm.QLayout((4, 2), 16),
    "int8-ch": qm.QLayout((8,), 0, 128, "none"), "q4_0": qm.QLayout((4,), 32, 8, "none"),
    "q4_k": qm.QLayout((4,), 32, 0, "sub", 256), "q6_k": qm.QLayout((4, 2), 16, 32, "none", 256),
    "q3_k": qm.QLayout((2, 1), 16, 4, "none", 256), "q2_k": qm.QLayout((2,), 16, 0, "nibble", 256),
}


@pytest.mark.parametrize("bits", sorted(qm.PLANES))
def test_pack_codes_bit_by_bit(bits):
    planes = qm.PLANES[bits]
    q = torch.randint(0, 2**bits, (3, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(bits))
    packed = qm.pack_codes(q, planes)
    shift = 0
    for p, t in zip(planes, packed):
        per = 32 // p
        assert t.dtype == torch.int32 and t.shape == (3, 96 // per)
        for row in range(3):
            for k in range(96):  # code k = 32 t + p j + w: field j (bits p*j..) of word p t + w
                tile, j, w = k // 32, (k % 32) // p, k % p
                word = int(t[row, p * tile + w]) & 0xFFFFFFFF
                assert (word >> (p * j)) & ((1 << p) - 1) == (int(q[row, k]) >> shift) & ((1 << p) - 1)
        shift += p
    assert torch.equal(qm.unpack_codes(packed, planes, 96), q)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_reference_matches_float64_oracle(name):
    w, w64, _ = make_weight(24, 300, LAYOUTS[name])
    torch.testing.assert_close(qm.dequantize_ref(w).cpu().double(), w64, rtol=1e-6, atol=1e-7)
    x = torch.randn(3, 300, device=DEVICE)
    assert_close(qm.qmatmul_ref(x, w), x.double() @ w64.to(x.device).T, torch.float32)


# (kind, M, config): the register GEMV with one, two and four rows (and rows that do not fill
# BLOCK_M), the tl.dot GEMM with rows past one tile, the dequantize + matmul path.
CASES = [("gemv", 1, (1, 8, 64, 4, 1)), ("gemv", 3, (4, 4, 128, 4, 1)), ("gemv", 2, (2, 16, 32, 4, 1)),
         ("gemm", 20, (16, 16, 32, 4, 1)), ("gemm", 5, (16, 32, 128, 4, 1)), ("dequant", 4, None)]


@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("kind,M,config", CASES, ids=[f"{c[0]}-m{c[1]}" for c in CASES])
def test_kernels_match_oracle(name, kind, M, config):
    need_triton()
    n, k = 36, 296  # N not a multiple of any block; K not a multiple of 32 (masked columns past K)
    w, w64, _ = make_weight(n, k, LAYOUTS[name], seed=M)
    x = torch.randn(M, k, device=DEVICE)
    out = torch.full((M, n), float("nan"), device=DEVICE)
    y = qm.qmatmul(x, w, kind=kind, config=config, out=out)
    assert y is out
    ref = x.double() @ w64.to(x.device).T
    # float32 products and sums (ieee dots); a zero point folded into the min (Q6_K: q - 32) sums
    # terms ~32x the output, so the absolute error scales with the largest output, not each one
    torch.testing.assert_close(y.double().cpu(), ref.cpu(), rtol=1e-4, atol=2e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind,M", [("gemv", 1), ("gemm", 17), ("dequant", 2)])
def test_half_precision(dtype, kind, M):
    need_triton()
    if kind != "gemv":
        skip_interpreted_bf16_dot(dtype)
    w, w64, _ = make_weight(40, 256, LAYOUTS["int4-g32"], seed=7)
    x = torch.randn(M, 256, device=DEVICE).to(dtype)
    y = qm.qmatmul(x, w, kind=kind)
    assert y.dtype == dtype
    # the GEMM rounds the dequantized tile to x's dtype before tl.dot: one more rounding
    assert_close(y, x.double() @ w64.to(x.device).T, torch.bfloat16 if kind != "gemv" else dtype, kernel=True)


def test_dequantize_kernel_is_exact():
    need_triton()
    for name in ("int3-g64", "q4_k", "q2_k", "int8-ch"):
        w, w64, _ = make_weight(20, 200, LAYOUTS[name], seed=3)
        d = qm.dequantize(w, torch.float32, block_n=8, block_k=64)
        torch.testing.assert_close(d.cpu().double(), w64, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("M", [1, 16, 17, 600])
def test_default_strategy_and_configs(M):
    need_triton()
    w, w64, _ = make_weight(64, 512, LAYOUTS["int4-g32"], seed=M)
    x = torch.randn(M, 512, device=DEVICE).half()
    assert qm.strategy(M) == ("gemv" if M <= qm.GEMV_MAX_ROWS else "gemm" if M < qm.DEQUANT_MIN_ROWS else "dequant")
    assert_close(qm.qmatmul(x, w), x.double() @ w64.to(x.device).T, torch.bfloat16, kernel=True)


def test_empty_and_bad_inputs():
    w, _, _ = make_weight(8, 64, LAYOUTS["int4-g32"])
    assert qm.qmatmul(torch.randn(0, 64, device=DEVICE), w).shape == (0, 8)
    with pytest.raises(ValueError, match=r"x must be \[M, K=64\]"):
        qm.qmatmul(torch.randn(2, 32, device=DEVICE), w)
    with pytest.raises(ValueError, match="contiguous along K"):
        qm.qmatmul(torch.randn(64, 2, device=DEVICE).t(), w)
    with pytest.raises(ValueError, match="4-bit plane must be"):
        qm.QWeight(w.layout, 8, 64, [w.planes[0][:, :4]], w.scales, w.mins)
    with pytest.raises(ValueError, match="needs mins"):
        qm.QWeight(w.layout, 8, 64, w.planes, w.scales, None)
    with pytest.raises(ValueError, match="planes must be"):
        qm.QLayout((3,), 32)


@pytest.mark.parametrize("name", [n for n, lay in LAYOUTS.items() if lay.planes == (4,)] + ["int4-ch"])
@pytest.mark.parametrize("M,config", [(1, None), (5, (16, 16, 64, 4, 1)), (17, (16, 32, 128, 4, 1)),
                                      (3, (16, 16, 32, 4, 1))])
def test_tensor_core_gemv_matches_oracle(name, M, config):
    """kind="tc": 4-bit codes as float16 1024 + q pairs on tensor cores (float16 activations), the
    group scale after the dot (groups >= the tile) or in the float16 tile (smaller groups)."""
    need_triton()
    lay = LAYOUTS.get(name) or qm.QLayout((4,), 0)
    n, k = 40, 296  # K not a multiple of 32 or of a tile: masked codes and activations
    w, w64, _ = make_weight(n, k, lay, seed=M)
    x = torch.randn(M, k, device=DEVICE)
    y = qm.qmatmul(x, w, kind="tc", config=config)
    ref = x.double() @ w64.to(x.device).T
    # activations rounded to float16 (and x / 16 for the high fields) before exact products
    torch.testing.assert_close(y.double().cpu(), ref.cpu(), rtol=2e-3, atol=2e-3 * float(ref.abs().max()))
    assert not qm.tc_supported(make_weight(8, 64, LAYOUTS["int3-g64"])[0])
    assert not qm.tc_supported(qm.QLayout((4,), 16))


def test_quantize_x_matches_reference():
    """_quant_x_kernel's packed int8 bytes, tile scales and sums against quantize_x_ref, with K
    not a multiple of 32 (zero-padded codes), a zero tile (scale 0, codes 0) and a large outlier."""
    need_triton()
    k, kp = 300, 320
    x = torch.randn(3, k, device=DEVICE)
    x[1, 32:64] = 0.0
    x[2, 5] = 900.0
    xq, xs, xsum = qm.quantize_x(x, kp)
    q, xs_ref, xsum_ref = qm.quantize_x_ref(x, kp)
    words = xq.cpu().view(3, kp // 32, 8)
    got = torch.zeros(3, kp)
    for b in range(4):  # word u of tile t, byte b: x[32 t + 8 b + u]
        byte = ((words << (24 - 8 * b)) >> 24).float()
        got.view(3, kp // 32, 4, 8)[:, :, b, :] = byte
    assert torch.equal(got, q.cpu())
    assert q.abs().max() <= 127 and torch.equal(q[1, 32:64].cpu(), torch.zeros(32))
    torch.testing.assert_close(xs.cpu(), xs_ref.cpu(), rtol=1e-6, atol=0)
    torch.testing.assert_close(xsum.cpu(), xsum_ref.cpu(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(LAYOUTS) + ["int4-ch"])
@pytest.mark.parametrize("M,config,fuse", [(1, None, False), (1, (1, 8, 64, 4, 1), False), (3, (4, 4, 128, 4, 1), False),
                                           (17, (16, 8, 32, 4, 1), False), (1, None, True), (3, (4, 4, 128, 4, 1), True)])
def test_dp4a_gemv_matches_reference(name, M, config, fuse):
    """kind="dp4a": int8 activations (per 32-code tile) against the weight fields in integer dot
    products. The kernel equals qmatmul_dp4a_ref up to float32 sums; that reference is within
    the int8 activations' rounding of the exact float64 product."""
    need_triton()
    lay = LAYOUTS.get(name) or qm.QLayout((4,), 0)
    n, k = 36, 296
    w, w64, _ = make_weight(n, k, lay, seed=M)
    x = torch.randn(M, k, generator=torch.Generator().manual_seed(M)).to(DEVICE)
    if not qm.dp4a_supported(w, fuse):  # groups of 16 need the GEMV's own half-tile sums of x
        with pytest.raises(ValueError, match="groups of >= 32"):
            qm.qmatmul(x, w, kind="dp4a", config=config, fuse_x=fuse)
        return
    y = qm.qmatmul(x, w, kind="dp4a", config=config, fuse_x=fuse)  # fuse: x quantized in the GEMV
    ref = qm.qmatmul_dp4a_ref(x, w)
    exact = x.double() @ w64.to(x.device).T
    scale = float(exact.abs().max())
    # Quantizing x inside the GEMV (fuse) computes x / tile scale in another float order than the
    # reference, so a value on a rounding edge may take the neighbouring int8 code: at most one
    # step of x (its tile absmax / 127) times one weight per differing code.
    step = float(x.abs().max()) / 127 * float(w64.abs().max()) * 1.01 if fuse else 0.0
    torch.testing.assert_close(y.double().cpu(), ref.double().cpu(), rtol=1e-5, atol=1e-5 * scale + step)
    # int8 activations: ~0.6% relative rounding per value, not a bug-sized error
    rel = float((ref.double() - exact).norm() / exact.norm())
    assert rel < 0.03, rel


def test_dp4a_default_and_refusals():
    need_triton()
    w, _, _ = make_weight(8, 64, LAYOUTS["int4-g32"])
    x = torch.randn(1, 64, device=DEVICE)
    assert torch.equal(qm.qmatmul(x, w), qm.qmatmul(x, w, kind="gemv"))  # DP4A_MAX_ROWS 0: not a default
    old, old_fx, old_g16 = qm.DP4A_MAX_ROWS, qm.DP4A_FUSE_X, qm.DP4A_G16
    try:
        qm.DP4A_MAX_ROWS = 16
        assert torch.equal(qm.qmatmul(x, w), qm.qmatmul(x, w, kind="dp4a"))
        w16, _, _ = make_weight(8, 64, LAYOUTS["q6_k"])  # groups of 16: dp4a, only with fused quantization
        assert torch.equal(qm.qmatmul(x, w16), qm.qmatmul(x, w16, kind="dp4a", fuse_x=True))
        qm.DP4A_G16 = False  # switched off: the float GEMV
        assert torch.equal(qm.qmatmul(x, w16), qm.qmatmul(x, w16, kind="gemv"))
        qm.DP4A_G16 = True
        qm.DP4A_FUSE_X = False
        assert torch.equal(qm.qmatmul(x, w16), qm.qmatmul(x, w16, kind="gemv"))
    finally:
        qm.DP4A_MAX_ROWS, qm.DP4A_FUSE_X, qm.DP4A_G16 = old, old_fx, old_g16
    with pytest.raises(ValueError, match="groups of >= 32"):
        qm.qmatmul(x, make_weight(8, 64, LAYOUTS["int1-g16"])[0], kind="dp4a", fuse_x=False)


@pytest.mark.parametrize("name", ["int4-g32", "q4_k", "int3-g64"])
@pytest.mark.parametrize("M", [1, 3])
def test_silu_mul_fused_into_dp4a(name, M, monkeypatch):
    """act="silu_mul": SwiGLU's down projection reads gate | up and computes silu(gate) * up in
    the dp4a GEMV's activation load; equal to the reference on silu(gate) * up computed first.
    Other kernels run the SiLU-and-multiply kernel first and then the product."""
    need_triton()
    from bitfold.kernels.ops import silu_and_mul_op
    from bitfold.kernels.silu_mul import silu_and_mul_ref

    n, k = 36, 296
    w, _, _ = make_weight(n, k, LAYOUTS[name], seed=M)
    h = torch.randn(M, 2 * k, generator=torch.Generator().manual_seed(M)).to(DEVICE)
    a = silu_and_mul_ref(h)
    from bitfold.kernels import ops

    calls = []
    real = ops.silu_and_mul_op
    monkeypatch.setattr(ops, "silu_and_mul_op", lambda x: calls.append(x.shape) or real(x))
    monkeypatch.setattr(qm, "DP4A_FUSE_ACT", True)  # measured slower on the H200: off by default
    y = qm.qmatmul(h, w, kind="dp4a", fuse_x=True, act="silu_mul")
    assert calls == []  # the activation computed inside the GEMV
    monkeypatch.setattr(qm, "DP4A_FUSE_ACT", False)
    qm.qmatmul(h, w, kind="dp4a", fuse_x=True, act="silu_mul")
    assert calls == [h.shape]  # the SiLU-and-multiply kernel first (the two can agree to the bit)
    ref = qm.qmatmul_dp4a_ref(a, w)
    scale = float(ref.abs().max())
    torch.testing.assert_close(y.double().cpu(), ref.double().cpu(), rtol=1e-4, atol=1e-4 * scale)
    for kind, fuse in (("gemv", None), ("dp4a", False)):
        y2 = qm.qmatmul(h, w, kind=kind, fuse_x=fuse, act="silu_mul")
        torch.testing.assert_close(y2, qm.qmatmul(silu_and_mul_op(h), w, kind=kind, fuse_x=fuse), rtol=0, atol=0)
    with pytest.raises(ValueError, match="gate \\| up"):
        qm.qmatmul(a, w, kind="dp4a", act="silu_mul")
    with pytest.raises(ValueError, match="unknown activation"):
        qm.qmatmul(h, w, act="gelu")
