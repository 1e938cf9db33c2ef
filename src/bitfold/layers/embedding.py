"""Token embeddings: a float table (`weight`), or, where the model's weight format keeps a
checkpoint's quantized blocks on a GPU (`gguf`), rows dequantized as they are looked up, so a
GGUF model's embedding costs its file bytes rather than a 16-bit copy (Llama-3-8B: 0.29 GB of
Q4_K instead of 1.05 GB). A tied model's embedding reads the output layer's blocks: one copy.

A format takes part by giving its layer a `rows(layer, ids)` method (and `can_gather(layer)`);
the embedding keeps its float table whenever the format cannot.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bitfold.weights import WEIGHT_FORMATS
from bitfold.weights.packed import PackedWeight


class Embedding(nn.Module):
    def __init__(self, vocab: int, hidden: int, dtype: torch.dtype, fmt: str = "dense"):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab, hidden, dtype=dtype), requires_grad=False)
        self.shape, self.dtype, self.fmt_name = (vocab, hidden), dtype, fmt
        self._device = self.weight.device
        self.table: nn.Module | None = None  # a Linear whose format gathers rows (or the tied head)

    def load(self, tensor: torch.Tensor | PackedWeight, keep_quantized: bool = True) -> None:
        """Take the checkpoint's embedding [vocab, hidden]: quantized blocks stay quantized where
        the format can gather rows from them (unless `keep_quantized` is off: a tied model shares
        its head's blocks instead, see `tie`), anything else becomes the float table."""
        from bitfold.layers.linear import Linear

        if tensor.shape != self.shape:
            raise ValueError(f"expected shape {self.shape}, got {tuple(tensor.shape)}")
        fmt = WEIGHT_FORMATS.get(self.fmt_name)
        if keep_quantized and isinstance(tensor, PackedWeight) and hasattr(fmt, "rows") and fmt.gpu_storage(self._device):
            with torch.device(self._device):
                table = Linear(self.shape[1], {"embed": self.shape[0]}, False, self.fmt_name, self.dtype)
            table.load_shard("embed", tensor, False)
            table.fmt.process_after_loading(table)
            if getattr(table.fmt, "can_gather", lambda layer: False)(table):
                self._use(table)
                return
        if isinstance(tensor, PackedWeight):
            tensor = tensor.dequantize(self.shape[1])
        if self.weight.shape != self.shape:
            self.weight = nn.Parameter(torch.empty(self.shape, dtype=self.dtype, device=self._device),
                                       requires_grad=False)
        self.weight.data.copy_(tensor)
        self.table = None

    def tie(self, head: nn.Module) -> None:
        """Read rows from the (tied) output layer's storage when its format can gather them."""
        if getattr(head.fmt, "can_gather", lambda layer: False)(head):
            self._use(head, own=False)

    def _use(self, table: nn.Module, own: bool = True) -> None:
        # the float table is dropped; a tied head is not registered twice as a submodule
        self.weight = nn.Parameter(torch.empty(0, dtype=self.dtype, device=self._device), requires_grad=False)
        if own:
            self.table = table
        else:
            self.__dict__["table"] = table
            self._modules.pop("table", None)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids int64 [T] -> [T, hidden]."""
        table = self.table if self.table is not None else self.__dict__.get("table")
        if table is not None:
            return table.fmt.rows(table, ids).to(self.dtype)
        return F.embedding(ids, self.weight)
