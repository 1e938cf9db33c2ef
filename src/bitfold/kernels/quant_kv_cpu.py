"""Decode attention over compressed KV pages on the CPU: the C++ kernel `bitfold_quant_decode`
(kernels/cpu/quant_kv.cpp) behind `quant_paged_decode_cpu`, with the same signature and meaning as
its reference `quant_paged_decode_ref` (kernels/quant_kv_attention.py, re-exported here).

The reference dequantizes every page of the batch into float tensors at every step; the kernel
reads each page's codes once per (sequence, KV head), unpacks it into an L1-sized float tile,
folds KIVI's per-channel key scale into q and its zero point into a per-row bias, and runs an
online softmax in float32 (see the C++ file). Float32 only (the CPU's compute dtype): q, the
output, dense sides and the rings. `quant_paged_decode_cpu_or_ref` is what the CPU backend's ops
call: the kernel where `why_not` has nothing against the inputs, the reference otherwise.
Prefill over compressed pages stays the reference (`quant_paged_prefill_ref`).
"""
from __future__ import annotations

import ctypes
import weakref

import torch

from bitfold.kernels.cpu_lib import ISAS, available, load_cpu_library
from bitfold.kernels.quant_kv_attention import _check, quant_paged_decode_ref
from bitfold.kernels.quant_kv_write import KIND_DENSE, KIND_GROUP, QuantLayout, write_quant_kv_ref

__all__ = ["quant_paged_decode_cpu", "quant_paged_decode_cpu_or_ref", "quant_paged_decode_ref", "why_not",
           "write_quant_kv_cpu_or_ref", "write_quant_kv_decode_cpu", "write_quant_kv_ref"]

# A split (flash-decoding) covers at least this many pages: below, its partial results cost more
# to write and merge than the parallelism gains.
MIN_SPLIT_PAGES = 8


class _Args(ctypes.Structure):
    """`BitfoldQuantDecodeArgs` of quant_kv.cpp, field for field."""

    _fields_ = [(name, ctypes.c_void_p) for name in (
        "q", "k", "k_meta", "v", "v_meta", "ring_k", "ring_v", "block_tables", "context_lens", "seq_slots", "out",
        "part_m", "part_l", "part_acc")] + [(name, ctypes.c_int32) for name in (
            "batch", "heads", "kv_heads", "head_dim", "block_size", "max_blocks", "num_blocks", "num_slots",
            "k_kind", "k_bits", "v_kind", "v_bits", "v_group", "residual", "ring_cap", "sliding_window",
            "num_splits", "num_threads", "isa", "reserved")] + [("scale", ctypes.c_float)]


def why_not(lay: QuantLayout, q: torch.Tensor, storage) -> str | None:
    """Why the C++ kernel cannot take these inputs (None: it can)."""
    if not available():
        return "the C++ CPU kernels could not be built"
    if q.device.type != "cpu" or storage.k.device.type != "cpu":
        return f"runs on the CPU, not {q.device.type}"
    if q.dtype != torch.float32:
        return f"computes in float32, not {str(q.dtype).removeprefix('torch.')}"
    dense_sides = [t for kind, t in ((lay.k_kind, storage.k), (lay.v_kind, storage.v)) if kind == KIND_DENSE]
    rings = [storage.ring_k, storage.ring_v] if lay.ring else []
    if any(t.dtype != torch.float32 for t in dense_sides + rings):
        return "16-bit sides and rings must be float32 (the codec's compute dtype)"
    if lay.head_dim % 32:
        return f"head_dim {lay.head_dim} is not a multiple of 32 (whole AVX-512 vectors, two per tile)"
    if lay.v_kind == KIND_GROUP and lay.v_group % 16:
        return f"V groups of {lay.v_group} channels are not whole AVX-512 vectors"
    return None


def _ptr(t: torch.Tensor | None) -> int | None:
    return t.data_ptr() if t is not None and t.numel() else None


