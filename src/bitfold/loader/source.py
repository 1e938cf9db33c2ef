"""A model source: its normalized config, a stream of (HF name, weight) pairs and its tokenizer,
whatever the file format. Loaders for each format return one. A weight is a float tensor or a
`PackedWeight` (still quantized: see weights/packed.py)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator

import torch

from bitfold.config import ModelConfig

if TYPE_CHECKING:
    from bitfold.weights.packed import PackedWeight


@dataclass
class ModelSource:
    path: str
    format: str  # "hf" or "gguf"
    config: ModelConfig
    weights: Callable[[], Iterator[tuple[str, torch.Tensor | PackedWeight]]]
    load_tokenizer: Callable[[], "object"]
    max_context: int  # the checkpoint's trained context length
    weight_format: str | None = None  # the registered format the checkpoint is stored in (None: float)
    stored_formats: tuple[str, ...] = ()  # low-bit formats its stored codes are (see resolve_weight_format)
    # merged linears stored in another format than weight_format: {(layer, kind): format}, kind one of
    # models.format_plan.KINDS (a mixed-precision `bitfold quantize` checkpoint; see models/format_plan.py)
    format_overrides: dict[tuple[int, str], str] = field(default_factory=dict)
