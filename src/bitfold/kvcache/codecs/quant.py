"""Compressed KV codecs: fp8, int8, and KIVI int4/int2, with K and V settable apart.

| name            | K                                  | V                                   | residual |
|-----------------|------------------------------------|-------------------------------------|----------|
| fp8             | e4m3, scale per token and head     | e4m3, scale per token and head      | 0        |
| int8            | int8, scale per token and head     | int8, scale per token and head      | 0        |
| int4 (= k4v4)   | 4-bit per channel over a page      | 4-bit per token, groups of 64 chans | 128      |
| int2 (= k2v2)   | 2-bit per channel over a page      | 2-bit per token, groups of 64 chans | 128      |
| kXvY            | X in 16/8/4/2, Y likewise (8 = int8, 16 = the compute dtype)            ||

KIVI (Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", arXiv
2402.02750): keys have outlier *channels*, so they are quantized per channel over a group of
tokens (here: one page, `block_size` = 64 tokens by default); values per token. The newest
`residual` tokens stay in the compute dtype (its R; 128 by default, as in the paper's
experiments) until their page is whole and older than the window, then the page is quantized
in place once (kernels/quant_kv_write.py).

Key offset: every compressed codec stores k - c instead of k, with c a constant per layer, KV
head and channel (the model's `k_proj` bias, `KVCodec.allocate(key_offset=)`). Attention is
exactly unchanged, q . (k - c) = q . k - q . c being the same shift of every score of a query
row, which softmax ignores; but a bias is a large offset common to every token (Qwen2's keys
carry channels of ~100 on values of ~1), and a per-token scale (fp8, int8) must then cover the
offset instead of what varies. Measured on Qwen2.5-1.5B (CPU, 4 windows of 768 tokens, 256
scored by decode, `eval-ppl-qwen-kv8-offset-cpu-20261205`): fp8 +21.7% -> -0.08% perplexity
(KL 1.8e-1 -> 3.9e-3), int8 +0.73% -> -0.21% (KL 1.5e-2 -> 2.1e-3). KIVI keys take a zero point
per channel anyway. `KEY_OFFSET = False` turns it off (for measurements).

Optional Hadamard rotation of keys (RotateKV, arXiv 2501.16383; QuaRot, arXiv 2404.00456):
q and k are both multiplied by the same orthonormal Hadamard matrix before k is stored, so
q . k is unchanged while a channel's outliers are spread over all channels. Off by default: on
int8 keys it helps less than the key offset (KL 4.0e-3 against 2.1e-3 in the run above), and on
fp8 it is a disaster (+1097%): e4m3's error is relative, so spreading the offset's magnitude
over every channel puts a large error on the channels q reads (`eval-ppl-qwen-kv8-rotate-cpu-20261205`).

Bytes at 32K tokens, head_dim 128, relative to bf16 (codes + fp16 scales/zeros + the residual
ring amortized): fp8/int8 0.508, int4 0.287, int2 0.162 (`KVCacheSpec.bytes_per_token`).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from bitfold.attention.base import AttentionOps
from bitfold.kernels.quant_kv_cpu import quant_paged_decode_cpu_or_ref, write_quant_kv_cpu_or_ref
from bitfold.kernels.quant_kv_attention import (quant_paged_decode, quant_paged_decode_ref, quant_paged_prefill,
                                                quant_paged_prefill_ref)
from bitfold.kernels.quant_kv_write import (KIND_DENSE, KIND_FP8, KIND_GROUP, KIND_INT8, QuantLayout,
                                            write_quant_kv, write_quant_kv_ref)
from bitfold.kvcache.codecs.base import KV_CODECS, KVCodec

DEFAULT_BLOCK = 64  # a KIVI key group = one page
DEFAULT_RESIDUAL = 128
DEFAULT_V_GROUP = 64
KEY_OFFSET = True  # store k - (the model's k bias); see the module docstring


class QuantKV(NamedTuple):
    """One layer's compressed pages (see kernels/quant_kv_write.py for every shape)."""

    k: torch.Tensor
    k_meta: torch.Tensor
    v: torch.Tensor
    v_meta: torch.Tensor
    ring_k: torch.Tensor  # [seq slots, residual + block_size, KVH, D] in the compute dtype, or empty
    ring_v: torch.Tensor
    layout: QuantLayout
    k_offset: torch.Tensor | None = None  # float32 [KVH, D] subtracted from every key before it is stored


