"""The table-free Q6_K kernel (`bitfold_q6k_gemm`: GGUF Q6_K blocks as the file stores them, times
float32 activations) against float64 products of the `gguf` package's own dequantization."""
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from bitfold.kernels import lut_gemm as L

pytestmark = pytest.mark.skipif(not L.available(), reason="the CPU kernels could not be built (no C++ compiler?)")

CASES = [  # N, K, B: odd N (remainders of the 4- and 2-row passes and of 16-row tasks), batches 1..9
    (1, 256, 1), (3, 256, 2), (5, 512, 1), (7, 768, 3), (33, 256, 4), (17, 1536, 5), (65, 512, 7), (130, 256, 8),
    (9, 1024, 9)]


def random_q6k(N, K, seed=0):
    """uint8 [N, K / 256 * 210] of random Q6_K blocks: every code and sub-scale byte random, d a
    finite fp16 of either sign (random bytes there could be inf/NaN)."""
    g = torch.Generator().manual_seed(seed)
    b = torch.randint(0, 256, (N * K // 256, 210), dtype=torch.uint8, generator=g)
    d = ((torch.rand(N * K // 256, generator=g) - 0.3) * 0.02).half()
    b[:, 208:210] = d.view(torch.uint8).view(-1, 2)
    return b.view(N, K // 256 * 210)


def gguf_weight(blocks, K):
    """float64 [N, K]: the gguf package's Q6_K dequantization (the independent reference)."""
    w = quants.dequantize(blocks.numpy(), GGMLQuantizationType.Q6_K)
    assert w.shape == (blocks.shape[0], K)
    return torch.from_numpy(np.ascontiguousarray(w)).double()


def isas():
    return ["scalar"] + ([] if L.best_isa() == "scalar" else ["avx2"])


def test_reference_dequantization_is_gguf_bit_for_bit():
    blocks = random_q6k(5, 768, seed=3)
    assert torch.equal(L.q6k_dequantize_ref(blocks, 768).double(), gguf_weight(blocks, 768))


@pytest.mark.parametrize("isa", ["scalar", "avx2"])
@pytest.mark.parametrize("N,K,B", CASES)
def test_q6k_kernel_matches_float64(isa, N, K, B):
    """Every weight exact in float32, every product and sum in float32: within float32 rounding of
    a float64 matmul of gguf's weights, per output relative to sum |w| |x|."""
    if isa not in isas():
        pytest.skip("no AVX2")
    blocks = random_q6k(N, K, seed=N * 7 + K)
    x = torch.randn(B, K, generator=torch.Generator().manual_seed(B))
    w = gguf_weight(blocks, K)
    exact = x.double() @ w.t()
    bound = x.double().abs() @ w.abs().t()
    for y in (L.q6k_gemm(x, blocks, isa=isa), L.q6k_gemm_ref(x, blocks)):
        assert y.shape == (B, N) and y.dtype == torch.float32
        assert bool(((y.double() - exact).abs() <= 2e-6 * bound * K ** 0.5 + 1e-30).all())
        assert float((y.double() - exact).norm() / exact.norm()) < 1e-5


def test_q6k_threads_do_not_change_results():
    blocks = random_q6k(301, 512)
    x = torch.randn(3, 512)
    assert torch.equal(L.q6k_gemm(x, blocks, num_threads=1), L.q6k_gemm(x, blocks, num_threads=2))


def test_q6k_bad_arguments():
    blocks = random_q6k(4, 256)
    with pytest.raises(ValueError, match="multiple of 256"):
        L.q6k_gemm(torch.randn(1, 128), blocks)
    with pytest.raises(ValueError, match=r"uint8 \[n, 420\]"):
        L.q6k_gemm(torch.randn(1, 512), blocks)
    with pytest.raises(ValueError, match="uint8"):
        L.q6k_gemm(torch.randn(1, 256), blocks.to(torch.int16))
