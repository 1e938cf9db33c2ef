import pytest
import torch

from bitfold.kernels.silu_mul import silu_and_mul, silu_and_mul_ref

from ._util import assert_close, need_triton, randn

# (T, I, dtype): one token; I not a power of two; I larger than the tuned-down block below
CASES = [(1, 64, torch.float32), (6, 100, torch.float32), (4, 256, torch.float16), (4, 100, torch.bfloat16)]


def _x(T, I, dtype, seed=0):
    return 3 * randn(T, 2 * I, dtype=dtype, gen=torch.Generator().manual_seed(seed))  # reach silu's tails


@pytest.mark.parametrize("T,I,dtype", CASES)
def test_ref_matches_float64(T, I, dtype):
    x = _x(T, I, dtype)
    gate, up = x.double().chunk(2, dim=-1)
    assert_close(silu_and_mul_ref(x), gate * torch.sigmoid(gate) * up, dtype)


@pytest.mark.parametrize("T,I,dtype", CASES)
@pytest.mark.parametrize("block", [1024, 32])
def test_kernel_matches_ref(T, I, dtype, block):
    need_triton()
    x = _x(T, I, dtype)
    assert_close(silu_and_mul(x, block=block), silu_and_mul_ref(x), dtype, kernel=True)


def test_empty_and_bad_inputs():
    x = _x(2, 64, torch.float32)
    for fn in (silu_and_mul, silu_and_mul_ref):
        assert fn(x[:0]).shape == (0, 64)
        with pytest.raises(ValueError, match=r"\[T, 2\*I\]"):
            fn(x[:, :63].contiguous())
        with pytest.raises(ValueError, match="x must be contiguous"):
            fn(x.t().contiguous().t())
