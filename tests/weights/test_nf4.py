"""weights/nf4.py: NF4 quantization (each weight's nearest codebook value times its group's
fp16 absmax, checked against a brute-force search), a merged layer of odd shapes on both storage
paths (the CPU C++ kernel; the Triton kernels on a GPU or through the interpreter) against the
float64 product with its dequantized weight, and a real model through the engine."""
from __future__ import annotations

import pytest
import torch

from bitfold.kernels import cpu_lib
from bitfold.layers.linear import Linear
from bitfold.weights import WEIGHT_FORMATS
from bitfold.weights.base import WeightFormat
from bitfold.weights.nf4 import NF4, quantize_cb4


def test_quantize_is_the_nearest_codebook_value():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(7, 128, generator=g) * 0.05
    w[2, 5] = 1.0  # an outlier: its group's scale
    w[3, 64:128] = 0.0  # an all-zero group: scale 0, codes of 0
    cb = torch.tensor(NF4)
    codes, s = quantize_cb4(w, 64, cb)
    assert codes.dtype == torch.uint8 and s.dtype == torch.float16 and s.shape == (7, 2)
    assert torch.equal(s, w.view(7, 2, 64).abs().amax(-1).half())
    u = (w.view(7, 2, 64) / torch.where(s > 0, s.float(), 1.0)[..., None]).view(7, 128)
    brute = (u[..., None] - cb).abs().argmin(-1)
    assert torch.equal(codes.long(), brute)
    assert float(s[3, 1]) == 0 and bool((cb[codes[3, 64:].long()] == 0).all())
    assert int(codes[2, 5]) == 15  # +absmax -> +1.0


def test_registered_names():
    assert WEIGHT_FORMATS.get("nf4") is WEIGHT_FORMATS.get("nf4-g64")
    assert {"nf4-g32", "nf4-g128"} <= set(WEIGHT_FORMATS.names())


@pytest.mark.parametrize("device", ["cpu", "gpu"])
@pytest.mark.parametrize("fmt", ["nf4-g32", "nf4", "nf4-g128"])
def test_merged_layer_matches_float64(device, fmt, monkeypatch):
    if device == "gpu":
        pytest.importorskip("triton")
        if not torch.cuda.is_available():  # the GPU path through Triton's interpreter
            monkeypatch.setattr(WeightFormat, "gpu_storage", staticmethod(lambda d: True))
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        if not cpu_lib.available():
            pytest.skip("the C++ CPU kernels could not be built")
        dev = torch.device("cpu")
    g = torch.Generator().manual_seed(1)
    with torch.device(dev):
        lin = Linear(200, {"a": 40, "b": 33}, True, fmt, torch.float32)
    wa, wb = torch.randn(40, 200, generator=g) * 0.05, torch.randn(33, 200, generator=g) * 0.05
    lin.load_shard("b", wb.to(dev), False)  # shards in any order
    lin.load_shard("a", wa.to(dev), False)
    lin.load_shard("a", torch.randn(40, generator=g).to(dev), True)
    lin.load_shard("b", torch.randn(33, generator=g).to(dev), True)
    lin.fmt.process_after_loading(lin)
    wq = lin.fmt.dequantize(lin).cpu().double()
    w = torch.cat([wa, wb]).double()
    assert float((wq - w).norm() / w.norm()) < 0.12  # 4-bit rounding, NF4 levels
    for M in (1, 3, 20):
        x = torch.randn(M, 200, generator=g)
        y = lin(x.to(dev)).cpu().double()
        exact = x.double() @ wq.t() + lin.bias.cpu().double()
        assert float((y - exact).norm() / exact.norm()) < 2e-5, M


def test_missing_rows_are_an_error():
    lin = Linear(64, {"a": 8, "b": 8}, False, "nf4", torch.float32)
    lin.load_shard("a", torch.randn(8, 64), False)
    with pytest.raises(ValueError, match="8 of 16 rows of a nf4-g64 layer were never loaded"):
        lin.fmt.process_after_loading(lin)


def test_smollm2_nf4_through_the_engine(smollm2_path, smollm2_llm):
    """SmolLM2 with every linear layer (and the tied head) in NF4 on the CPU: the same next token
    as the dense model on a factual prompt, its probability close."""
    from bitfold import LLM, SamplingParams

    prompt = "The capital of France is Paris. The capital of Germany is"
    sp = SamplingParams(max_tokens=1, temperature=0, logprobs=5)
    dense = smollm2_llm.generate([prompt], sp)[0]
    llm = LLM(smollm2_path, device="cpu", kv_cache_memory_gb=0.1, weights="nf4")
    assert type(llm.engine.runner.model.layers[0].mlp.down.fmt).__name__ == "NF4_g64"
    out = llm.generate([prompt], sp)[0]
    assert out.token_ids == dense.token_ids
    assert abs(dict(out.logprobs[0].top)[out.token_ids[0]] - dict(dense.logprobs[0].top)[dense.token_ids[0]]) < 0.3
    assert llm.engine.pool.num_free == llm.engine.pool.num_blocks
