"""The device-op table (kernels/ops.py): every op lists its reference last, with one signature
for every family; CPU float32 takes the C++ kernels when they are built, other dtypes the
reference; the chosen implementation computes what the reference does."""
import pytest
import torch

from bitfold.kernels import cpu_ops, ops
from bitfold.kernels.rms_norm import rms_norm_ref


def test_every_op_ends_with_its_reference():
    for name, impls in ops.OPS.items():
        families = [f for f, _ in impls]
        assert families[-1] == "ref" and len(set(families)) == len(families), name
        assert set(families) <= set(ops.FAMILIES), name
        assert impls[-1][1].__name__.endswith("_ref"), name


@pytest.mark.parametrize("dtype,expected", [(torch.float32, "cpu"), (torch.bfloat16, "ref")])
def test_cpu_choice(dtype, expected):
    if expected == "cpu" and not cpu_ops.available():
        expected = "ref"
    x = torch.randn(3, 64, dtype=dtype)
    for name in ops.OPS:
        assert ops.family(name, x) == expected, name


def test_chosen_ops_match_references():
    g = torch.Generator().manual_seed(0)
    x, r, w = (torch.randn(5, 96, generator=g) for _ in range(3))
    w = w[0]
    torch.testing.assert_close(ops.rms_norm_op(x, w, 1e-6), rms_norm_ref(x, w, 1e-6), rtol=1e-5, atol=1e-5)
    out, res = ops.fused_add_rms_norm_op(x, r, w, 1e-6)
    torch.testing.assert_close(res, x + r)
    torch.testing.assert_close(out, rms_norm_ref(x + r, w, 1e-6), rtol=1e-5, atol=1e-5)
    gu = torch.randn(4, 2 * 48, generator=g)
    torch.testing.assert_close(ops.silu_and_mul_op(gu), torch.nn.functional.silu(gu[:, :48]) * gu[:, 48:])
