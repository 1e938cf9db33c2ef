import pytest
import torch

from bitfold.kernels.rms_norm import fused_add_rms_norm, fused_add_rms_norm_ref, rms_norm, rms_norm_ref

from ._util import INTERPRETED, assert_close, need_triton, randn

EPS = 1e-6
# (T, hidden, dtype): one token; a non-power-of-two hidden size; every dtype
CASES = [(1, 128, torch.float32), (7, 1000, torch.float32), (5, 256, torch.float16), (5, 1000, torch.bfloat16)]


def _inputs(T, hidden, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x, residual = randn(T, hidden, dtype=dtype, gen=gen), randn(T, hidden, dtype=dtype, gen=gen)
    weight = (1 + 0.1 * randn(hidden, gen=gen)).to(dtype)
    return x, residual, weight


def _hf_f64(x, weight):
    """HF LlamaRMSNorm in float64: normalize, round to the input dtype, multiply by weight."""
    h = x.double()
    normed = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype).double()
    return normed * weight.double()


@pytest.mark.parametrize("T,hidden,dtype", CASES)
def test_ref_matches_float64(T, hidden, dtype):
    x, residual, weight = _inputs(T, hidden, dtype)
    assert_close(rms_norm_ref(x, weight, EPS), _hf_f64(x, weight), dtype)
    out, new_res = fused_add_rms_norm_ref(x, residual, weight, EPS)
    expected_res = (x.double() + residual.double()).to(dtype)
    assert_close(new_res, expected_res, dtype)
    assert_close(out, _hf_f64(expected_res, weight), dtype)


@pytest.mark.parametrize("T,hidden,dtype", CASES)
def test_kernel_matches_ref(T, hidden, dtype):
    need_triton()
    x, residual, weight = _inputs(T, hidden, dtype)
    assert_close(rms_norm(x, weight, EPS), rms_norm_ref(x, weight, EPS), dtype, kernel=True)
    out, new_res = fused_add_rms_norm(x, residual, weight, EPS)
    ref_out, ref_res = fused_add_rms_norm_ref(x, residual, weight, EPS)
    assert_close(new_res, ref_res, dtype, kernel=True)
    if not (INTERPRETED and dtype == torch.bfloat16):
        # One rounding of the same fp32 sum on both sides: bit exact. Triton's interpreter
        # truncates fp32 -> bf16 casts instead of rounding to nearest, so not there.
        assert torch.equal(new_res, ref_res)
    assert_close(out, ref_out, dtype, kernel=True)


def test_empty_and_bad_inputs():
    x, residual, weight = _inputs(3, 128, torch.float32)
    for fn in (rms_norm, rms_norm_ref):
        assert fn(x[:0], weight, EPS).shape == (0, 128)
        with pytest.raises(ValueError, match="weight must be"):
            fn(x, weight[:64], EPS)
        with pytest.raises(ValueError, match="x must be contiguous"):
            fn(x.t().contiguous().t(), weight, EPS)
    for fn in (fused_add_rms_norm, fused_add_rms_norm_ref):
        out, res = fn(x[:0], residual[:0], weight, EPS)
        assert out.shape == res.shape == (0, 128)
        with pytest.raises(ValueError, match="residual dtype"):
            fn(x, residual.half(), weight, EPS)
