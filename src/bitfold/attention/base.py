"""Paged attention backends: the seam between a model's attention layer and the KV pages.

A backend is a family of kernels (PyTorch references, Triton, C++ for the CPU) with what it can
run on declared as data: devices, compute dtypes, a priority for "auto", whether a decode step
may be captured in a CUDA graph. Which KV codecs it can read is the codec's side of the seam:
a codec owns its page layout and names, per backend, the `AttentionOps` (its kernels) that read
it (`KVCodec.ops`). So adding a codec is one codec file + its kernel file + one registry line,
and no backend ever assumes the cache is a pair of dense `(k, v)` tensors.

`select_backend("auto", ...)` takes the highest-priority backend that can run the setup and
otherwise says, per backend, why not (vLLM's seam).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from bitfold.errors import BitfoldError
from bitfold.registry import Registry


@dataclass
class AttentionMetadata:
    """Describes one step's batch to every attention layer.

    slot_mapping: int64 [T] cache slot of each new token; block_tables: int32 [B, max_blocks];
    context_lens: int32 [B] KV length of each sequence including this step's tokens;
    cu_seqlens_q: int32 [B + 1] offsets of each sequence's new tokens in the flat batch;
    max_context_len: a host-side upper bound of context_lens (kernels size their grid from it
    without a device sync; CUDA graphs pass the model's max length);
    seq_slots: int32 [B] each sequence's slot in per-sequence codec storage (the residual window
    of KIVI codecs), -1 for none; None when the codec keeps no per-sequence state.
    """

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    cu_seqlens_q: torch.Tensor
    max_q_len: int
    max_context_len: int
    seq_slots: torch.Tensor | None = None

    @property
    def decode_only(self) -> bool:
        return self.max_q_len == 1


class AttentionOps(ABC):
    """The kernels one backend runs over one codec's pages: store the new tokens' K/V, then
    attend. `graph_safe`: no host syncs, so decode steps can be captured in a CUDA graph."""

    graph_safe: bool = False

    def __init__(self, codec):
        self.codec = codec

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, storage, meta: AttentionMetadata,
                scale: float, sliding_window: int) -> torch.Tensor:
        """q: [T, H, D]; k, v: [T, KVH, D] (the new tokens, rotary applied); storage: the codec's
        pages of this layer. Writes k/v into the pages and returns the attention output [T, H, D]."""

    def forward_rope(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                     cos_sin: torch.Tensor, storage, meta: AttentionMetadata, scale: float,
                     sliding_window: int) -> torch.Tensor:
        """`forward` of q and k before rotary (views of the fused q|k|v rows: heads contiguous,
        tokens any stride apart). Default: the rotary op, then `forward`; kernels that can rotate
        as they write the new K/V override it (one or two launches fewer per layer)."""
        from bitfold.layers.rotary import apply_rotary

        q, k = apply_rotary(q, k, positions, cos_sin)
        return self.forward(q, k, v.contiguous(), storage, meta, scale, sliding_window)


class AttentionBackend:
    """A kernel family. Subclasses set the class attributes; `why_unavailable` says why the
    family cannot run on this machine at all (e.g. Triton missing)."""

    name: str
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
    priority: int = 0  # "auto" tries backends from the highest priority down
    graph_safe: bool = False

    @classmethod
    def why_unavailable(cls) -> str | None:
        return None

    @classmethod
    def why_unsupported(cls, device: torch.device, dtype: torch.dtype, codec) -> str | None:
        """None when this backend can attend over `codec`'s pages on `device` in `dtype`."""
        if device.type not in cls.devices:
            return f"runs on {'/'.join(cls.devices)}, not {device.type}"
        if dtype not in cls.dtypes:
            return f"computes in {'/'.join(str(d).removeprefix('torch.') for d in cls.dtypes)}, not " \
                   f"{str(dtype).removeprefix('torch.')}"
        why = cls.why_unavailable()
        if why is not None:
            return why
        ops = codec.ops(cls.name)
        return ops if isinstance(ops, str) else None

    def __init__(self, codec):
        self.codec = codec
        ops = codec.ops(self.name)
        if isinstance(ops, str):
            raise BitfoldError(f"attention backend {self.name!r} cannot read {codec.name} KV pages: {ops}")
        self.ops: AttentionOps = ops

    @property
    def is_graph_safe(self) -> bool:
        return self.graph_safe and self.ops.graph_safe

    def forward(self, q, k, v, storage, meta: AttentionMetadata, scale: float, sliding_window: int) -> torch.Tensor:
        return self.ops.forward(q, k, v, storage, meta, scale, sliding_window)

    def forward_rope(self, q, k, v, positions, cos_sin, storage, meta: AttentionMetadata, scale: float,
                     sliding_window: int) -> torch.Tensor:
        return self.ops.forward_rope(q, k, v, positions, cos_sin, storage, meta, scale, sliding_window)


ATTENTION_BACKENDS: Registry[type[AttentionBackend]] = Registry("attention backend")


def select_backend(name: str, device: torch.device, dtype: torch.dtype, codec) -> AttentionBackend:
    """`name` = "auto" takes the highest-priority registered backend that supports the setup;
    any other name must support it. Raises BitfoldError saying why each candidate refused."""
    if name != "auto" and name not in ATTENTION_BACKENDS:
        raise BitfoldError(f"unknown attention backend {name!r}; known: auto, {', '.join(ATTENTION_BACKENDS.names())}")
    if name == "auto":
        order = sorted(ATTENTION_BACKENDS.names(), key=lambda n: -ATTENTION_BACKENDS.get(n).priority)
    else:
        order = [name]
    reasons = []
    for n in order:
        cls = ATTENTION_BACKENDS.get(n)
        why = cls.why_unsupported(device, dtype, codec)
        if why is None:
            return cls(codec)
        reasons.append(f"{n}: {why}")
    if name != "auto":
        raise BitfoldError(f"attention backend {name!r} cannot run KV cache {codec.name!r} on {device.type}: "
                           f"{reasons[0].split(': ', 1)[1]}")
    raise BitfoldError(f"no attention backend can read KV cache {codec.name!r} on {device.type}: " + "; ".join(reasons))
