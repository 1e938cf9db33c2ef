"""Paged attention backends and the per-step attention metadata.

A backend declares what it supports as data and says why it refuses a configuration
(vLLM's seam). The "torch" backend runs the pure-PyTorch references of kernels/ and is what
the CPU uses; "triton" runs the Triton kernels of the same signatures on CUDA.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from bitfold.kernels import cpu_ops
from bitfold.kernels.paged_decode import paged_decode, paged_decode_ref
from bitfold.kernels.paged_prefill import paged_prefill, paged_prefill_ref
from bitfold.kernels._triton import HAS_TRITON
from bitfold.errors import BitfoldError
from bitfold.kvcache.codecs import KVCodec
from bitfold.registry import Registry


@dataclass
class AttentionMetadata:
    """Describes one step's batch to every attention layer.

    slot_mapping: int64 [T] cache slot of each new token; block_tables: int32 [B, max_blocks];
    context_lens: int32 [B] KV length of each sequence including this step's tokens;
    cu_seqlens_q: int32 [B + 1] offsets of each sequence's new tokens in the flat batch;
    max_context_len: a host-side upper bound of context_lens (kernels size their grid from it
    without a device sync; CUDA graphs pass the model's max length).
    """

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    cu_seqlens_q: torch.Tensor
    max_q_len: int
    max_context_len: int

    @property
    def decode_only(self) -> bool:
        return self.max_q_len == 1


class AttentionBackend:
    name: str
    devices: tuple[str, ...]
    codecs: tuple[str, ...]
    graph_safe: bool = False  # no host syncs, so a decode step can be captured in a CUDA graph
    # The decode kernel writes the new tokens' K/V itself (one launch per layer fewer); only
    # for backends that read the dense codec's pages, whose layout the kernel then owns.
    fuses_kv_write: bool = False

    @classmethod
    def why_unsupported(cls, device: torch.device, codec: KVCodec) -> str | None:
        if device.type not in cls.devices:
            return f"runs on {'/'.join(cls.devices)}, not {device.type}"
        if codec.name not in cls.codecs:
            return f"reads {'/'.join(cls.codecs)} KV pages, not {codec.name}"
        return None

    def __init__(self, codec: KVCodec):
        self.codec = codec

    def decode_kwargs(self, meta: AttentionMetadata) -> dict:
        return {}

    def forward(self, q, k, v, kv_storage, meta: AttentionMetadata, scale: float, sliding_window: int):
        """q: [T, H, D]; k, v: [T, KVH, D] (new tokens); writes k/v into the pages, returns [T, H, D]."""
        k_cache, v_cache = kv_storage
        if meta.decode_only and self.fuses_kv_write:
            return self.decode(q, k_cache, v_cache, meta.block_tables, meta.context_lens, scale, sliding_window,
                               new_k=k, new_v=v, slot_mapping=meta.slot_mapping, **self.decode_kwargs(meta))
        self.codec.write(kv_storage, k, v, meta.slot_mapping)
        if meta.decode_only:
            return self.decode(q, k_cache, v_cache, meta.block_tables, meta.context_lens, scale, sliding_window,
                               **self.decode_kwargs(meta))
        return self.prefill(q, k_cache, v_cache, meta.block_tables, meta.cu_seqlens_q, meta.context_lens,
                            scale, sliding_window)


ATTENTION_BACKENDS: Registry[type[AttentionBackend]] = Registry("attention backend")


@ATTENTION_BACKENDS.register("torch")
class TorchAttention(AttentionBackend):
    name, devices, codecs = "torch", ("cpu", "cuda"), ("dense",)
    decode = staticmethod(paged_decode_ref)
    prefill = staticmethod(paged_prefill_ref)


@ATTENTION_BACKENDS.register("cpu")
class CpuAttention(AttentionBackend):
    """C++ paged decode for CPU float32 caches (one call per layer instead of ~20 PyTorch ops);
    prefill stays on the reference."""

    name, devices, codecs, fuses_kv_write = "cpu", ("cpu",), ("dense",), True
    decode = staticmethod(cpu_ops.paged_decode)
    prefill = staticmethod(paged_prefill_ref)

    @classmethod
    def why_unsupported(cls, device, codec):
        if getattr(codec, "dtype", None) != torch.float32:
            return "float32 KV pages only"
        if not cpu_ops.available():
            return "the C++ CPU kernels could not be built"
        return super().why_unsupported(device, codec)


@ATTENTION_BACKENDS.register("triton")
class TritonAttention(AttentionBackend):
    name, devices, codecs, graph_safe, fuses_kv_write = "triton", ("cuda",), ("dense",), True, True
    decode = staticmethod(paged_decode)
    prefill = staticmethod(paged_prefill)

    @classmethod
    def why_unsupported(cls, device, codec):
        return "Triton is not installed" if not HAS_TRITON else super().why_unsupported(device, codec)

    def decode_kwargs(self, meta):
        return {"max_context_len": meta.max_context_len}  # no device sync: CUDA-graph safe


def select_backend(name: str, device: torch.device, codec: KVCodec) -> AttentionBackend:
    """`name` = "auto" takes the first backend (triton, then torch) that supports the setup."""
    order = ["triton", "cpu", "torch"] if name == "auto" else [name]
    if name != "auto" and name not in ATTENTION_BACKENDS:
        raise BitfoldError(f"unknown attention backend {name!r}; known: auto, {', '.join(ATTENTION_BACKENDS.names())}")
    reasons = []
    for n in order:
        cls = ATTENTION_BACKENDS.get(n)
        why = cls.why_unsupported(device, codec)
        if why is None:
            return cls(codec)
        reasons.append(f"{n}: {why}")
    raise BitfoldError("no attention backend fits: " + "; ".join(reasons))
