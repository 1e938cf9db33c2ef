"""The weight-format interface (vLLM's quantization-method seam, gpt-fast's module swap).

Quantization belongs to the layer: a `Linear` asks its format to create parameters, to take
checkpoint tensors (`load`, possibly one shard of a merged layer at a row offset), to finish
after loading (repack for a kernel) and to `apply` itself to activations.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from bitfold.registry import Registry


class WeightFormat(ABC):
    name: str

    @staticmethod
    def gpu_storage(device: torch.device) -> bool:
        """Whether a layer on `device` keeps a GPU layout read by Triton kernels (tests run those
        layouts on the CPU through Triton's interpreter by patching this)."""
        return device.type == "cuda"

    @abstractmethod
    def create_weights(self, layer: nn.Module, in_features: int, out_features: int, dtype: torch.dtype) -> None:
        """Register the layer's parameters/buffers (shape [out_features, in_features] logically)."""

    @abstractmethod
    def load(self, layer: nn.Module, weight: torch.Tensor, row_offset: int) -> None:
        """Copy a checkpoint weight [rows, in_features] (float) into rows [row_offset, +rows)."""

    def load_packed(self, layer: nn.Module, packed, row_offset: int) -> None:
        """Take a weight that arrived still quantized (a `weights.packed.PackedWeight`) into rows
        [row_offset, +rows). Default: a format with a low-bit `spec` takes its codes unchanged
        when they fit (`load_codes`, no second rounding), anything else dequantizes and `load`s."""
        spec = getattr(self, "spec", None)
        codes = packed.codes(spec) if spec is not None else None
        if codes is not None:
            self.load_codes(layer, *codes, row_offset)
        else:
            self.load(layer, packed.dequantize(layer.in_features), row_offset)

    def process_after_loading(self, layer: nn.Module) -> None:
        """Repack once every shard is in (e.g. into a kernel's layout). Default: nothing."""

    @abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """x: [T, in_features] -> [T, out_features] (bias added by the caller)."""

    def apply_silu_mul(self, layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        """h: [T, 2 * in_features] (gate | up) -> apply(silu(gate) * up). Formats whose kernel
        can compute the activation as it reads its input override this (one launch fewer)."""
        from bitfold.kernels.ops import silu_and_mul_op

        return self.apply(layer, silu_and_mul_op(h))


WEIGHT_FORMATS: Registry[type[WeightFormat]] = Registry("weight format")


def resolve_weight_format(name: str, checkpoint_format: str | None, device_type: str,
                          stored: tuple[str, ...] = ()) -> str:
    """The registered format a model is built with: `name`, or for "auto" the checkpoint's own
    (`checkpoint_format`: a bitfold checkpoint's low-bit format, "gguf" for a block-quantized
    GGUF) or dense. `stored`: the low-bit formats the checkpoint's codes are (a GGUF's block
    types, see gguf_blocks.py); a bare `intN` asked of a checkpoint that stores N-bit codes
    means their grouping, so its blocks are kept rather than rounded twice (`int4` on a Q4_0
    file is int4-g32). Raises BitfoldError when the format cannot run on `device_type` ("cpu" /
    "cuda"), or when a bitfold checkpoint is asked for another low-bit format (dense
    dequantizes it)."""
    from bitfold.errors import BitfoldError
    from bitfold.weights.lowbit import lowbit_spec

    fmt = (checkpoint_format or "dense") if name == "auto" else name
    if fmt not in WEIGHT_FORMATS:
        raise BitfoldError(f"unknown weight format {fmt!r}; known: auto, {', '.join(WEIGHT_FORMATS.names())}")
    asked = lowbit_spec(fmt)
    if asked is not None and "-" not in fmt and not asked.ternary:
        same = [lowbit_spec(s) for s in stored if lowbit_spec(s) is not None and lowbit_spec(s).bits == asked.bits]
        if same:
            fmt = min(same, key=lambda s: s.group).name
    stored_fmt = WEIGHT_FORMATS.get(checkpoint_format) if checkpoint_format not in (None, "gguf") else None
    if stored_fmt is not None and fmt != "dense" and WEIGHT_FORMATS.get(fmt) is not stored_fmt:
        # Re-rounding stored codes onto another grid compounds two roundings; say so instead.
        raise BitfoldError(f"the checkpoint is already quantized as {checkpoint_format}; it cannot be loaded as "
                           f"{fmt}: use --weights auto (or {checkpoint_format}), or dense to dequantize it")
    devices = getattr(WEIGHT_FORMATS.get(fmt), "devices", None)
    if devices is not None and device_type not in devices:
        raise BitfoldError(f"weight format {fmt!r} runs on {', '.join(devices)} only; use --device "
                           f"{devices[0]} or --weights dense")
    return fmt
