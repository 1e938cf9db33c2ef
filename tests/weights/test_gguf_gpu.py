"""GGUF blocks kept native on the GPU (the `gguf` format's GPU runs, weights/gguf_blocks.py
`native`, kernels/qmatmul.py), run here through Triton's interpreter on CPU tensors (the same
tests run on a GPU). Each block type's fused kernels against the `gguf` package's dequantizer
are the GGUF rows of test_format_matrix.py; here: a layer of mixed types, a whole GGUF model of
every type against the dequantize-at-load path, the default model's weight memory against its
file size."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
pytest.importorskip("triton")

from gguf import GGMLQuantizationType as Q  # noqa: E402

from bitfold.layers.linear import Linear  # noqa: E402
from bitfold.weights.base import WeightFormat  # noqa: E402
from bitfold.weights.gguf_blocks import BLOCK_TYPES  # noqa: E402
from tests.helpers import rel_err  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Bytes the GPU layout holds per block beyond the file's: the K-quants' 6-bit sub-scales (and
# mins) unpacked to a byte each.
EXTRA = {Q.Q3_K: 4, Q.Q4_K: 4, Q.Q5_K: 4}


@pytest.fixture
def gpu_storage(monkeypatch):
    """GPU layouts on this device (the interpreter on a CPU-only machine)."""
    if DEVICE == "cpu":
        monkeypatch.setattr(WeightFormat, "gpu_storage", staticmethod(lambda dev: True))


def test_mixed_runs_in_one_layer(gpu_storage):
    """A merged layer of Q4_K, Q6_K and F32 shards (a Q4_K_M q|k|v): three runs, each written
    into its own columns, equal to the layer dequantized at load."""
    from bitfold.weights.gguf_blocks import GGUFBlocks
    from tests.loader.test_gguf_types import craft_k_quant

    rng = np.random.default_rng(5)
    parts = {"q": GGUFBlocks(craft_k_quant(48, Q.Q4_K, rng), Q.Q4_K, "q"),
             "k": GGUFBlocks(craft_k_quant(16, Q.Q6_K, rng), Q.Q6_K, "k"),
             "v": torch.randn(16, 256) * 0.05}
    with torch.device(DEVICE):
        lin = Linear(256, {"q": 48, "k": 16, "v": 16}, False, "gguf", torch.float32)
    for name, t in parts.items():
        lin.load_shard(name, t, False)
    lin.fmt.process_after_loading(lin)
    assert lin.fmt.name == "gguf" and [r[3] for r in lin.fmt._runs] == ["Q4_K", "Q6_K", "run2_weight"]
    want = torch.cat([parts["q"].dequantize(256), parts["k"].dequantize(256), parts["v"]])
    torch.testing.assert_close(lin.fmt.dequantized(lin).cpu(), want, rtol=2e-7, atol=1e-9)
    for M in (1, 20):
        x = torch.randn(M, 256).to(DEVICE)
        assert rel_err(lin(x).cpu(), x.double().cpu() @ want.double().T) < 1e-5


@pytest.fixture(scope="module")
def all_types_gguf(tmp_path_factory):
    from tests.loader.test_gguf_types import build_model

    path = tmp_path_factory.mktemp("all-types-gpu") / "tiny-all-types.gguf"
    truth, types = build_model(path)
    return path, truth, types


def test_all_types_model_equals_dequantized(all_types_gguf, gpu_storage):
    """The all-types GGUF with --weights auto on GPU storage: every linear weight is its file's
    decoding (float32 rounding), the embedding stays in its blocks, weight bytes are the file's
    (+ the K-quants' unpacked sub-scales), and logits equal the dequantize-at-load path's."""
    from tests.test_quantize import logits, runner

    path, truth, types = all_types_gguf
    r, d = runner(path, "auto", max_len=16, device=DEVICE), runner(path, "dense", max_len=16)
    model = r.model
    for name in truth:
        target = model.linear_for(name)
        if target is None:
            continue
        lin, shard = target
        off, rows = lin.shard_offsets[shard]
        got = lin.fmt.dequantized(lin)[off : off + rows].cpu()
        torch.testing.assert_close(got, torch.from_numpy(truth[name]), rtol=2e-7, atol=1e-9, msg=name)
    emb_type = getattr(Q, types["model.embed_tokens.weight"])
    assert (model.embed.table is not None) == (emb_type in BLOCK_TYPES)
    from bitfold.loader.gguf_reader import GGUFFile

    def expected(t) -> int:  # a 2-D tensor as the model holds it
        n = int(t.n_bytes)
        if t.tensor_type in BLOCK_TYPES:
            return n + EXTRA.get(t.tensor_type, 0) * (n // BLOCK_TYPES[t.tensor_type].type_size)
        return 4 * int(np.prod(t.shape))  # F16/BF16/F32 -> float32, the compute dtype here

    file_bytes = sum(expected(t) for t in GGUFFile(path).tensors if len(t.shape) == 2)
    held = sum(t.numel() * t.element_size() for n, t in [*model.named_parameters(), *model.named_buffers()]
               if n != "rope" and "norm" not in n)
    assert held == file_bytes  # F16/BF16 tensors become float32 runs here (the compute dtype)
    ids = list(range(3, 250, 17))
    assert rel_err(logits(r, ids), logits(d, ids)) < 1e-5


@pytest.mark.slow
def test_default_model_weight_memory_is_its_file(smollm2_path, gpu_storage):
    """SmolLM2 on GPU storage: Q4_1 layers and the tied Q8_0 head/embedding (one copy) hold the
    file's bytes; the weights need no more memory than the file."""
    from tests.test_quantize import runner

    r = runner(smollm2_path, "auto", max_len=16, device=DEVICE)
    model = r.model
    assert model.embed.weight.numel() == 0 and model.embed(torch.tensor([5, 7], device=DEVICE)).shape == (2, 576)
    held = sum(t.numel() * t.element_size() for n, t in [*model.named_parameters(), *model.named_buffers()]
               if n != "rope")
    size = os.path.getsize(smollm2_path)
    assert 0.9 * size <= held <= size, (held, size)  # the rest of the file: tokenizer, metadata
    head = model.lm_head
    assert [run[3] for run in head.fmt._runs] == ["Q8_0"]
    assert [run[3] for run in model.layers[0].attn.qkv.fmt._runs] == ["Q4_1"]


def test_quantized_embedding_rows(gpu_storage):
    """An untied embedding stored in blocks stays in them (its table is a `gguf` layer); looked-up
    rows equal the dequantized table; the model's pass over its Linear layers (which includes
    the table) leaves it intact."""
    from bitfold.layers.embedding import Embedding
    from bitfold.weights.gguf_blocks import GGUFBlocks
    from tests.loader.test_gguf_types import craft_k_quant

    blocks = GGUFBlocks(craft_k_quant(64, Q.Q4_K, np.random.default_rng(9)), Q.Q4_K, "token_embd")
    with torch.device(DEVICE):
        emb = Embedding(64, 256, torch.float32, "gguf")
    emb.load(blocks)
    assert emb.weight.numel() == 0 and emb.table is not None
    for m in emb.modules():
        if isinstance(m, Linear):
            m.fmt.process_after_loading(m)
    ids = torch.tensor([3, 0, 63, 3], device=DEVICE)
    want = blocks.dequantize(256)[ids.cpu()]
    torch.testing.assert_close(emb(ids).cpu(), want, rtol=2e-7, atol=1e-9)
    with torch.device(DEVICE):
        dense = Embedding(64, 256, torch.float32, "dense")
    dense.load(blocks)  # a format that cannot gather: the float table
    assert dense.table is None and torch.equal(dense(ids).cpu(), want)


@pytest.mark.parametrize("fmt", ["gguf", "int4-g64"])
def test_down_projection_takes_silu_mul(gpu_storage, monkeypatch, fmt):
    """Linear(h, act="silu_mul") (SwiGLU's down, gate | up in) on a GPU layout: with the dp4a
    default on, the kernel computes silu(gate) * up itself; off, the SiLU kernel runs first. Both
    equal the layer applied to silu(gate) * up (within the int8 activations' rounding)."""
    from bitfold.kernels import qmatmul as qm
    from bitfold.kernels.silu_mul import silu_and_mul_ref
    from bitfold.weights.gguf_blocks import GGUFBlocks
    from tests.loader.test_gguf_types import craft_k_quant

    rng = np.random.default_rng(7)
    torch.manual_seed(7)
    with torch.device(DEVICE):
        lin = Linear(256, {"down": 32}, False, fmt, torch.float32)
    if fmt == "gguf":
        lin.load_shard("down", GGUFBlocks(craft_k_quant(32, Q.Q4_K, rng), Q.Q4_K, "down"), False)
    else:
        lin.load_shard("down", torch.randn(32, 256) * 0.05, False)
    lin.fmt.process_after_loading(lin)
    h = torch.randn(2, 512).to(DEVICE)
    want = lin(silu_and_mul_ref(h))
    got = {}
    for rows in (0, 4):
        monkeypatch.setattr(qm, "DP4A_MAX_ROWS", rows)
        got[rows] = lin(h, act="silu_mul")
        # int8 activations of silu(gate) * up (heavy-tailed: products of Gaussians): a few percent
        assert rel_err(got[rows].cpu(), want.cpu()) < (0.06 if rows else 1e-5)
    assert not torch.equal(got[0], got[4])  # the int8 path really ran
    with pytest.raises(ValueError, match="unknown activation"):
        lin(h, act="gelu")
