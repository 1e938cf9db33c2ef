"""Programmatic dependent launch (kernels/_triton.py): a kernel launched with PDL starts while
its predecessor runs and may only read activations after `pdl_wait`. A missing or misplaced
wait is a race, so the GPU test runs a decode-shaped chain of dependent kernels (each reads the
one before it, some write buffers the one before read) in a CUDA graph, replayed many times
with fresh inputs, and requires the PDL graph's outputs to equal, bit for bit, the same chain
launched without PDL. The CPU tests check the switch: what says PDL is unsupported and why,
and that the interpreter never launches with PDL."""
from __future__ import annotations

import pytest
import torch

from bitfold.kernels import _triton

from ._util import INTERPRETED


def test_pdl_unsupported_off_gpu_says_why():
    ok, why = _triton.pdl_supported(torch.device("cpu"))
    assert not ok and "cpu" in why


def test_interpreter_never_launches_with_pdl(monkeypatch):
    monkeypatch.setattr(_triton, "PDL", True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _triton.pdl_launch() is False


def test_pdl_on_without_support_is_a_clear_error(smollm2_path):
    """Raised before the weights load (the runner checks before it builds the model)."""
    from bitfold import LLM
    from bitfold.errors import BitfoldError

    with pytest.raises(BitfoldError, match="--pdl on: PDL is a CUDA feature, not cpu"):
        LLM(smollm2_path, device="cpu", pdl="on", kv_cache_memory_gb=0.01)


def _chain(x, res, w_dense, w_q, norm_w, cos_sin, positions, caches, meta):
    """One decode-layer-shaped chain: add + RMSNorm, dense GEMV, rotary, paged decode attention
    (writing the new K/V), dp4a GEMV (activations quantized inside), SiLU-and-multiply,
    float low-bit GEMV, RMSNorm."""
    from bitfold.kernels import qmatmul as qm
    from bitfold.kernels.gemv import gemv
    from bitfold.kernels.paged_decode import paged_decode
    from bitfold.kernels.rms_norm import fused_add_rms_norm, rms_norm
    from bitfold.kernels.rotary import rotary
    from bitfold.kernels.silu_mul import silu_and_mul

    B, H, KVH, D = meta["B"], meta["H"], meta["KVH"], meta["D"]
    h, res = fused_add_rms_norm(x, res, norm_w, 1e-5)
    qkv = gemv(h, w_dense)
    q, k, v = qkv.split([H * D, KVH * D, KVH * D], dim=-1)
    q, k = rotary(q.reshape(B, H, D), k.reshape(B, KVH, D), positions, cos_sin)
    o = paged_decode(q, caches[0], caches[1], meta["tables"], meta["lens"], D ** -0.5, new_k=k,
                     new_v=v.reshape(B, KVH, D).contiguous(), slot_mapping=meta["slots"],
                     max_context_len=meta["max_len"])
    g = qm.qmatmul(o.reshape(B, H * D), w_q, kind="dp4a", fuse_x=True)
    a = silu_and_mul(g)
    y = qm.qmatmul(a.contiguous(), meta["w_q2"], kind="gemv")
    return rms_norm(y, norm_w, 1e-5), res


@pytest.mark.skipif(INTERPRETED, reason="PDL needs a GPU")
def test_pdl_chain_in_cuda_graph_equals_serial(monkeypatch):
    ok, why = _triton.pdl_supported(torch.device("cuda"))
    if not ok:
        pytest.skip(why)
    from bitfold.kernels import qmatmul as qm
    from bitfold.weights.lowbit import gpu_layout, lowbit_spec

    dev, dt = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    B, H, KVH, D, hid, inter, bs, ctx = 2, 8, 2, 64, 512, 768, 16, 200
    lay = gpu_layout(lowbit_spec("int4-g64"))

    def qweight(n, k):
        q = torch.randint(0, 16, (n, lay.padded(k)), dtype=torch.uint8, device=dev, generator=g)
        s = (torch.rand(n, lay.padded(k) // lay.group, device=dev, generator=g) * 2e-3 + 1e-4).half()
        return qm.QWeight(lay, n, k, qm.pack_codes(q, lay.planes), s, (-s.float() * 7.5).half())

    w_dense = (torch.randn((H + 2 * KVH) * D, hid, device=dev, generator=g) * 0.05).to(dt)
    w_q, w_q2 = qweight(2 * inter, H * D), qweight(hid, inter)
    norm_w = (1 + 0.1 * torch.randn(hid, device=dev, generator=g)).to(dt)
    cos_sin = torch.randn(4096, D, device=dev, generator=g)
    blocks = B * (ctx // bs + 2)
    tables = torch.arange(blocks, device=dev, dtype=torch.int32).reshape(B, -1)
    lens = torch.full((B,), ctx, device=dev, dtype=torch.int32)
    pos = (lens - 1).long()
    slots = tables[:, (ctx - 1) // bs].long() * bs + (ctx - 1) % bs
    meta = dict(B=B, H=H, KVH=KVH, D=D, tables=tables, lens=lens, slots=slots, max_len=4096, w_q2=w_q2)
    x_in = torch.zeros(B, hid, device=dev, dtype=dt)
    r_in = torch.zeros_like(x_in)

    def run(pdl: bool, steps: list[tuple[torch.Tensor, torch.Tensor]]):
        monkeypatch.setattr(_triton, "PDL", pdl)
        caches = [(torch.randn(blocks, bs, KVH, D, device=dev, generator=torch.Generator(device=dev).manual_seed(1))
                   .to(dt)) for _ in range(2)]
        for _ in range(2):  # compile outside the capture
            _chain(x_in, r_in, w_dense, w_q, norm_w, cos_sin, pos, caches, meta)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out, res = _chain(x_in, r_in, w_dense, w_q, norm_w, cos_sin, pos, caches, meta)
        outs = []
        for x, r in steps:
            x_in.copy_(x)
            r_in.copy_(r)
            graph.replay()
            outs.append((out.clone(), res.clone()))
        torch.cuda.synchronize()
        return outs, [c.clone() for c in caches]

    steps = [(torch.randn(B, hid, device=dev, generator=g).to(dt), torch.randn(B, hid, device=dev, generator=g).to(dt))
             for _ in range(12)]
    pdl_outs, pdl_caches = run(True, steps)
    ref_outs, ref_caches = run(False, steps)
    for (a, ra), (b, rb) in zip(pdl_outs, ref_outs):
        assert torch.equal(a, b) and torch.equal(ra, rb)
    assert all(torch.equal(a, b) for a, b in zip(pdl_caches, ref_caches))
