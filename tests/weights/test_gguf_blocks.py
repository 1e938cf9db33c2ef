"""GGUF block types (weights/gguf_blocks.py) against the `gguf` package's dequantizers, the
independent reference: every type's decoding equals gguf's bit for bit; as low-bit codes they
equal it exactly for Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 and to the fp16 rounding of d*sc and dmin*m for
the K-quants; codes also fit wider specs unchanged. On synthetic blocks, on the real tensors of
the SmolLM2 file, and through the loader into the engine (Q/K rows un-permuted); SmolLM2
through the engine as int4-g32 is in tests/test_quantize.py, beside its quantized folder."""
from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from gguf import GGMLQuantizationType as Q  # noqa: E402

from bitfold.loader.gguf_reader import GGUFFile  # noqa: E402
from bitfold.weights.gguf_blocks import BLOCK_TYPES, GGUFBlocks, convert, decode, fits  # noqa: E402
from bitfold.weights.lowbit import LowBitSpec, dequantize  # noqa: E402
from tests.loader.test_gguf_types import K_QUANTS, build_model, craft_k_quant  # noqa: E402

EXACT = {Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0}


def random_blocks(qtype: Q, rows: int, blocks_per_row: int, rng: np.random.Generator) -> np.ndarray:
    """Every byte pattern of the quants and packed scales, with small finite fp16 d/dmin (the
    K-quants from test_gguf_types' generator, 256 columns per row there)."""
    if qtype in K_QUANTS:
        return craft_k_quant(rows, qtype, rng)
    size = gguf.GGML_QUANT_SIZES[qtype][1]
    raw = rng.integers(0, 256, (rows, blocks_per_row * size), dtype=np.uint8)
    hdr = 4 if qtype in (Q.Q4_1, Q.Q5_1) else 2
    blocks = raw.reshape(-1, size)
    blocks[:, :hdr] = rng.normal(0, 0.01, (len(blocks), hdr // 2)).astype(np.float16).view(np.uint8)
    return raw


def check_against_gguf(raw: np.ndarray, qtype: Q) -> None:
    """decode() equals gguf's decoding exactly; convert() into the type's spec (and a wider one)
    within the fp16 rounding of the scale products (exactly for the EXACT types)."""
    bt = BLOCK_TYPES[qtype]
    rows, cols = raw.shape[0], raw.shape[1] // bt.type_size * bt.block
    ref = torch.from_numpy(gguf.quants.dequantize(raw, qtype).reshape(rows, cols))
    assert torch.equal(GGUFBlocks(raw, qtype, "t").dequantize(cols), ref)
    assert torch.equal(decode(torch.from_numpy(raw), qtype).dequantize().reshape(rows, cols), ref)
    wider = LowBitSpec(8, 16)
    for spec in (bt.spec, wider):
        q, s, m = convert(torch.from_numpy(raw), qtype, spec)
        assert q.shape == (rows, cols) and q.dtype == torch.uint8 and int(q.max()) < 2**bt.spec.bits
        assert s.shape == m.shape == (rows, cols // spec.group) and s.dtype == m.dtype == torch.float16
        got = dequantize(q, s, m, spec.group)
        if qtype in EXACT:
            assert torch.equal(got, ref), spec
        else:  # scale and min are the fp16 roundings of d*sc and dmin*m (and -zero*scale exact)
            sf = s.float().repeat_interleave(spec.group, 1).abs()
            mf = m.float().repeat_interleave(spec.group, 1).abs()
            bound = (q.float() * sf + mf) * 2.0**-11 + 1e-12
            assert ((got - ref).abs() <= bound).all(), (spec, float((got - ref).abs().max()))
            assert not torch.equal(got, ref) or ref.abs().max() == 0  # the rounding is there to see
        if spec == wider:
            assert torch.equal(got, dequantize(*convert(torch.from_numpy(raw), qtype, bt.spec), bt.spec.group))


def test_table_covers_the_supported_block_types():
    from bitfold.loader.gguf_file import SUPPORTED_TYPES

    blocks = {t for t in SUPPORTED_TYPES if t not in ("F32", "F16", "BF16")}
    assert {t.name for t in BLOCK_TYPES} == blocks
    for t, bt in BLOCK_TYPES.items():
        assert bt.spec.group and bt.block % bt.spec.group == 0 and bt.exact == (t in EXACT)


@pytest.mark.parametrize("qtype", list(BLOCK_TYPES), ids=lambda t: t.name)
def test_random_blocks_match_gguf(qtype):
    rng = np.random.default_rng(100 + int(qtype))
    raw = random_blocks(qtype, 24, 8, rng)
    raw[0, :BLOCK_TYPES[qtype].type_size] = 0  # a zero block: d = 0
    check_against_gguf(raw, qtype)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0], ids=lambda t: t.name)
def test_blocks_quantized_by_gguf(qtype):
    rng = np.random.default_rng(int(qtype))
    w = rng.normal(0.0, 0.05, (48, 320)).astype(np.float32)
    w[3] = 0.0  # an all-zero row: d = 0
    w[5, :32] = np.linspace(-1e-3, 4.0, 32)  # one wide block
    check_against_gguf(gguf.quants.quantize(w, qtype), qtype)


def test_fits():
    assert fits(LowBitSpec(4, 32), LowBitSpec(4, 32)) and fits(LowBitSpec(4, 32), LowBitSpec(6, 16))
    assert not fits(LowBitSpec(4, 32), LowBitSpec(4, 64))  # a wider group cannot hold two scales
    assert not fits(LowBitSpec(6, 16), LowBitSpec(4, 16))  # fewer bits
    assert not fits(LowBitSpec(8, 32), LowBitSpec(8, 0, symmetric=True))
    assert not fits(LowBitSpec(2, 16), LowBitSpec(2, 16, ternary=True))


def test_overflowing_products_fall_back():
    """A Q4_K scale d*sc beyond fp16's range cannot become an int4-g32 scale: no codes, so the
    layer dequantizes and rounds instead."""
    raw = torch.from_numpy(craft_k_quant(2, Q.Q4_K, np.random.default_rng(0)))
    raw[:, 0:2] = torch.from_numpy(np.array([60000.0], np.float16).view(np.uint8))
    raw[:, 4:16] = 63  # every 6-bit scale and min at its largest
    assert convert(raw, Q.Q4_K, LowBitSpec(4, 32)) is None
    assert convert(raw, Q.Q4_K, LowBitSpec(4, 64)) is None  # does not fit either


def test_smollm2_tensors_convert_exactly(smollm2_path):
    """The real Q4_1 tensors of the default model, one of each shape, and its Q8_0 embedding."""
    f = GGUFFile(smollm2_path)
    picked = {}
    for t in f.tensors:
        if t.tensor_type in (Q.Q4_1, Q.Q8_0):
            picked.setdefault((t.tensor_type, tuple(t.shape)), t)
    assert len(picked) >= 4
    for t in picked.values():
        check_against_gguf(t.data.view(np.ndarray), t.tensor_type)


@pytest.fixture(scope="module")
def all_types_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("all-types") / "tiny-all-types.gguf"
    truth, types = build_model(path)
    return path, truth, types


@pytest.mark.parametrize("fmt", ["int4-g32", "int2-g16", "int4-g64"])
def test_every_type_through_the_engine(fmt, all_types_gguf, tmp_path):
    """The all-types GGUF (permuted Q/K rows under block quants) as `fmt`: layers whose GGUF type
    fits their format hold that type's decoding (exactly for the EXACT types), the others the
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
        bt = BLOCK_TYPES.get(getattr(Q, qtype))
        if bt is None or not fits(bt.spec, spec):
            assert torch.equal(got, dequantize(*quantize_rtn(want, spec), spec.group)), name
            continue
        lined_up_types.append(qtype)
        lined_up_names.append(name)
        if bt.exact:
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


def test_auto_keeps_every_block_type(all_types_gguf):
    """`--weights auto` on the all-types GGUF (the `gguf` format): on the CPU each layer is the
    low-bit format its shards' codes fit (the most bits, the narrowest group), holding exactly
    their decoding for the EXACT types; layers with a float shard (F16/BF16/F32) are dense."""
    from tests.test_quantize import runner

    path, truth, types = all_types_gguf
    r = runner(path, "auto", max_len=16)
    by_layer: dict[int, list[str]] = {}
    for name, qtype in types.items():
        target = r.model.linear_for(name)
        if target is not None:
            by_layer.setdefault(id(target[0]), []).append(name)
    kinds = set()
    for names in by_layer.values():
        lin = r.model.linear_for(names[0])[0]
        bts = [BLOCK_TYPES.get(getattr(Q, types[n])) for n in names]
        if any(bt is None for bt in bts):
            assert lin.fmt.name == "dense", names
            kinds.add("dense")
            continue
        spec = lin.fmt.spec
        assert spec == LowBitSpec(max(bt.spec.bits for bt in bts), min(bt.spec.group for bt in bts)), names
        kinds.add(spec.name)
        q, s, m = lin.fmt.codes(lin)
        for n, bt in zip(names, bts):
            off, rows = lin.shard_offsets[r.model.linear_for(n)[1]]
            got = dequantize(q[off:off + rows], s[off:off + rows], m[off:off + rows], spec.group)
            want = torch.from_numpy(truth[n])
            if bt.exact:
                assert torch.equal(got, want), n
            else:
                assert (got - want).abs().max() <= 2e-3 * want.abs().max(), n
    assert "dense" in kinds and len(kinds) >= 3, kinds
