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

    @abstractmethod
    def create_weights(self, layer: nn.Module, in_features: int, out_features: int, dtype: torch.dtype) -> None:
        """Register the layer's parameters/buffers (shape [out_features, in_features] logically)."""

    @abstractmethod
    def load(self, layer: nn.Module, weight: torch.Tensor, row_offset: int) -> None:
        """Copy a checkpoint weight [rows, in_features] (float) into rows [row_offset, +rows)."""

    def process_after_loading(self, layer: nn.Module) -> None:
        """Repack once every shard is in (e.g. into a kernel's layout). Default: nothing."""

    @abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """x: [T, in_features] -> [T, out_features] (bias added by the caller)."""


WEIGHT_FORMATS: Registry[type[WeightFormat]] = Registry("weight format")


def resolve_weight_format(name: str, checkpoint_format: str | None, device_type: str) -> str:
    """The registered format a model is built with: `name`, or for "auto" the checkpoint's own
    (`checkpoint_format`, from its quantization_config) or dense. Raises BitfoldError when the
    format cannot run on `device_type` ("cpu" / "cuda"), or when a quantized checkpoint is asked
    for another quantized format (dense dequantizes it)."""
    from bitfold.errors import BitfoldError

    fmt = (checkpoint_format or "dense") if name == "auto" else name
    if fmt not in WEIGHT_FORMATS:
        raise BitfoldError(f"unknown weight format {fmt!r}; known: auto, {', '.join(WEIGHT_FORMATS.names())}")
    stored = WEIGHT_FORMATS.get(checkpoint_format) if checkpoint_format is not None else None
    if stored is not None and fmt != "dense" and WEIGHT_FORMATS.get(fmt) is not stored:
        # Re-rounding stored codes onto another grid compounds two roundings; say so instead.
        raise BitfoldError(f"the checkpoint is already quantized as {checkpoint_format}; it cannot be loaded as "
                           f"{fmt}: use --weights auto (or {checkpoint_format}), or dense to dequantize it")
    devices = getattr(WEIGHT_FORMATS.get(fmt), "devices", None)
    if devices is not None and device_type not in devices:
        raise BitfoldError(f"weight format {fmt!r} runs on {', '.join(devices)} only (its LUT kernels are CPU "
                           f"kernels); use --device cpu or --weights dense")
    return fmt
