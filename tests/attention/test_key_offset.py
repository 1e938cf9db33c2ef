"""The key offset of compressed KV codecs (kvcache/codecs/quant.py): keys are stored minus a
constant per layer, KV head and channel (the model's k bias), which leaves attention exactly
unchanged but takes the constant out of what per-token scales must cover.

Against float64 attention over the exact keys and values: with the offset, every compressed codec
is at least as close as without it, and fp8/int8 (per-token scales) much closer on keys that
carry a large constant in a few channels (Qwen2's k bias); the models hand their k bias to the
codec (and none without a bias or with a per-head k norm in between)."""
from __future__ import annotations

import math

import pytest
import torch

from bitfold.attention import AttentionMetadata
from bitfold.kvcache.codecs import make_codec
from bitfold.kvcache.codecs import quant
from tests.helpers import PagedDriver, write_tiny_hf_model

KVH, H, D, BS = 2, 4, 64, 64


def _attend_exact(q, k, v):
    """q [H, D] of the newest token over k, v [L, KVH, D]: float64 softmax attention."""
    g = H // KVH
    s = torch.einsum("hd,lhd->hl", q.double(), k.double().repeat_interleave(g, 1)) / math.sqrt(D)
    return torch.einsum("hl,lhd->hd", s.softmax(-1), v.double().repeat_interleave(g, 1))


def _run(name: str, offset: torch.Tensor | None, k, v, q_last, prefill: int):
    """Prefill `prefill` tokens, then decode the rest one by one through the reference ops;
    the last decode step's output [H, D] (float32)."""
    codec = make_codec(name, torch.float32, residual=0 if name in ("fp8", "int8") else 64)
    L = k.shape[0]
    nb = -(-L // BS) + 1
    st = codec.allocate(nb, BS, KVH, D, torch.device("cpu"), 1, key_offset=offset)
    assert (st.k_offset is None) == (offset is None)
    ops = codec.ops("torch")
    table = torch.arange(nb, dtype=torch.int32).flip(0)[None, :]  # pages in reverse order
    slot = torch.zeros(1, dtype=torch.int32)

    def step(start, n, q):
        pos = torch.arange(start, start + n)
        slots = table[0, pos // BS].long() * BS + pos % BS
        meta = AttentionMetadata(slots, table, torch.tensor([start + n], dtype=torch.int32),
                                 torch.tensor([0, n], dtype=torch.int32), n, start + n, slot)
        return ops.forward(q, k[start:start + n], v[start:start + n], st, meta, 1 / math.sqrt(D), 0)

    gen = torch.Generator().manual_seed(7)
    step(0, prefill, torch.randn(prefill, H, D, generator=gen))
    for t in range(prefill, L - 1):
        step(t, 1, torch.randn(1, H, D, generator=gen))
    return step(L - 1, 1, q_last[None])[0]


def _keys_with_bias(L: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    bias = torch.zeros(KVH, D)
    bias[:, 3], bias[:, 17], bias[0, 40] = 60.0, -35.0, 25.0  # a few large constant channels (Qwen2's k bias)
    k = torch.randn(L, KVH, D, generator=gen) + bias
    v = torch.randn(L, KVH, D, generator=gen)
    q = torch.randn(H, D, generator=gen) * 2  # peaked enough that score errors show
    return bias, k, v, q


@pytest.mark.parametrize("name", ["fp8", "int8", "int4", "int2", "k8v4"])
def test_offset_never_hurts_and_fixes_per_token_scales(name):
    bias, k, v, q = _keys_with_bias(L=200, seed=1)
    exact = _attend_exact(q, k, v)
    err = {}
    for label, off in (("plain", None), ("offset", bias)):
        out = _run(name, off, k, v, q, prefill=150)
        err[label] = float((out.double() - exact).norm() / exact.norm())
    assert err["offset"] <= err["plain"] * 1.05 + 1e-4, err
    if name in ("fp8", "int8"):  # per-token scales: the offset was most of the range
        assert err["offset"] < err["plain"] / 3, err


def test_offset_is_exact_for_attention():
    """A 16-bit ring only (residual covers the whole context): no rounding of the pages at all,
    so keys minus any constant give the same attention to float32 precision."""
    bias, k, v, q = _keys_with_bias(L=40, seed=2)
    exact = _attend_exact(q, k, v)
    for off in (None, bias, torch.randn(KVH, D) * 50):
        codec = make_codec("int4", torch.float32, residual=128)
        assert codec.residual > k.shape[0]
        out = _run_ring_only(codec, off, k, v, q)
        torch.testing.assert_close(out.double(), exact, rtol=2e-5, atol=2e-5)


def _run_ring_only(codec, off, k, v, q):
    L = k.shape[0]
    st = codec.allocate(2, BS, KVH, D, torch.device("cpu"), 1, key_offset=off)
    table = torch.tensor([[1, 0]], dtype=torch.int32)
    pos = torch.arange(L)
    meta = AttentionMetadata(table[0, pos // BS].long() * BS + pos % BS, table, torch.tensor([L], dtype=torch.int32),
                             torch.tensor([0, L], dtype=torch.int32), L, L, torch.zeros(1, dtype=torch.int32))
    qs = torch.zeros(L, H, D)
    qs[-1] = q
    return codec.ops("torch").forward(qs, k, v, st, meta, 1 / math.sqrt(D), 0)[-1]


def test_offset_switch_and_shape_check(monkeypatch):
    codec = make_codec("fp8", torch.float32)
    with pytest.raises(ValueError, match="key offset of shape"):
        codec.allocate(2, BS, KVH, D, torch.device("cpu"), 1, key_offset=torch.zeros(KVH, D + 1))
    monkeypatch.setattr(quant, "KEY_OFFSET", False)
    assert codec.allocate(2, BS, KVH, D, torch.device("cpu"), 1, key_offset=torch.zeros(KVH, D)).k_offset is None


@pytest.mark.parametrize("kind,has", [("qwen2", True), ("llama", False), ("qwen3", False)])
def test_models_hand_their_k_bias_to_the_codec(tmp_path, kind, has):
    """Qwen2 has a k bias: the runner's compressed pages store keys minus it (float32 [KVH, D]);
    Llama has none, Qwen3's k norm comes after it."""
    hf = write_tiny_hf_model(kind, tmp_path, attention_bias=True) if kind == "qwen3" else \
        write_tiny_hf_model(kind, tmp_path)
    d = PagedDriver(str(tmp_path))
    offsets = d.runner.model.key_offsets()
    if not has:
        assert all(o is None for o in offsets)
        return
    attn = hf.model.layers[1].self_attn
    kvh, hd = hf.config.num_key_value_heads, hf.config.hidden_size // hf.config.num_attention_heads
    want = attn.k_proj.bias.detach().float().view(kvh, hd)
    # bitfold may permute rows at load (GGUF rotary order) but an HF checkpoint keeps HF's
    torch.testing.assert_close(offsets[1], want, rtol=0, atol=0)
