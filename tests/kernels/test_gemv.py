import pytest
import torch

from bitfold.kernels.gemv import gemv, gemv_ref

from ._util import assert_close, need_triton, randn, skip_interpreted_bf16_dot

# (M, N, K): one row; N not a multiple of the block; K not a multiple of block_k (masked
# tail) and K smaller than one block; several row tiles (M > 16); a single output row.
SHAPES = [(1, 64, 256), (1, 50, 200), (3, 96, 64), (8, 33, 136), (16, 64, 512), (20, 40, 96), (2, 1, 128)]
# (block_m, block_n, block_k, num_warps, num_stages): register loop and tl.dot, small blocks so
# the CPU shapes above cross several of them.
CONFIGS = [(1, 16, 64, 4, 2), (1, 8, 128, 4, 1), (16, 16, 32, 4, 2), (16, 32, 64, 4, 3)]


def _xw(M, N, K, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return randn(M, K, dtype=dtype, gen=g), randn(N, K, dtype=dtype, gen=g) / K ** 0.5


@pytest.mark.parametrize("M,N,K", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ref_matches_float64(M, N, K, dtype):
    x, w = _xw(M, N, K, dtype)
    assert_close(gemv_ref(x, w), x.double() @ w.double().T, dtype)


@pytest.mark.parametrize("M,N,K", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "x".join(map(str, c)))
def test_kernel_matches_ref(M, N, K, dtype, config):
    need_triton()
    if config[0] > 1:
        skip_interpreted_bf16_dot(dtype)
    x, w = _xw(M, N, K, dtype, seed=M * 1000 + N)
    out = torch.full((M, N), float("nan"), dtype=dtype, device=x.device)  # every element must be written
    y = gemv(x, w, config=config, out=out)
    assert y is out
    # float32 x float32 through tl.dot may use tf32 on a GPU: compare at fp16 tolerance there
    tol_dtype = torch.float16 if dtype == torch.float32 and config[0] > 1 else dtype
    assert_close(y, x.double() @ w.double().T, tol_dtype, kernel=True)


@pytest.mark.parametrize("M", [1, 2, 8, 16])
@pytest.mark.parametrize("N,K", [(72, 1024), (300, 128)])  # tall and wide: different configs
def test_default_config(M, N, K):
    need_triton()
    dtype = torch.float16  # the default tl.dot config runs under the interpreter in fp16 only
    x, w = _xw(M, N, K, dtype, seed=M)
    assert_close(gemv(x, w), gemv_ref(x, w), dtype, kernel=True)


def test_strided_rows_and_empty():
    need_triton()
    x, w = _xw(4, 32, 128, torch.float32)
    xs = torch.cat([x, x], dim=1)[:, :128]  # row stride 256, contiguous along K
    assert_close(gemv(xs, w, config=CONFIGS[0]), gemv_ref(x, w), torch.float32, kernel=True)
    assert gemv(x[:0], w).shape == (0, 32)
    assert torch.equal(gemv(x[:, :0], w[:, :0]), torch.zeros(4, 32, device=x.device))


def test_bad_inputs():
    x, w = _xw(2, 16, 64, torch.float32)
    for fn in (gemv, gemv_ref):
        with pytest.raises(ValueError, match=r"weight must be \[N, K=64\]"):
            fn(x, w[:, :32])
        with pytest.raises(ValueError, match="share a float dtype"):
            fn(x, w.half())
        with pytest.raises(ValueError, match="contiguous along K"):
            fn(x.t().contiguous().t(), w)
