"""GGUF blocks taken as low-bit codes without a float round trip (Q4_0/Q4_1/Q4_K -> int4-g32,
Q2_K -> int2-g16), with the `gguf` package's dequantizers as the independent reference: the
codes dequantized equal gguf's decoding of the same bytes (exactly for Q4_0/Q4_1, to the fp16
rounding of d*sc and dmin*m for the K-quants), on synthetic blocks, on the real tensors of the
SmolLM2 file, and through the loader into the engine (Q/K rows un-permuted); SmolLM2 through the
engine as int4-g32 is in tests/test_quantize.py, beside its quantized folder."""
from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from gguf import GGMLQuantizationType as Q  # noqa: E402

from bitfold.weights.gguf_blocks import CONVERSIONS, convert  # noqa: E402
from bitfold.loader.gguf_reader import GGUFFile  # noqa: E402
from bitfold.weights.lowbit import LowBitSpec, dequantize  # noqa: E402
from tests.loader.test_gguf_types import build_model, craft_k_quant  # noqa: E402

SPEC = {Q.Q4_0: LowBitSpec(4, 32), Q.Q4_1: LowBitSpec(4, 32), Q.Q4_K: LowBitSpec(4, 32), Q.Q2_K: LowBitSpec(2, 16)}
EXACT = (Q.Q4_0, Q.Q4_1)


def check_against_gguf(raw: np.ndarray, qtype: Q) -> None:
    """convert() of raw blocks [rows, bytes] dequantizes to gguf's decoding of them."""
    spec = SPEC[qtype]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    q, s, m = convert(raw, qtype, spec)
    rows, cols = raw.shape[0], raw.shape[1] // gguf.GGML_QUANT_SIZES[qtype][1] * block
    assert q.shape == (rows, cols) and q.dtype == torch.uint8 and int(q.max()) < 2**spec.bits
    assert s.shape == m.shape == (rows, cols // spec.group) and s.dtype == m.dtype == torch.float16
    ref = torch.from_numpy(gguf.quants.dequantize(raw, qtype).reshape(rows, cols))
    got = dequantize(q, s, m, spec.group)
    if qtype in EXACT:
        assert torch.equal(got, ref)
    else:  # scale and min are the fp16 roundings of d*sc and dmin*m: half an ulp each
        bound = (q.float() * s.float().repeat_interleave(spec.group, 1).abs()
                 + m.float().repeat_interleave(spec.group, 1).abs()) * 2.0**-11 + 1e-12
        assert ((got - ref).abs() <= bound).all(), float((got - ref).abs().max())
        assert not torch.equal(got, ref) or ref.abs().max() == 0  # the rounding is there to see


def test_every_conversion_is_tested():
    assert {t for t, _ in CONVERSIONS} == set(SPEC) and all(CONVERSIONS.get((t, s)) for t, s in SPEC.items())


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1])
def test_synthetic_q4_blocks_quantized_by_gguf(qtype):
    rng = np.random.default_rng(int(qtype))
    w = rng.normal(0.0, 0.05, (48, 320)).astype(np.float32)
    w[3] = 0.0  # an all-zero row: d = 0
    w[5, :32] = np.linspace(-1e-3, 4.0, 32)  # one wide block
    check_against_gguf(gguf.quants.quantize(w, qtype), qtype)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q2_K])
def test_synthetic_blocks_from_random_bytes(qtype):
    """Every byte pattern of the quants and packed scales, with finite fp16 d/dmin (and, for the
    K-quants, the test_gguf_types generator's sizes)."""
    rng = np.random.default_rng(100 + int(qtype))
    if qtype in (Q.Q4_K, Q.Q2_K):
        raw = craft_k_quant(40, qtype, rng)
        raw[0, :] = 0  # a zero block
    else:
        size = gguf.GGML_QUANT_SIZES[qtype][1]
        raw = rng.integers(0, 256, (40, 7 * size), dtype=np.uint8)
        hdr = 4 if qtype == Q.Q4_1 else 2
        blocks = raw.reshape(-1, size)
        blocks[:, :hdr] = rng.normal(0, 0.01, (len(blocks), hdr // 2)).astype(np.float16).view(np.uint8)
    check_against_gguf(raw, qtype)


def test_overflowing_products_fall_back():
    """A Q4_K scale d*sc beyond fp16's range cannot become an int4-g32 scale: no codes, so the
    layer dequantizes and rounds instead."""
    raw = craft_k_quant(2, Q.Q4_K, np.random.default_rng(0))
    raw[:, 0:2] = np.array([60000.0], np.float16).view(np.uint8)
    raw[:, 4:16] = 63  # every 6-bit scale and min at its largest
    assert convert(raw, Q.Q4_K, LowBitSpec(4, 32)) is None
    assert convert(raw, Q.Q4_K, LowBitSpec(4, 64)) is None  # not a lined-up pair either


def test_smollm2_tensors_convert_exactly(smollm2_path):
    """The real Q4_1 tensors of the default model, one of each shape, convert exactly."""
    f = GGUFFile(smollm2_path)
    picked = {}
    for t in f.tensors:
        if t.tensor_type == Q.Q4_1:
            picked.setdefault(tuple(t.shape), t)
    assert len(picked) >= 3
    for t in picked.values():
        check_against_gguf(t.data.view(np.ndarray), Q.Q4_1)


@pytest.fixture(scope="module")
def all_types_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("all-types") / "tiny-all-types.gguf"
    truth, types = build_model(path)
    return path, truth, types


@pytest.mark.parametrize("fmt", ["int4-g32", "int2-g16", "int4-g64"])
def test_every_type_through_the_engine(fmt, all_types_gguf, tmp_path):
    """The all-types GGUF (permuted Q/K rows under block quants) as `fmt`: layers whose GGUF type
    lines up with their format hold that type's decoding (exactly for Q4_0/Q4_1), the others the
    round to nearest of the decoding; `bitfold quantize` writes the same codes."""
    from bitfold.quantize import quantize
    from bitfold.weights.lowbit import quantize_rtn
    from tests.test_quantize import assert_same_model, runner

    path, truth, types = all_types_gguf
    r = runner(path, fmt, max_len=16)
    lined_up_types, lined_up_names = [], []
    for name, qtype in types.items():
        target = r.model.linear_for(name)
        if target is None:
            continue
        lin, shard = target
        spec, off, rows = lin.fmt.spec, *lin.shard_offsets[shard]
        got = dequantize(*(t[off:off + rows] for t in lin.fmt.codes(lin)), spec.group)
        want = torch.from_numpy(truth[name])
        if SPEC.get(getattr(Q, qtype)) != spec:
            assert torch.equal(got, dequantize(*quantize_rtn(want, spec), spec.group)), name
            continue
        lined_up_types.append(qtype)
        lined_up_names.append(name)
        if getattr(Q, qtype) in EXACT:
            assert torch.equal(got, want), name
        else:
            assert (got - want).abs().max() <= 2e-3 * want.abs().max(), name
    expected = {"int4-g32": {"Q4_0", "Q4_1", "Q4_K"}, "int2-g16": {"Q2_K"}, "int4-g64": set()}[fmt]
    assert set(lined_up_types) == expected
    if fmt == "int2-g16":  # a Q2_K attn_q: its block rows were un-permuted before conversion
        assert "model.layers.1.self_attn.q_proj.weight" in lined_up_names
    s = quantize(str(path), fmt, str(tmp_path / "q"))
    assert s.converted == len(lined_up_types) and s.linear_tensors == 2 * 7 + 1
    assert_same_model(runner(tmp_path / "q", max_len=16), r, list(range(0, 270, 19)))