def hadamard(n: int) -> torch.Tensor:
    """Orthonormal Sylvester-Hadamard matrix [n, n] (n a power of two), float32."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


class QuantOps(AttentionOps):
    """Rotate (if the codec does), quantize-on-write, then attend over pages + ring."""

    write = decode = prefill = None

    def __init__(self, codec):
        super().__init__(codec)
        self._rot: dict = {}

    def _rotate(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.device, x.dtype, x.shape[-1])
        h = self._rot.get(key)
        if h is None:
            h = self._rot[key] = hadamard(x.shape[-1]).to(x.device)
        return (x.float() @ h).to(x.dtype)

    def forward(self, q, k, v, storage, meta, scale, sliding_window):
        lay = storage.layout
        if storage.k_offset is not None:  # attention-invariant (module docstring); before any use of k
            k = (k.float() - storage.k_offset).to(k.dtype)
        if self.codec.rotate:
            q, k = self._rotate(q), self._rotate(k)
        if meta.decode_only:
            self.write(lay, storage, k, v, meta)
            return self.decode(lay, q, storage, meta.block_tables, meta.context_lens, meta.seq_slots, scale,
                               sliding_window, **self.decode_kwargs(meta))
        # Prefill reads what decoding would have (kernels/quant_kv_attention.py): pages sealed
        # first, the ring's old contents and the new rows exact, the ring written last.
        self.write(lay, storage, k, v, meta, phase="seal")
        out = self.prefill(lay, q, k, v, storage, meta.block_tables, meta.cu_seqlens_q, meta.context_lens,
                           meta.seq_slots, scale, sliding_window)
        self.write(lay, storage, k, v, meta, phase="ring")
        return out

    def decode_kwargs(self, meta) -> dict:
        # a host-side bound of the context: the kernels plan splits from it without a device read
        # (CUDA-graph safe); the reference takes and ignores it
        return {"max_context_len": meta.max_context_len}


class QuantRefOps(QuantOps):
    write, decode, prefill = (staticmethod(write_quant_kv_ref), staticmethod(quant_paged_decode_ref),
                              staticmethod(quant_paged_prefill_ref))


class QuantCppOps(QuantOps):
    """The CPU backend: a decode step's write and attention through the C++ kernels
    (kernels/quant_kv_cpu.py; the references for inputs they cannot take), prompt chunks (write
    and attention) through the references: decode steps are where a CPU spends its time."""

    write, decode, prefill = (staticmethod(write_quant_kv_cpu_or_ref), staticmethod(quant_paged_decode_cpu_or_ref),
                              staticmethod(quant_paged_prefill_ref))


class QuantTritonOps(QuantOps):
    write, decode, prefill = staticmethod(write_quant_kv), staticmethod(quant_paged_decode), staticmethod(quant_paged_prefill)
    graph_safe = True


_SIDES = {16: (KIND_DENSE, 16), 8: (KIND_INT8, 8), 4: (KIND_GROUP, 4), 2: (KIND_GROUP, 2)}


class QuantCodec(KVCodec):
    """A compressed codec; registered subclasses fix `k_side`, `v_side` ((kind, bits) each)."""

    k_side: tuple[int, int]
    v_side: tuple[int, int]
    default_block_size = DEFAULT_BLOCK
    rotate_by_default = False  # see README "Compressed KV cache" for the measurements behind it

    def __init__(self, dtype: torch.dtype, residual: int | None = None, rotate: bool = False,
                 v_group: int = DEFAULT_V_GROUP):
        super().__init__(dtype)
        sub_byte = KIND_GROUP in (self.k_side[0], self.v_side[0])
        self._residual = (DEFAULT_RESIDUAL if sub_byte else 0) if residual is None else residual
        self.rotate = rotate
        self.v_group = v_group

    @property
    def residual(self) -> int:
        return self._residual

    def layout(self, block_size: int, num_kv_heads: int, head_dim: int) -> QuantLayout:
        return QuantLayout(k_kind=self.k_side[0], k_bits=self.k_side[1], v_kind=self.v_side[0], v_bits=self.v_side[1],
                           block_size=block_size, head_dim=head_dim, num_kv_heads=num_kv_heads,
                           # at most two V groups per head: the kernels keep one accumulator per group
                           v_group=max(min(self.v_group, head_dim), head_dim // 2), residual=self._residual)

    @property
    def bits_per_element(self) -> float:
        lay = self.layout(DEFAULT_BLOCK, 1, 128)
        dense = torch.finfo(self.dtype).bits // 8
        return 8 * (lay.side_bytes(True, dense) + lay.side_bytes(False, dense)) / (2 * DEFAULT_BLOCK * 128)

    def page_bytes(self, block_size, num_kv_heads, head_dim):
        lay = self.layout(block_size, num_kv_heads, head_dim)
        dense = torch.finfo(self.dtype).bits // 8
        return num_kv_heads * (lay.side_bytes(True, dense) + lay.side_bytes(False, dense))

    def seq_bytes(self, block_size, num_kv_heads, head_dim):
        lay = self.layout(block_size, num_kv_heads, head_dim)
        return 2 * lay.ring_cap * num_kv_heads * head_dim * (torch.finfo(self.dtype).bits // 8)

    def needs_seq_slots(self, block_size: int, num_kv_heads: int, head_dim: int) -> bool:
        return self.layout(block_size, num_kv_heads, head_dim).ring

    def validate(self, block_size, head_dim, max_model_len):
        lay = self.layout(block_size, 1, head_dim)
        if head_dim < 16 or head_dim & (head_dim - 1):
            return f"head_dim {head_dim} is not a power of two >= 16 (the kernels tile whole heads)"
        if block_size < 16 * lay.planes:
            return (f"block size {block_size} is too small: {self.name} packs {lay.planes} tokens per byte and its "
                    f"kernels need >= 16 tokens per plane (use --block-size {16 * lay.planes} or more)")
        if lay.v_kind == KIND_GROUP and head_dim % lay.v_group:
            return f"V groups of {lay.v_group} channels do not divide head_dim {head_dim}"
        if self._residual < 0:
            return f"residual window {self._residual} must be >= 0"
        if self._residual >= max_model_len:
            return (f"residual window {self._residual} tokens is not smaller than the context ({max_model_len} "
                    f"tokens): nothing would ever be compressed; lower --kv-residual")
        if self.rotate and head_dim & (head_dim - 1):
            return f"Hadamard rotation needs a power-of-two head_dim, got {head_dim}"
        return None

    def allocate(self, num_blocks, block_size, num_kv_heads, head_dim, device, num_seqs=0, key_offset=None):
        lay = self.layout(block_size, num_kv_heads, head_dim)
        if key_offset is not None and KEY_OFFSET:
            if tuple(key_offset.shape) != (num_kv_heads, head_dim):
                raise ValueError(f"key offset of shape {tuple(key_offset.shape)}, expected {(num_kv_heads, head_dim)}")
            key_offset = key_offset.detach().to(device, torch.float32).contiguous()
        else:
            key_offset = None
        k, k_meta = lay.allocate_side(True, num_blocks, self.dtype, device)
        v, v_meta = lay.allocate_side(False, num_blocks, self.dtype, device)
        if lay.ring:
            shape = (max(num_seqs, 1), lay.ring_cap, num_kv_heads, head_dim)
            ring_k = torch.empty(shape, dtype=self.dtype, device=device)
            ring_v = torch.empty(shape, dtype=self.dtype, device=device)
        else:
            ring_k = ring_v = torch.empty(0, dtype=self.dtype, device=device)
        return QuantKV(k, k_meta, v, v_meta, ring_k, ring_v, lay, key_offset)

    def ops(self, backend):
        if backend == "cpu" and self.dtype != torch.float32:
            return "float32 KV pages only"
        cls = {"torch": QuantRefOps, "triton": QuantTritonOps, "cpu": QuantCppOps}.get(backend)
        return cls(self) if cls is not None else f"has no {backend} kernels for {self.name} pages"


def _register(name: str, k_side, v_side, *aliases: str) -> None:
    cls = type(f"QuantCodec_{name}", (QuantCodec,), {"name": name, "k_side": k_side, "v_side": v_side})
    KV_CODECS.register(name, *aliases)(cls)


_register("fp8", (KIND_FP8, 8), (KIND_FP8, 8))
_register("int8", (KIND_INT8, 8), (KIND_INT8, 8), "k8v8")
_register("int4", _SIDES[4], _SIDES[4], "k4v4")
_register("int2", _SIDES[2], _SIDES[2], "k2v2")
for _k in (16, 8, 4, 2):
    for _v in (16, 8, 4, 2):
        if _k != _v:
            _register(f"k{_k}v{_v}", _SIDES[_k], _SIDES[_v])
