"""One table over every low-bit weight format x every device it runs on (ggml's "one test over
every format"): the format is built as a merged layer of two shards with odd shapes (rows not a
multiple of any tile, inputs not a multiple of the group, so padded), loaded from random float
weights, then

- round trip: the layer's codes are the spec's own rounding of the weights (`quantize_rtn` on
  the layer's device: a GPU rounds there), and the dequantized weights are within the bits'
  error bound of the float64 originals;
- fast vs reference: the layer's matmul (CPU: the LUT kernels; GPU: the Triton kernels, on a
  GPU or through Triton's interpreter here) against the float64 product with the dequantized
  weights plus bias, for 1 row (GEMV), 3 rows (GEMV with several rows) and 20 rows (GEMM).

The GGUF block types are the table's other rows (`gguf` format layers of one shard): on the CPU
they become the LUT format their codes fit, on a GPU they stay in their native layout; the
weights must be the `gguf` package's decoding (exactly, but for fp16-rounded K-quant scales on
the CPU and float32 rounding on the GPU) and the matmul as above.

New registered formats and block types join the table by themselves (`FORMATS` and
`BLOCK_TYPES` are read from the registries)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bitfold.kernels import cpu_lib
from bitfold.kernels import qmatmul as qm
from bitfold.layers.linear import Linear
from bitfold.weights import WEIGHT_FORMATS
from bitfold.weights.base import WeightFormat
from bitfold.weights.lowbit import dequantize, lowbit_spec, quantize_rtn

FORMATS = sorted({WEIGHT_FORMATS.get(n).name for n in WEIGHT_FORMATS.names() if lowbit_spec(n) is not None})
DEVICES = ["cpu", "gpu"]
SHARDS = {"a": 40, "b": 32}  # 72 rows: not a multiple of the LUT tile (64) nor of GPU blocks
K = 200  # not a multiple of 32: padded with zero codes (and masked activations) on both devices

# Relative error of the dequantized weights, Gaussian weights with a few outliers (measured
# below each bound on these seeds; test_lowbit.py checks the rounding itself in detail).
BOUND = {8: 0.01, 6: 0.03, 5: 0.06, 4: 0.12, 3: 0.22, 2: 0.5, 1: 0.75, "ternary": 0.7}
# Relative error of the matmul against float64 with the same dequantized weights: the CPU's
# LUT kernels quantize activations to int8 tables (T-MAC); the GPU kernels compute in float32
# (float32 activations keep ieee products in tl.dot).
TOL = {"cpu": 2.5e-2, "gpu": 2e-5}


def _block_types():
    try:
        from bitfold.weights.gguf_blocks import BLOCK_TYPES
    except ImportError:  # no gguf package: no GGUF rows
        return []
    return list(BLOCK_TYPES)


def _device(device: str, monkeypatch) -> torch.device:
    if device == "cpu":
        if not cpu_lib.available():
            pytest.skip("the C++ CPU kernels could not be built")
        return torch.device("cpu")
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        return torch.device("cuda")
    # the GPU storage and kernels on CPU tensors, through Triton's interpreter (tests/conftest.py)
    monkeypatch.setattr(WeightFormat, "gpu_storage", staticmethod(lambda dev: True))
    return torch.device("cpu")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_format_on_device(fmt, device, monkeypatch):
    dev = _device(device, monkeypatch)
    spec = lowbit_spec(fmt)
    g = torch.Generator().manual_seed(len(fmt))
    parts = {name: torch.randn(rows, K, generator=g) * 0.05 for name, rows in SHARDS.items()}
    parts["a"][3, 7] = 0.6  # an outlier in one group
    bias = torch.randn(sum(SHARDS.values()), generator=g)
    with torch.device(dev):
        lin = Linear(K, SHARDS, bias=True, fmt=fmt, dtype=torch.float32)
    for name in ("b", "a"):  # any order
        lin.load_shard(name, parts[name], False)
    lin.load_shard("a", bias[:40], True), lin.load_shard("b", bias[40:], True)
    lin.fmt.process_after_loading(lin)

    # round trip
    w = torch.cat([parts["a"], parts["b"]])
    q, s, m = lin.fmt.codes(lin)
    want = [t.cpu() for t in quantize_rtn(F.pad(w, (0, lin.in_padded - K)).to(dev), spec)]
    assert torch.equal(q, want[0]) and torch.equal(s, want[1]), fmt
    group = spec.group_size(lin.in_padded)
    deq = dequantize(q, s, m, group)[:, :K].double()
    assert torch.equal(deq.float(), dequantize(*want, group)[:, :K])  # mins as stored (symmetric: implied)
    rel = float((deq - w.double()).norm() / w.double().norm())
    assert rel < BOUND["ternary" if spec.ternary else spec.bits], (fmt, rel)

    # fast vs reference
    for M in (1, 3, 20):
        x = torch.randn(M, K, generator=g).to(dev)
        y = lin(x)
        ref = x.double().cpu() @ deq.T + bias.double()
        assert y.shape == (M, sum(SHARDS.values())) and y.dtype == torch.float32
        err = float((y.double().cpu() - ref).norm() / ref.norm())
        assert err < TOL[device], (fmt, device, M, err)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype_name", [t.name for t in _block_types()])
def test_gguf_blocks_on_device(qtype_name, device, monkeypatch):
    gguf = pytest.importorskip("gguf")
    from bitfold.weights.gguf_blocks import BLOCK_TYPES, GGUFBlocks
    from tests.weights.test_gguf_blocks import random_blocks

    dev = _device(device, monkeypatch)
    qtype = getattr(gguf.GGMLQuantizationType, qtype_name)
    bt = BLOCK_TYPES[qtype]
    rng = np.random.default_rng(300 + int(qtype))
    raw = random_blocks(qtype, 72, 2 if bt.block == 256 else 9, rng)  # 72 rows, K = 256 or 288
    rows, k = raw.shape[0], raw.shape[1] // bt.type_size * bt.block
    ref = torch.from_numpy(gguf.quants.dequantize(raw, qtype).reshape(rows, k)).double()
    with torch.device(dev):
        lin = Linear(k, {"w": rows}, bias=False, fmt="gguf", dtype=torch.float32)
    lin.load_shard("w", GGUFBlocks(raw, qtype, qtype_name), False)
    lin.fmt.process_after_loading(lin)
    if device == "cpu":  # the LUT format the codes fit, holding gguf's decoding
        assert lin.fmt.spec == bt.spec
        q, s, m = lin.fmt.codes(lin)
        got = dequantize(q, s, m, bt.spec.group).double()
        if bt.exact:
            assert torch.equal(got, ref)
        else:  # fp16 scales: half an ulp of each scale and min
            assert float((got - ref).abs().max()) <= 2.0**-11 * float(ref.abs().max()) * 4
    else:  # native: the file's bytes (K-quants: + unpacked sub-scales), decoding to float32 rounding
        assert lin.fmt.name == "gguf" and [r[3] for r in lin.fmt._runs] == [qtype_name]
        qw = lin.fmt._runs[0][2]
        extra = 4 if qtype_name in ("Q3_K", "Q4_K", "Q5_K") else 0
        assert qw.nbytes == raw.nbytes + extra * raw.size // bt.type_size
        got = qm.dequantize_ref(qw).double().cpu()
        torch.testing.assert_close(got, ref, rtol=2e-7, atol=1e-9)
    g = torch.Generator().manual_seed(int(qtype))
    for M in (1, 3, 20):
        x = torch.randn(M, k, generator=g).to(dev)
        want = x.double().cpu() @ got.T
        err = float((lin(x).double().cpu() - want).norm() / want.norm())
        assert err < TOL[device], (qtype_name, device, M, err)


@pytest.mark.parametrize("fmt", ["int4-g32", "int3-g64", "int8"])
def test_checkpoint_on_gpu_storage_equals_dequantized(fmt, tmp_path, monkeypatch):
    """A whole model through the runner on GPU storage (a `bitfold quantize` folder, so both
    sides hold the same codes): logits equal the same checkpoint dequantized at load."""
    from bitfold.quantize import quantize
    from tests.helpers import rel_err, write_tiny_hf_model
    from tests.test_quantize import logits, runner

    write_tiny_hf_model("qwen2", tmp_path / "src", seed=4)
    quantize(str(tmp_path / "src"), fmt, str(tmp_path / "q"))
    dense = runner(tmp_path / "q", "dense")
    r = runner(tmp_path / "q", device=_device("gpu", monkeypatch).type)
    assert all(hasattr(m, "q_plane0") for m in r.model.modules() if isinstance(m, Linear))
    ids = list(range(1, 300, 19))
    assert rel_err(logits(r, ids), logits(dense, ids)) < 1e-5


def test_per_row_int8_on_cpu_survives_a_massive_activation(monkeypatch):
    """The CPU LUT kernel scales its int8 activation tables per group: a per-row int8 layer ran
    with one scale for the whole input, so one activation of ~1e3 (Qwen2.5 has them) zeroed the
    others (Qwen2.5-1.5B int8: perplexity +1794%). It now runs over table groups of <= 64."""
    dev = _device("cpu", monkeypatch)
    g = torch.Generator().manual_seed(8)
    k, n = 1536, 48
    w = torch.randn(n, k, generator=g) * 0.02
    with torch.device(dev):
        lin = Linear(k, {"a": n}, bias=False, fmt="int8", dtype=torch.float32)
    lin.load_shard("a", w, False)
    lin.fmt.process_after_loading(lin)
    q, s, m = lin.fmt.codes(lin)
    assert s.shape == (n, 1)  # still one scale per row as stored (and saved)
    deq = dequantize(q, s, m, lin.in_padded)[:, :k].double()
    x = torch.randn(4, k, generator=g)
    x[:, 7] = 800.0
    ref = x.double() @ deq.T
    err = float((lin(x).double() - ref).norm() / ref.norm())
    assert err < 0.05, err  # 0.031; with per-row tables 0.15
