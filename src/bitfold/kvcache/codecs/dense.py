"""Uncompressed K/V in the compute dtype: the reference every compressed codec is judged by.

Layout: per layer `DenseKV(k, v)`, each `[num_blocks, block_size, num_kv_heads, head_dim]`."""
from __future__ import annotations

from typing import NamedTuple

import torch

from bitfold.attention.base import AttentionOps
from bitfold.kernels import cpu_ops
from bitfold.kernels.kv_write import write_kv, write_kv_ref
from bitfold.kernels.paged_decode import paged_decode, paged_decode_ref
from bitfold.kernels.paged_prefill import paged_prefill, paged_prefill_ref
from bitfold.kvcache.codecs.base import KV_CODECS, KVCodec


class DenseKV(NamedTuple):
    k: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    v: torch.Tensor


class DenseOps(AttentionOps):
    """write -> decode or prefill over dense pages. `fuses_kv_write`: the decode kernel writes
    the new token's K/V itself (one launch per layer fewer)."""

    write = decode = prefill = None
    fuses_kv_write = False

    def forward(self, q, k, v, storage, meta, scale, sliding_window):
        k_cache, v_cache = storage
        if meta.decode_only and self.fuses_kv_write:
            return self.decode(q, k_cache, v_cache, meta.block_tables, meta.context_lens, scale, sliding_window,
                               new_k=k, new_v=v, slot_mapping=meta.slot_mapping, **self.decode_kwargs(meta))
        self.codec.write(storage, k, v, meta.slot_mapping)
        if meta.decode_only:
            return self.decode(q, k_cache, v_cache, meta.block_tables, meta.context_lens, scale, sliding_window,
                               **self.decode_kwargs(meta))
        return self.prefill(q, k_cache, v_cache, meta.block_tables, meta.cu_seqlens_q, meta.context_lens,
                            scale, sliding_window)

    def decode_kwargs(self, meta) -> dict:
        return {}


class DenseRefOps(DenseOps):
    decode, prefill = staticmethod(paged_decode_ref), staticmethod(paged_prefill_ref)


# Decode steps rotate q and the new K inside the decode attention kernel (which writes that K)
# instead of a rotary kernel, and read v from the fused q|k|v rows instead of a copy: two
# launches fewer per layer. Checked against the reference (tests/kernels/test_paged_decode.py),
# not yet timed on a GPU, so off (benchmarks/weights.py's "+rope" turns it on).
FUSE_ROTARY = False


class DenseTritonOps(DenseOps):
    decode, prefill = staticmethod(paged_decode), staticmethod(paged_prefill)
    fuses_kv_write = graph_safe = True

    def forward_rope(self, q, k, v, positions, cos_sin, storage, meta, scale, sliding_window):
        if not (FUSE_ROTARY and meta.decode_only):
            return super().forward_rope(q, k, v, positions, cos_sin, storage, meta, scale, sliding_window)
        return self.decode(q, storage.k, storage.v, meta.block_tables, meta.context_lens, scale, sliding_window,
                           new_k=k, new_v=v, slot_mapping=meta.slot_mapping, rope=(positions, cos_sin),
                           **self.decode_kwargs(meta))

    def decode_kwargs(self, meta):
        return {"max_context_len": meta.max_context_len}  # no device sync: CUDA-graph safe


class DenseCppOps(DenseOps):
    decode, prefill = staticmethod(cpu_ops.paged_decode), staticmethod(paged_prefill_ref)
    fuses_kv_write = True


@KV_CODECS.register("dense", "auto")
class DenseCodec(KVCodec):
    name = "dense"
    stores: torch.dtype | None = None  # the named 16/32-bit variants store exactly that dtype

    @property
    def bits_per_element(self) -> float:
        return torch.finfo(self.dtype).bits

    def page_bytes(self, block_size: int, num_kv_heads: int, head_dim: int) -> int:
        return 2 * block_size * num_kv_heads * head_dim * torch.finfo(self.dtype).bits // 8

    def allocate(self, num_blocks, block_size, num_kv_heads, head_dim, device, num_seqs=0, key_offset=None):
        # Uninitialized: attention never uses a slot before writing it (kernels mask their
        # loads, references mask values), and zero-filling 2 GiB on a CPU costs seconds.
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        return DenseKV(torch.empty(shape, dtype=self.dtype, device=device),
                       torch.empty(shape, dtype=self.dtype, device=device))

    def write(self, storage, k, v, slot_mapping) -> None:
        k_cache, v_cache = storage
        fn = write_kv if k_cache.is_cuda else write_kv_ref
        fn(k_cache, v_cache, k, v, slot_mapping)

    def validate(self, block_size, head_dim, max_model_len):
        if self.stores is not None and self.stores != self.dtype:
            want = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}[self.stores]
            return (f"KV cache {self.name} stores the compute dtype, which is {str(self.dtype).removeprefix('torch.')}"
                    f": add --dtype {want}, or use --kv-cache dense")
        return None

    def ops(self, backend):
        if backend == "cpu" and self.dtype != torch.float32:
            return "float32 KV pages only"
        cls = {"torch": DenseRefOps, "triton": DenseTritonOps, "cpu": DenseCppOps}.get(backend)
        return cls(self) if cls is not None else f"has no {backend} kernels for {self.name} pages"


for _name, _dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)):
    KV_CODECS.register(_name)(type(f"DenseCodec_{_name}", (DenseCodec,), {"name": _name, "stores": _dtype}))
