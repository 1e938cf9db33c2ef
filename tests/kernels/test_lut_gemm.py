"""The LUT GEMM kernel (C++: AVX-512 / AVX2 / scalar) against its PyTorch reference, and the
reference against a float64 matmul of the dequantized weight (independent of the tables)."""
import pytest
import torch

from bitfold.kernels import lut_gemm as L

pytestmark = pytest.mark.skipif(not L.available(), reason="the LUT kernel could not be built (no C++ compiler?)")

ISA_ORDER = ["scalar", "avx2", "avx512"]


def isas():
    best = L.best_isa()
    return ISA_ORDER[: ISA_ORDER.index(best) + 1]


def random_packed(N, K, bits, group, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2**bits, (N, K), dtype=torch.uint8, generator=g)
    s = torch.rand(N, K // group, generator=g) * 0.1 + 1e-3
    m = -torch.rand(N, K // group, generator=g) * 0.2
    return q, s, m, L.pack_lut(q, s, m, bits, group)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("group", [8, 16, 32, 64, 128, 96])
@pytest.mark.parametrize("N", [1, 63, 64, 65, 130])
def test_pack_roundtrip(bits, group, N):
    K = 2 * group
    q, s, m, packed = random_packed(N, K, bits, group)
    q2, s2, m2 = L.unpack_lut(*packed, N, bits, group)
    assert torch.equal(q2, q) and torch.equal(s2, s.half()) and torch.equal(m2, m.half())
    assert packed[0].shape == (-(-N // 64), 2, 8 * group * bits)


CASES = [  # N, K, bits, group, B: one row, tile edges, odd group counts, every batch blocking (4/2/1)
    (1, 32, 4, 32, 1), (63, 64, 3, 32, 2), (64, 128, 2, 64, 3), (65, 96, 1, 32, 5), (130, 256, 4, 128, 7),
    (200, 384, 2, 128, 4), (64, 48, 4, 16, 1), (257, 512, 3, 64, 6), (128, 640, 4, 64, 9), (96, 80, 2, 8, 2),
    (70, 160, 4, 160, 3),
]


@pytest.mark.parametrize("isa", ISA_ORDER)
@pytest.mark.parametrize("N,K,bits,group,B", CASES)
def test_kernel_matches_reference(isa, N, K, bits, group, B):
    if isa not in isas():
        pytest.skip(f"this CPU lacks {isa}")
    _, _, _, packed = random_packed(N, K, bits, group, seed=N + K)
    x = torch.randn(B, K, generator=torch.Generator().manual_seed(B))
    ref = L.lut_gemm_ref(x, *packed, N, bits, group)
    y = L.lut_gemm(x, *packed, N, bits, group, isa=isa)
    # Integer table sums are exact in both; only fp32 vs fp64 rounding of the epilogue differs.
    assert (y - ref).abs().max() <= 2e-5 * ref.abs().max() + 1e-6


@pytest.mark.parametrize("N,K,bits,group,B", CASES[:6])
def test_reference_close_to_float64_matmul(N, K, bits, group, B):
    """The int8 tables are the only approximation: a few tenths of a percent of the output."""
    _, _, _, packed = random_packed(N, K, bits, group, seed=7)
    x = torch.randn(B, K, generator=torch.Generator().manual_seed(3))
    w = L.dequantize_ref(*packed, N, bits, group)
    exact = x.double() @ w.double().t()
    ref = L.lut_gemm_ref(x, *packed, N, bits, group).double()
    assert (ref - exact).norm() <= 0.02 * exact.norm()


def test_threads_do_not_change_results():
    _, _, _, packed = random_packed(1000, 256, 4, 64)
    x = torch.randn(3, 256)
    one = L.lut_gemm(x, *packed, 1000, 4, 64, num_threads=1)
    for _ in range(20):  # the pool is reused across calls
        assert torch.equal(L.lut_gemm(x, *packed, 1000, 4, 64, num_threads=2), one)


def test_zero_activation_and_zero_group():
    _, _, _, packed = random_packed(64, 64, 2, 32)
    x = torch.zeros(2, 64)
    x[1, 32:] = torch.randn(32)  # first group all zero: its table scale is 0
    y = L.lut_gemm(x, *packed, 64, 2, 32)
    assert torch.equal(y[0], torch.zeros(64))
    assert torch.allclose(y[1], L.lut_gemm_ref(x, *packed, 64, 2, 32)[1], rtol=1e-4, atol=1e-6)


def test_bad_arguments():
    _, _, _, packed = random_packed(64, 64, 4, 32)
    with pytest.raises(ValueError, match="does not match"):
        L.lut_gemm(torch.randn(1, 32), *packed, 64, 4, 32)
    with pytest.raises(ValueError, match="does not match"):
        L.lut_gemm(torch.randn(1, 64), *packed, 64, 2, 32)
    with pytest.raises(ValueError, match="group"):
        L.pack_lut(torch.zeros(4, 12, dtype=torch.uint8), torch.ones(4, 1), torch.ones(4, 1), 4, 12)
    with pytest.raises(ValueError, match="multiple of the group"):
        L.pack_lut(torch.zeros(4, 40, dtype=torch.uint8), torch.ones(4, 1), torch.ones(4, 1), 4, 32)


# ---- 8-bit codes, no tables (bitfold_q8_gemm) ---------------------------------------------------

Q8_CASES = [  # N, K, group, B: one row, row blocks of 4 and their remainders, per-row groups, batches
    (1, 8, 8, 1), (3, 64, 32, 2), (4, 96, 32, 1), (7, 128, 128, 3), (33, 256, 64, 5), (64, 192, 192, 1),
    (130, 320, 32, 17), (17, 1536, 1536, 2)]


def _q8(N, K, group, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 256, (N, K), dtype=torch.uint8, generator=g)
    s = (torch.rand(N, K // group, generator=g) * 0.01 + 1e-4).half()
    m = (-torch.rand(N, K // group, generator=g) * 1.5).half()
    return q, s, m


@pytest.mark.parametrize("isa", ["scalar", "avx2"])
@pytest.mark.parametrize("N,K,group,B", Q8_CASES)
def test_q8_kernel_matches_float64(isa, N, K, group, B):
    """Every product in float32: within float32 rounding of a float64 matmul of the weight."""
    if isa == "avx2" and L.best_isa() == "scalar":
        pytest.skip("no AVX2")
    q, s, m = _q8(N, K, group)
    x = torch.randn(B, K, generator=torch.Generator().manual_seed(1))
    w = (q.double().view(N, K // group, group) * s.double()[..., None] + m.double()[..., None]).view(N, K)
    exact = x.double() @ w.t()
    for y in (L.q8_gemm(x, q, s, m, group, isa=isa), L.q8_gemm_ref(x, q, s, m, group)):
        assert y.shape == (B, N)
        assert float((y.double() - exact).norm() / exact.norm()) < 1e-5


def test_q8_threads_do_not_change_results():
    q, s, m = _q8(300, 256, 64)
    x = torch.randn(3, 256)
    assert torch.equal(L.q8_gemm(x, q, s, m, 64, num_threads=1), L.q8_gemm(x, q, s, m, 64, num_threads=2))


def test_q8_bad_arguments():
    q, s, m = _q8(8, 64, 32)
    x = torch.randn(1, 64)
    with pytest.raises(ValueError, match="group must be a multiple of 8"):
        L.q8_gemm(x, q, s, m, 12)
    with pytest.raises(ValueError, match="codes must be uint8"):
        L.q8_gemm(x, q.to(torch.int8), s, m, 32)
    with pytest.raises(ValueError, match="scales must be float16"):
        L.q8_gemm(x, q, s.float(), m, 32)
    with pytest.raises(ValueError, match="codes must be uint8 \\[n, K=63\\]"):
        L.q8_gemm(torch.randn(1, 63), q, s, m, 32)
