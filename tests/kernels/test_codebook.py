"""kernels/codebook.py: 4-bit codebook weights (NF4 and any 16 values). The packing against an
oracle, and every kernel (Triton GEMV and dequantize, through the interpreter on the CPU or on a
GPU; the C++ CPU kernel, AVX2 and scalar) against a float64 product computed from the codes,
scales and codebook directly, over edge shapes: one row, rows not a multiple of the block,
inputs padded to whole groups, tiles wider and narrower than a group."""
from __future__ import annotations

import pytest
import torch

from bitfold.kernels import codebook as C
from bitfold.kernels import cpu_lib

from ._util import DEVICE, need_triton

NF4 = torch.tensor([-1.0, -0.6961928, -0.5250731, -0.3949175, -0.2844414, -0.1847734, -0.0910500, 0.0,
                    0.0795803, 0.1609302, 0.2461123, 0.3379152, 0.4407098, 0.5626170, 0.7229568, 1.0])


def case(M, N, K, group, seed=0, codebook=NF4):
    g = torch.Generator().manual_seed(seed)
    kp = -(-K // group) * group
    codes = torch.randint(0, 16, (N, kp), dtype=torch.uint8, generator=g)
    s = (torch.rand(N, kp // group, generator=g) * 0.1 + 0.01).half()
    x = torch.randn(M, K, generator=g)
    w = (codebook.double()[codes.long()].view(N, kp // group, group) * s.double()[..., None]).view(N, kp)[:, :K]
    return x, C.pack_cb4(codes), s, x.double() @ w.t(), codes


def rel(y, exact):
    return float((y.double() - exact).norm() / exact.norm())


def test_pack_roundtrip_and_layout():
    codes = torch.randint(0, 16, (5, 24), dtype=torch.uint8)
    words = C.pack_cb4(codes)
    assert words.dtype == torch.int32 and words.shape == (5, 3)
    assert torch.equal(C.unpack_cb4(words), codes)
    w = int(words[1, 2]) & 0xFFFFFFFF  # nibble j of word i is the code of input 8i + j
    assert all((w >> (4 * j)) & 15 == int(codes[1, 16 + j]) for j in range(8))


def test_pair_table():
    """Byte b of codes (low nibble first) -> both values as float32 bits, the first in the low word."""
    cbk = torch.randn(16)
    t = C.pair_table(cbk)
    assert t.dtype == torch.int64 and t.shape == (256,)
    lo = (t & 0xFFFFFFFF).to(torch.int32).view(torch.float32)
    hi = (t >> 32).to(torch.int32).view(torch.float32)
    b = torch.arange(256)
    assert torch.equal(lo, cbk[b & 15]) and torch.equal(hi, cbk[b >> 4])


SHAPES = [(1, 37, 200, 64), (3, 16, 128, 32), (2, 5, 64, 64), (4, 20, 96, 32), (1, 33, 256, 128), (1, 1, 8, 8)]


@pytest.mark.parametrize("M,N,K,group", SHAPES)
@pytest.mark.parametrize("config", [None, (16, 64, 4), (8, 32, 4), (16, 256, 4)])
def test_triton_gemv_matches_float64(M, N, K, group, config):
    need_triton()
    x, words, s, exact, _ = case(M, N, K, group)
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    y = C.cb4_matmul(dev(x), dev(words), dev(s), dev(NF4), group, kind="gemv", config=config)
    assert y.shape == (M, N) and rel(y.cpu(), exact) < 1e-5
    assert rel(C.cb4_matmul_ref(x, words, s, NF4, group), exact) < 1e-5


@pytest.mark.parametrize("M,N,K,group", SHAPES[:4])
def test_triton_dequant_path_and_bf16(M, N, K, group):
    need_triton()
    x, words, s, exact, codes = case(M, N, K, group)
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    w = C.dequantize(dev(words), dev(s), dev(NF4), group, torch.float32).cpu()
    assert torch.allclose(w, C.dequantize_ref(words, s, NF4, group), rtol=0, atol=0)
    y = C.cb4_matmul(dev(x), dev(words), dev(s), dev(NF4), group, kind="dequant")
    assert rel(y.cpu(), exact) < 1e-5
    if DEVICE == "cuda":  # bf16 activations: within bf16 rounding
        yb = C.cb4_matmul(dev(x).bfloat16(), dev(words), dev(s), dev(NF4), group)
        assert rel(yb.float().cpu(), exact) < 2e-2


def test_any_codebook():
    """The kernels read the codebook they are given (a fitted one, unsorted): not NF4's constants."""
    need_triton()
    cbk = torch.randn(16, generator=torch.Generator().manual_seed(5))
    x, words, s, exact, _ = case(2, 24, 96, 32, codebook=cbk)
    y = C.cb4_matmul(x.to(DEVICE), words.to(DEVICE), s.to(DEVICE), cbk.to(DEVICE), 32, kind="gemv")
    assert rel(y.cpu(), exact) < 1e-5
    if cpu_lib.available():
        assert rel(C.cb4_gemm_cpu(x, words, s, cbk, 32), exact) < 1e-5


@pytest.mark.skipif(not cpu_lib.available(), reason="the C++ CPU kernels could not be built")
@pytest.mark.parametrize("isa", ["scalar", "avx2"])
@pytest.mark.parametrize("M,N,K,group", SHAPES + [(17, 130, 320, 32)])
def test_cpu_kernel_matches_float64(isa, M, N, K, group):
    from bitfold.kernels.lut_gemm import best_isa

    if isa == "avx2" and best_isa() == "scalar":
        pytest.skip("no AVX2")
    x, words, s, exact, _ = case(M, N, K, group)
    assert rel(C.cb4_gemm_cpu(x, words, s, NF4, group, isa=isa), exact) < 1e-5


def test_bad_arguments():
    x, words, s, _, _ = case(1, 8, 64, 32)
    with pytest.raises(ValueError, match="codebook must be float32 \\[16\\]"):
        C.cb4_matmul_ref(x, words, s, NF4[:8], 32)
    with pytest.raises(ValueError, match="scales must be float16"):
        C.cb4_matmul_ref(x, words, s.float(), NF4, 32)
    with pytest.raises(ValueError, match="does not pad to KP=64"):
        C.cb4_matmul_ref(torch.randn(1, 16), words, s, NF4, 32)
    with pytest.raises(ValueError, match="group must be a multiple of 8"):
        C.cb4_matmul_ref(x, words, s, NF4, 12)
