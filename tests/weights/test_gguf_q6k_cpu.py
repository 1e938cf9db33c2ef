"""GGUF Q6_K layers on the CPU kept as the file's blocks (`weights/gguf.CPU_Q6K_NATIVE`, weights/gguf.py)
and run by the table-free Q6K kernel: held bytes = file bytes, rows equal to the `gguf` package's
dequantization, logits equal to the dequantize-at-load model within float32 rounding; merged
layers mixing Q6_K with other types keep their int6-g16 conversion; the fused step says why it
does not take such a model."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bitfold.kernels import lut_gemm as lut
from bitfold.layers.linear import Linear
from bitfold.weights.gguf_blocks import GGUFBlocks
from tests.helpers import rel_err

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402

from tests.loader.test_gguf_types import craft_k_quant  # noqa: E402
from tests.weights.test_embedding_rows import _ids, _runner, _teacher_forced, write_gguf  # noqa: E402

pytestmark = pytest.mark.skipif(not lut.available(), reason="the CPU kernels could not be built")


@pytest.fixture(autouse=True)
def wide_k_quants(monkeypatch):
    """write_gguf's encoder crafts K-quant rows of 256 columns; ffn_down has INTER: craft
    rows x (cols / 256) blocks (each block stands alone) and lay them out as the wider rows."""
    from tests.loader import test_gguf_types as types
    from tests.weights import test_embedding_rows as rows_mod

    def encode(w, qtype, rng):
        if qtype in types.K_QUANTS and w.ndim == 2 and w.shape[1] != 256:
            raw = craft_k_quant(w.shape[0] * w.shape[1] // 256, qtype, rng)
            return np.ascontiguousarray(raw.reshape(w.shape[0], -1))
        return types.encode(w, qtype, rng)

    monkeypatch.setattr(rows_mod, "encode", encode)


@pytest.fixture
def native(monkeypatch):
    from bitfold.weights import gguf as gguf_fmt

    monkeypatch.setattr(gguf_fmt, "CPU_Q6K_NATIVE", True)


def _file_blocks(path) -> dict:
    r = gguf.GGUFReader(str(path))
    return {t.name: t for t in r.tensors}


@pytest.mark.parametrize("tied", [True, False])
def test_q6k_model_holds_the_file_and_matches_dequantized(tmp_path, native, tied):
    """Every layer, the head and the embedding Q6_K: the Linears hold exactly those tensors' bytes;
    the embedding's rows are gguf's decoding; logits of prefill and decode steps equal the
    dequantize-at-load model's within float32 rounding."""
    path = tmp_path / "q6k.gguf"
    ref = write_gguf(path, Q.Q6_K, tied=tied, layer_type=Q.Q6_K)
    r = _runner(path)
    model = r.runner.model
    lins = [m for m in model.modules() if isinstance(m, Linear)]
    assert lins and all(m.fmt.name == "gguf" and hasattr(m, "q6k_blocks") for m in lins)
    held = sum(t.numel() * t.element_size() for m in lins for t in m.buffers())
    tensors = _file_blocks(path)
    # every Q6_K tensor once: tied, token_embd is the head; untied, the embedding's own table
    file_bytes = sum(int(t.n_bytes) for t in tensors.values() if t.tensor_type == Q.Q6_K)
    assert held == file_bytes
    ids = _ids(ref["embed"].shape[0], 50, 4)
    want = torch.from_numpy(ref["embed"])[ids]
    emb = model.embed
    assert torch.equal(emb(ids), want)  # tied: the head's blocks; untied: the Q6_K token_embd's rows
    if tied:
        assert emb.weight.numel() == 0 and emb.table is model.lm_head
    dense = _runner(path, "dense")
    prompts = [[5, 9, 200, 31], [7, 275], [1, 2, 3]]
    for step, (a, b) in enumerate(zip(_teacher_forced(r, prompts, 4, 1), _teacher_forced(dense, prompts, 4, 1))):
        assert rel_err(a, b) < 1e-5, f"step {step}: {rel_err(a, b):.2e}"


def test_fused_step_refuses_q6k_layers_with_a_reason(tmp_path, native):
    from bitfold.runner.cpu_step import why_not_model

    path = tmp_path / "q6k.gguf"
    write_gguf(path, Q.Q4_0, tied=True, layer_type=Q.Q6_K)
    model = _runner(path, fused=True).runner.model
    assert "Q6_K" in why_not_model(model) and "per-op" in why_not_model(model)


def test_default_stays_int6(tmp_path):
    path = tmp_path / "q6k.gguf"
    write_gguf(path, Q.Q4_0, tied=False, layer_type=Q.Q6_K)
    model = _runner(path).runner.model
    assert model.layers[0].mlp.down.fmt.name == "int6-g16" and model.lm_head.fmt.name == "int6-g16"


def test_merged_layer_of_mixed_types_stays_int6(native):
    """q (Q4_K) | v (Q6_K): the merged layer keeps one int6-g16 LUT storage (the Q6_K shard is
    converted as before), and gives the right products."""
    rng = np.random.default_rng(5)
    parts = {"q": GGUFBlocks(craft_k_quant(48, Q.Q4_K, rng), Q.Q4_K, "q"),
             "v": GGUFBlocks(craft_k_quant(16, Q.Q6_K, rng), Q.Q6_K, "v")}
    lin = Linear(256, {"q": 48, "v": 16}, False, "gguf", torch.float32)
    for name, t in parts.items():
        lin.load_shard(name, t, False)
    lin.fmt.process_after_loading(lin)
    assert lin.fmt.name == "int6-g16" and not hasattr(lin, "q6k_blocks")
    lone = Linear(256, {"v": 16}, False, "gguf", torch.float32)
    lone.load_shard("v", parts["v"], False)
    lone.fmt.process_after_loading(lone)
    assert hasattr(lone, "q6k_blocks") and torch.equal(lone.q6k_blocks, parts["v"].raw)
    want = parts["v"].dequantize(256)
    assert torch.equal(lone.fmt.dequantized(lone), want)
    ids = torch.tensor([3, 0, 15, 3])
    assert lone.fmt.can_gather(lone) and torch.equal(lone.fmt.rows(lone, ids), want[ids])
    x = torch.randn(5, 256)
    assert rel_err(lone(x), x.double() @ want.double().T) < 1e-6
    assert rel_err(lin(x)[:, 48:], x.double() @ want.double().T) < 2e-2  # LUT tables: int8 activations
