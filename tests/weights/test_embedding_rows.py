"""An embedding read from quantized storage (layers/embedding.py) on the CPU: every CPU storage's
`rows(layer, ids)` against the codes it was given (LUT bit planes at 1-6 bits, table-free bytes
at 8 bits, NF4 code words), GGUF models whose embedding (tied to the head, or its own) keeps the
file's codes against the `gguf` package's dequantizer and against the same model holding the
float table, the fused CPU decode step over such an embedding against the per-op path, and the
default model (tied Q8_0 embedding): the same logits and greedy tokens as with the float table.

Rows must equal the full dequantization's rows exactly (the same float32 ops on the same codes);
the reference is the codes a test loaded, never the storage's own unpacking alone."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from bitfold.kernels import lut_gemm as lut
from bitfold.layers import embedding as embedding_mod
from bitfold.layers.linear import Linear
from bitfold.weights.lowbit import dequantize, lowbit_spec
from tests.helpers import rel_err

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402

from tests.loader.test_gguf_types import (HEADS, HIDDEN, INTER, KV_HEADS, LAYER_NAMES, LAYERS,  # noqa: E402
                                          add_llama_tensor, encode, finish_gguf, make_vocab, tiny_llama_writer)


def _ids(n: int, count: int, seed: int) -> torch.Tensor:
    """count row ids of [0, n) with repeats, the first and last rows and tile edges among them."""
    rng = random.Random(seed)
    edges = [i for i in (0, 31, 32, 63, 64, n - 1) if i < n]
    ids = edges + [rng.randrange(n) for _ in range(count)]
    ids += ids[:3]  # repeated ids
    rng.shuffle(ids)
    return torch.tensor(ids, dtype=torch.int64)


# ---- storages ----------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("group", [16, 32, 128])
@pytest.mark.parametrize("n", [1, 63, 131])
def test_unpack_lut_rows_are_the_packed_rows(bits, group, n):
    torch.manual_seed(bits * 1000 + group + n)
    K = 2 * group
    q = torch.randint(0, 2**bits, (n, K), dtype=torch.uint8)
    s, m = torch.randn(n, K // group).half(), torch.randn(n, K // group).half()
    packed = lut.pack_lut(q, s, m, bits, group)
    ids = _ids(n, 20, n)
    got = lut.unpack_lut_rows(*packed, ids, bits, group)
    for a, b in zip(got, (q[ids], s[ids], m[ids])):
        assert torch.equal(a, b)
    empty = lut.unpack_lut_rows(*packed, torch.zeros(0, dtype=torch.int64), bits, group)
    assert [tuple(t.shape) for t in empty] == [(0, K), (0, K // group), (0, K // group)]


# CPU storages: LUT passes at 1-4 bits (int1/2/3/4, ternary), two passes at 5-6 (int6-g16 is a
# Q4_K + Q6_K layer's format), table-free bytes at 8 (int8-g32 = Q8_0, int8 = int8-ch).
LOWBIT = ["int1-g32", "int2-g64", "int3-g32", "int4-g16", "int4-g128", "ternary-g64", "int5-g32", "int6-g16",
          "int8-g32", "int8"]


@pytest.mark.parametrize("fmt", LOWBIT)
def test_lowbit_cpu_rows_equal_the_dequantized_codes(fmt):
    spec = lowbit_spec(fmt)
    N, K = 263, 200  # K pads to whole groups (and to 32): the padding never shows in rows
    torch.manual_seed(len(fmt))
    lin = Linear(K, {"a": 100, "b": N - 100}, False, fmt, torch.float32)
    KP = lin.in_padded
    group = spec.group_size(KP)
    q = torch.randint(0, 3 if spec.ternary else 2**spec.bits, (N, KP), dtype=torch.uint8)
    s = (torch.rand(N, KP // group) * 0.01 + 1e-3).half()
    m = (-torch.rand(N, KP // group) * 0.05).half()
    lin.fmt.load_codes(lin, q[:100], s[:100], m[:100], 0)  # two shards: rows packed once both are in
    assert not lin.fmt.can_gather(lin)
    lin.fmt.load_codes(lin, q[100:], s[100:], m[100:], 100)
    lin.fmt.process_after_loading(lin)
    assert lin.fmt.can_gather(lin) and not lin.fmt.rounded and embedding_mod.gathers(lin)
    want = dequantize(q, s, m, group)[:, :K]
    ids = _ids(N, 40, 1)
    got = lin.fmt.rows(lin, ids)
    assert got.dtype == torch.float32 and torch.equal(got, want[ids])
    assert torch.equal(dequantize(*lin.fmt.codes(lin), group)[:, :K], want)  # and the full unpacking
    # rows rounded here from floats: the format says so, and an embedding does not read them
    lin2 = Linear(K, {"w": N}, False, fmt, torch.float32)
    lin2.load_shard("w", want, False)
    assert lin2.fmt.rounded and not embedding_mod.gathers(lin2)


@pytest.mark.parametrize("fmt", ["int4-g64", "int3-g32", "int8"])
def test_lowbit_gpu_layout_rows(fmt, monkeypatch):
    """The GPU layout's rows (planes gathered, `qmatmul.dequantize`, through the interpreter here)."""
    from bitfold.weights.base import WeightFormat

    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        monkeypatch.setattr(WeightFormat, "gpu_storage", staticmethod(lambda dev: True))
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    spec = lowbit_spec(fmt)
    N, K = 77, 96
    with torch.device(dev):
        lin = Linear(K, {"w": N}, False, fmt, torch.float32)
    torch.manual_seed(3)
    lin.load_shard("w", torch.randn(N, K) * 0.05, False)
    lin.fmt.process_after_loading(lin)
    q, s, m = lin.fmt.codes(lin)
    want = dequantize(q, s, m, spec.group_size(lin.in_padded))[:, :K]
    ids = _ids(N, 10, 2).to(dev)
    torch.testing.assert_close(lin.fmt.rows(lin, ids).cpu(), want[ids.cpu()], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fmt", ["nf4-g32", "nf4-g64"])
def test_nf4_rows_equal_the_dequantized_codes(fmt):
    from bitfold.weights.nf4 import quantize_cb4

    N, K = 131, 100
    torch.manual_seed(5)
    w = torch.randn(N, K) * 0.05
    lin = Linear(K, {"w": N}, False, fmt, torch.float32)
    lin.load_shard("w", w, False)
    lin.fmt.process_after_loading(lin)
    group = lin.fmt.group
    # independent of the code words' packing: the codebook values of quantize_cb4's codes
    codes, scales = quantize_cb4(torch.nn.functional.pad(w, (0, lin.in_padded - K)), group, lin.cb4_codebook)
    want = (lin.cb4_codebook[codes.long()].view(N, -1, group) * scales.float()[..., None]).view(N, -1)[:, :K]
    ids = _ids(N, 30, 3)
    assert lin.fmt.can_gather(lin)
    assert torch.equal(lin.fmt.rows(lin, ids), want[ids]) and torch.equal(lin.fmt.dequantize(lin), want)
    assert lin.fmt.rounded and not embedding_mod.gathers(lin)  # NF4 always rounds: never an embedding's rows


# ---- GGUF models -------------------------------------------------------------------------------

EXACT = (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0)  # codes and scales as the file's (K-quants: fp16 scale products)


def write_gguf(path, emb_type: Q, tied: bool, layer_type: Q = Q.Q4_0) -> dict:
    """A tiny llama GGUF (test_gguf_types' vocabulary and shapes): every layer weight in
    `layer_type`, token_embd in `emb_type`, and an output.weight (Q6_K) unless `tied`. Returns
    {"embed": its float32 decoding by the gguf package, "raw": its blocks}."""
    vocab = len(make_vocab()[0])
    rng = np.random.default_rng(int(emb_type) * 2 + tied)
    w = tiny_llama_writer(path, "bitfold tiny embedding test")
    shapes = {"attn_q": (HIDDEN, HIDDEN), "attn_k": (KV_HEADS * HIDDEN // HEADS, HIDDEN),
              "attn_v": (KV_HEADS * HIDDEN // HEADS, HIDDEN), "attn_output": (HIDDEN, HIDDEN),
              "ffn_gate": (INTER, HIDDEN), "ffn_up": (INTER, HIDDEN), "ffn_down": (HIDDEN, INTER)}
    out = {}
    tensors = [("token_embd.weight", (vocab, HIDDEN), emb_type)]
    for i in range(LAYERS):
        for g in LAYER_NAMES:
            shape = shapes.get(g, (HIDDEN,))
            tensors.append((f"blk.{i}.{g}.weight", shape, layer_type if len(shape) == 2 else Q.F32))
    tensors.append(("output_norm.weight", (HIDDEN,), Q.F32))
    if not tied:
        tensors.append(("output.weight", (vocab, HIDDEN), Q.Q6_K))
    for name, shape, qtype in tensors:
        hw = (rng.uniform(0.5, 1.5, shape) if len(shape) == 1 else rng.normal(0, 0.05, shape)).astype(np.float32)
        raw = encode(hw, qtype, rng)
        if name == "token_embd.weight":
            out = {"embed": gguf.quants.dequantize(raw, qtype).reshape(shape), "raw": raw}
        add_llama_tensor(w, name, raw, qtype)
    finish_gguf(w)
    return out


def _runner(path, weights="auto", fused=True, float_table=False):
    """A hand-driven runner (tests/runner/test_cpu_step.py); `float_table`: the embedding keeps
    its float table whatever the format (the previous behaviour, the reference)."""
    from tests.runner.test_cpu_step import Runner

    if not float_table:
        return Runner(path, weights, fused=fused)
    real = embedding_mod.gathers
    embedding_mod.gathers = lambda layer: False
    try:
        return Runner(path, weights, fused=fused)
    finally:
        embedding_mod.gathers = real


def _teacher_forced(r, prompts, steps: int, seed: int) -> list[torch.Tensor]:
    """Prefill logits, then `steps` decode steps of seeded random tokens: [logits per step]."""
    rng = random.Random(seed)
    out = [r.start(prompts)]
    for _ in range(steps):
        out.append(r.decode([rng.randrange(276) for _ in prompts]))
    return out


@pytest.mark.parametrize("emb_type", [Q.Q8_0, Q.Q4_1, Q.Q5_0, Q.Q4_K, Q.Q6_K], ids=lambda t: t.name)
def test_tied_gguf_embedding_reads_the_heads_codes(tmp_path, emb_type):
    path = tmp_path / "tied.gguf"
    ref = write_gguf(path, emb_type, tied=True)
    r = _runner(path)
    model = r.runner.model
    emb = model.embed
    assert emb.weight.numel() == 0 and emb.table is model.lm_head and "table" not in emb._modules
    # nothing held twice: the head's buffers are registered once, as lm_head's
    assert [n for n, t in [*model.named_parameters(), *model.named_buffers()] if n.startswith("embed.") and t.numel()] == []
    vocab = ref["embed"].shape[0]
    ids = _ids(vocab, 50, 4)
    want = torch.from_numpy(ref["embed"])[ids]
    got = emb(ids)
    if emb_type in EXACT:
        assert torch.equal(got, want)
    else:  # the CPU codes' scales are d * sub rounded to fp16 (gguf_blocks.py), as every layer's
        assert rel_err(got, want) < 1e-3  # measured 3.3e-4 (Q4_K): fp16's half ulp is 2.4e-4
    head = model.lm_head
    spec = head.fmt.spec
    assert torch.equal(got, dequantize(*head.fmt.codes(head), spec.group_size(head.in_padded))[ids, :HIDDEN])
    if emb_type not in EXACT:
        # (End to end, rows 3e-4 apart move logits by ~4% on this random model: the LUT kernels'
        # int8 activation tables round differently. The rows above are the check.)
        return
    # the same model holding the float table: bit-equal logits, prefill and fused decode steps
    f = _runner(path, float_table=True)
    assert f.runner.model.embed.weight.shape == (vocab, HIDDEN)
    prompts = [[5, 9, 200, 31], [7, 275]]
    for a, b in zip(_teacher_forced(r, prompts, 4, 1), _teacher_forced(f, prompts, 4, 1)):
        assert torch.equal(a, b)


def test_untied_gguf_embedding_keeps_its_blocks_on_the_cpu(tmp_path):
    """Qwen2.5's Q4_K_M layout: its own Q4_K token_embd beside a Q6_K output: the embedding is a
    table of int4-g32 codes (the file's bytes, not 4-byte floats) whose rows the model reads."""
    path = tmp_path / "untied.gguf"
    ref = write_gguf(path, Q.Q4_K, tied=False)
    model = _runner(path).runner.model
    emb = model.embed
    assert emb.weight.numel() == 0 and emb.table is not None and emb.table is not model.lm_head
    assert emb.table.fmt.name == "int4-g32" and model.lm_head.fmt.name == "int6-g16"
    held = sum(t.numel() * t.element_size() for n, t in [*model.named_parameters(), *model.named_buffers()]
               if n.startswith("embed."))
    vocab = ref["embed"].shape[0]
    tiles = -(-vocab // 64) * 64  # LUT rows pad to tiles of 64
    assert held == tiles * HIDDEN // 2 + 2 * 2 * tiles * HIDDEN // 32  # 4-bit codes + fp16 scale and min per 32
    ids = _ids(vocab, 40, 5)
    want = torch.from_numpy(ref["embed"])[ids]
    torch.testing.assert_close(emb(ids), want, rtol=2e-3, atol=2e-3 * float(want.abs().max()))


@pytest.mark.parametrize("weights,tied,emb_type,keeps", [
    ("int4", True, Q.Q8_0, False),  # the head rounds Q8_0 to int4-g32: the embedding keeps its floats
    ("nf4", True, Q.Q4_0, False),  # NF4 rounds every weight
    ("nf4", False, Q.Q4_0, False),
    ("int4", False, Q.Q4_0, True),  # int4 on a Q4_0 file is int4-g32: the file's codes, kept
    ("int4-g64", False, Q.Q4_0, False),  # asked for another group: rounded again, so floats
    ("dense", True, Q.Q8_0, False),
])
def test_codes_rounded_at_load_leave_the_float_table(tmp_path, weights, tied, emb_type, keeps):
    path = tmp_path / "m.gguf"
    ref = write_gguf(path, emb_type, tied=tied)
    emb = _runner(path, weights).runner.model.embed
    assert (emb.weight.numel() == 0) == keeps
    ids = _ids(ref["embed"].shape[0], 20, 6)
    assert torch.equal(emb(ids), torch.from_numpy(ref["embed"])[ids])  # either way: the file's values


@pytest.mark.parametrize("emb_type", [Q.Q8_0, Q.Q4_K], ids=lambda t: t.name)
def test_fused_step_over_a_gathered_embedding(tmp_path, emb_type):
    """The fused C++ step reads the rows the embedding gathers: equal to the per-op path (same
    kernels, observed bit-equal), and to the fused step over the float table where the codes are
    exactly the file's (Q8_0). Q4_K's embedding is LUT codes, Q8_0's the head's bytes."""
    from bitfold.runner import cpu_step

    path = tmp_path / "tied.gguf"
    write_gguf(path, emb_type, tied=emb_type == Q.Q8_0)
    fused, per_op = _runner(path, fused=True), _runner(path, fused=False)
    assert fused.runner.model.embed.weight.numel() == 0
    calls = []
    real = cpu_step.FusedDecodeStep.__call__

    def spy(self, input_ids, ctx):
        calls.append(input_ids.shape[0])
        return real(self, input_ids, ctx)

    cpu_step.FusedDecodeStep.__call__ = spy
    try:
        prompts = [[1, 2, 3, 4, 5], [9, 8], [100, 275, 0]]
        got = _teacher_forced(fused, prompts, 5, 2)
        assert calls == [3] * 5  # every decode step fused
        want = _teacher_forced(per_op, prompts, 5, 2)
        for step, (a, b) in enumerate(zip(got, want)):
            assert rel_err(a, b) < 1e-5, f"step {step}: {rel_err(a, b):.2e}"
        if emb_type == Q.Q8_0:
            floats = _runner(path, fused=True, float_table=True)
            assert floats.runner.model.embed.weight.numel() > 0
            for a, b in zip(got, _teacher_forced(floats, prompts, 5, 2)):
                assert torch.equal(a, b)
        with pytest.raises(ValueError, match="token id 276 out of range"):
            fused.decode([276, 0, 0])
    finally:
        cpu_step.FusedDecodeStep.__call__ = real


# ---- the default model -------------------------------------------------------------------------

@pytest.mark.slow
def test_default_model_embedding_reads_the_tied_head(smollm2_path, smollm2_default):
    """SmolLM2 (Q4_1 layers, tied Q8_0 embedding) on the CPU: no float table (28 M floats, 113 MB
    before), and the same teacher-forced logits and greedy tokens as with it, fused and per-op."""
    from bitfold import LLM, SamplingParams

    model = smollm2_default.engine.runner.model
    assert model.embed.weight.numel() == 0 and model.embed.table is model.lm_head
    real = embedding_mod.gathers
    embedding_mod.gathers = lambda layer: False
    try:
        floats = LLM(smollm2_path, device="cpu", kv_cache_memory_gb=0.25)
    finally:
        embedding_mod.gathers = real
    assert floats.engine.runner.model.embed.weight.shape == (49152, 576)
    per_op = LLM(smollm2_path, device="cpu", kv_cache_memory_gb=0.25, cpu_fused_step=False)
    from tests.weights.test_gguf_format import PROMPTS, _logits

    tok = smollm2_default.tokenizer
    ids = [tok.encode(p, add_special_tokens=False) for p in PROMPTS]
    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    outs = {name: [o.token_ids for o in llm.generate(ids, sp)]
            for name, llm in (("rows", smollm2_default), ("floats", floats), ("per_op", per_op))}
    assert outs["rows"] == outs["floats"] == outs["per_op"]
    for p, a in zip(ids, outs["rows"]):
        assert torch.equal(_logits(smollm2_default, p + a), _logits(floats, p + a))
