"""A model source: its normalized config, a stream of (HF name, float tensor) weights and its
tokenizer, whatever the file format. Loaders for each format return one."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from bitfold.config import ModelConfig


@dataclass
class ModelSource:
    path: str
    format: str  # "hf" or "gguf"
    config: ModelConfig
    weights: Callable[[], Iterator[tuple[str, torch.Tensor]]]
    load_tokenizer: Callable[[], "object"]
    max_context: int  # the checkpoint's trained context length