def split_count(batch: int, kv_heads: int, max_pages: int, threads: int) -> int:
    """Splits per (sequence, KV head): enough tasks for 2 per thread (the pool balances claims),
    each split at least MIN_SPLIT_PAGES pages."""
    tasks = batch * kv_heads
    if tasks >= 2 * threads:
        return 1
    return max(1, min(-(-2 * threads // max(tasks, 1)), max_pages // MIN_SPLIT_PAGES))


def quant_paged_decode_cpu(lay: QuantLayout, q: torch.Tensor, storage, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, seq_slots: torch.Tensor | None, scale: float,
                           sliding_window: int = 0, *, num_splits: int | None = None, num_threads: int | None = None,
                           isa: str | None = None, max_context_len: int | None = None, **_) -> torch.Tensor:
    """`quant_paged_decode_ref` in C++ (same arguments: q `[B, num_heads, head_dim]` float32; storage
    the layer's `QuantKV`; block_tables int32 `[B, max_blocks]`; context_lens int32 `[B]` (the new
    token included, already written); seq_slots int32 `[B]` (ring slot, -1 = a padding row: its
    ring is not read) when the codec has a ring). Returns `[B, num_heads, head_dim]` float32; a
    sequence with nothing to attend to gets zeros. `num_splits`: runs of pages per (sequence, KV
    head) (default `split_count`); `num_threads`: default torch.get_num_threads(); `isa`: "scalar",
    "avx2", "avx512" (default: the best this CPU has; a better one than it has falls back);
    `max_context_len`: a host-side bound of context_lens (saves reading it to plan the splits)."""
    why = why_not(lay, q, storage)
    if why is not None:
        raise ValueError(f"the C++ compressed-KV decode cannot run these inputs: {why}")
    return _decode(lay, q, storage, block_tables, context_lens, seq_slots, scale, sliding_window, num_splits,
                   num_threads, isa, max_context_len)


def _decode(lay, q, storage, block_tables, context_lens, seq_slots, scale, sliding_window, num_splits, num_threads,
            isa, max_context_len) -> torch.Tensor:
    _check(lay, q, storage, block_tables, context_lens, seq_slots, sliding_window)
    B, H, D = q.shape
    out = torch.empty(B, H, D, dtype=torch.float32)
    if B == 0:
        return out
    q = q.contiguous()
    block_tables, context_lens = block_tables.contiguous(), context_lens.contiguous()
    if seq_slots is not None:
        seq_slots = seq_slots.contiguous()
    threads = num_threads or torch.get_num_threads()
    BS = lay.block_size
    max_pages = -(-(int(context_lens.max()) if max_context_len is None else max_context_len) // BS)
    if num_splits is None:
        num_splits = split_count(B, lay.num_kv_heads, max_pages, threads)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    part_m = part_l = part_acc = None
    if num_splits > 1:
        part_m = torch.empty(B, H, num_splits, dtype=torch.float32)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty(B, H, num_splits, D, dtype=torch.float32)
    a = _args(lay, storage, block_tables, context_lens, seq_slots, q=_ptr(q), out=_ptr(out), part_m=_ptr(part_m),
              part_l=_ptr(part_l), part_acc=_ptr(part_acc), heads=H, sliding_window=sliding_window,
              num_splits=num_splits, num_threads=threads, isa=-1 if isa is None else ISAS[isa], scale=float(scale))
    _raise(load_cpu_library().bitfold_quant_decode(ctypes.byref(a)), a, "bitfold_quant_decode")
    return out


# One layer's storage fields of the argument struct, built once per storage (checking every
# tensor's contiguity and taking ~20 pointers cost ~10 us per call, twice per layer and step).
_STATIC: dict[int, tuple[weakref.ref, _Args]] = {}


def _static_args(lay: QuantLayout, storage) -> _Args:
    key = id(storage.k)
    hit = _STATIC.get(key)
    if hit is not None and hit[0]() is storage.k and hit[1].same == (hash(lay), *map(id, storage[:6])):
        return hit[1]
    for name, t in (("k", storage.k), ("v", storage.v), ("k_meta", storage.k_meta), ("v_meta", storage.v_meta),
                    ("ring_k", storage.ring_k), ("ring_v", storage.ring_v)):
        if not t.is_contiguous():
            raise ValueError(f"storage.{name} must be contiguous")
    a = _Args(k=_ptr(storage.k), k_meta=_ptr(storage.k_meta), v=_ptr(storage.v), v_meta=_ptr(storage.v_meta),
              ring_k=_ptr(storage.ring_k) if lay.ring else None, ring_v=_ptr(storage.ring_v) if lay.ring else None,
              kv_heads=lay.num_kv_heads, head_dim=lay.head_dim, block_size=lay.block_size,
              num_blocks=storage.k.shape[0], num_slots=storage.ring_k.shape[0] if lay.ring else 0,
              k_kind=lay.k_kind, k_bits=lay.k_bits, v_kind=lay.v_kind, v_bits=lay.v_bits, v_group=lay.v_group,
              residual=lay.residual, ring_cap=lay.ring_cap, num_splits=1)
    a.same = (hash(lay), *map(id, storage[:6]))  # what the cached fields were taken from
    _STATIC[key] = (weakref.ref(storage.k, lambda _, key=key: _STATIC.pop(key, None)), a)
    return a


def _args(lay: QuantLayout, storage, block_tables, context_lens, seq_slots, **step) -> _Args:
    """The kernel's argument struct: the layout and storage of one layer (cached), this step's
    tables (contiguous int32, as `_check` requires; the caller keeps them alive), and `step`'s
    per-call fields."""
    a = _Args.from_buffer_copy(_static_args(lay, storage))
    a.block_tables, a.context_lens, a.seq_slots = _ptr(block_tables), _ptr(context_lens), _ptr(seq_slots)
    a.batch, a.max_blocks = context_lens.shape[0], block_tables.shape[1]
    for name, value in step.items():
        setattr(a, name, value)
    return a


def _raise(rc: int, a: _Args, fn: str) -> None:
    if rc == -1:
        why = load_cpu_library().bitfold_quant_decode_check(ctypes.byref(a))
        raise ValueError(f"{fn} refused its arguments: {why.decode() if why else 'bad tensors'}")
    if rc == -2:
        raise ValueError(f"a block table entry (of {a.num_blocks} pages) or a sequence slot (of {a.num_slots}) that "
                         f"the step needs is out of range, or a context is longer than its block table")


def quant_paged_decode_cpu_or_ref(lay: QuantLayout, q: torch.Tensor, storage, block_tables: torch.Tensor,
                                  context_lens: torch.Tensor, seq_slots: torch.Tensor | None, scale: float,
                                  sliding_window: int = 0, **kw) -> torch.Tensor:
    """The CPU backend's decode: `quant_paged_decode_cpu` where `why_not` allows, else the reference."""
    if why_not(lay, q, storage) is not None:
        return quant_paged_decode_ref(lay, q, storage, block_tables, context_lens, seq_slots, scale, sliding_window)
    return _decode(lay, q, storage, block_tables, context_lens, seq_slots, scale, sliding_window, kw.get("num_splits"),
                   kw.get("num_threads"), kw.get("isa"), kw.get("max_context_len"))


def write_quant_kv_decode_cpu(lay: QuantLayout, storage, k: torch.Tensor, v: torch.Tensor, meta) -> None:
    """`write_quant_kv_ref(lay, storage, k, v, meta)` for a decode step (one new token per sequence:
    k, v float32 `[B, KVH, D]`, rotary applied) in C++, the same codes bit for bit: each sequence's
    page that this token completes is sealed, the token goes into the ring or (codecs without a
    ring) straight into its page slot (`meta.slot_mapping`, < 0: not written)."""
    from bitfold.kernels.quant_kv_write import _check as _check_write

    _check_write(lay, storage, k, v, meta)
    if not meta.decode_only or k.shape[0] != meta.context_lens.shape[0]:
        raise ValueError("write_quant_kv_decode_cpu writes one new token per sequence (a decode step)")
    why = why_not(lay, k, storage)
    if why is not None:
        raise ValueError(f"the C++ compressed-KV write cannot run these inputs: {why}")
    if not (meta.block_tables.dtype == meta.context_lens.dtype == torch.int32):
        raise ValueError("block_tables and context_lens must be int32")
    if k.shape[0] == 0:
        return
    # locals: the contiguous copies must outlive the call
    slots = meta.slot_mapping.to(torch.int64).contiguous()
    tables, lens = meta.block_tables.contiguous(), meta.context_lens.contiguous()
    seq_slots = meta.seq_slots.contiguous() if meta.seq_slots is not None else None
    k, v = k.contiguous(), v.contiguous()
    a = _args(lay, storage, tables, lens, seq_slots, heads=lay.num_kv_heads)
    _raise(load_cpu_library().bitfold_quant_write_decode(ctypes.byref(a), k.data_ptr(), v.data_ptr(),
                                                         slots.data_ptr()), a, "bitfold_quant_write_decode")


def write_quant_kv_cpu_or_ref(lay: QuantLayout, storage, k: torch.Tensor, v: torch.Tensor, meta, *,
                              phase: str = "all", **kw) -> None:
    """The CPU backend's write: decode steps in C++ (`write_quant_kv_decode_cpu`) where `why_not`
    allows, prompt chunks (and everything else) through `write_quant_kv_ref`."""
    if (phase == "all" and meta.decode_only and k.shape[0] == meta.context_lens.shape[0] and k.is_contiguous()
            and v.is_contiguous() and why_not(lay, k, storage) is None):
        return write_quant_kv_decode_cpu(lay, storage, k, v, meta)
    return write_quant_kv_ref(lay, storage, k, v, meta, phase=phase, **kw)
