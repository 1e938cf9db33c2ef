"""Token embeddings: a float table (`weight`), or, where the checkpoint stores the embedding
quantized and the model's weight format keeps those codes as they are, rows dequantized as they
are looked up, so a GGUF model's embedding costs its file bytes rather than a float copy
(Llama-3-8B on a GPU: 0.29 GB of Q4_K instead of 1.05 GB of bf16; Qwen2.5-1.5B on the CPU: 0.13
GB instead of 0.93 GB of float32). A tied model's embedding reads the output layer's codes: one
copy. On a GPU the `gguf` format keeps the file's blocks; on the CPU they become low-bit LUT or
byte codes (weights/gguf.py), which gather rows too.

A format takes part by giving its layer a `rows(layer, ids)` method and `can_gather(layer)`. The
embedding reads rows only where that changes no value (`gathers`): the checkpoint stored it
quantized, and the storage holds those codes unchanged (`rounded` false: nothing rounded again
at load, which `--weights nf4` or a low-bit format the stored codes do not fit would do).
Otherwise it keeps the float table, as a float checkpoint's embedding does.
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
        self.stored_quantized = False  # the checkpoint's embedding came as codes (a PackedWeight)

    def load(self, tensor: torch.Tensor | PackedWeight, keep_quantized: bool = True) -> None:
        """Take the checkpoint's embedding [vocab, hidden]: quantized codes stay quantized where
        the format keeps them as they are and can gather rows from them (unless `keep_quantized`
        is off: a tied model shares its head's codes instead, see `tie`); anything else becomes
        the float table."""
        from bitfold.layers.linear import Linear

        if tensor.shape != self.shape:
            raise ValueError(f"expected shape {self.shape}, got {tuple(tensor.shape)}")
        fmt = WEIGHT_FORMATS.get(self.fmt_name)
        self.stored_quantized = isinstance(tensor, PackedWeight)
        # (A low-bit format the stored codes do not fit rounds the table before `gathers` refuses
        # it: load time spent only when a format other than the file's own is asked for.)
        if keep_quantized and self.stored_quantized and hasattr(fmt, "rows") and not getattr(fmt, "rounded", False):
            with torch.device(self._device):
                table = Linear(self.shape[1], {"embed": self.shape[0]}, False, self.fmt_name, self.dtype)
            table.load_shard("embed", tensor, False)
            table.fmt.process_after_loading(table)  # a CPU `gguf` layer becomes low-bit codes here
            if gathers(table):
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
        """Read rows from the (tied) output layer's storage, dropping the float table, when the
        embedding came quantized and the head holds those codes as they came (`gathers`)."""
        if self.stored_quantized and gathers(head):
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


def gathers(layer: nn.Module) -> bool:
    """Whether an embedding may read a Linear's rows in place of its float table: the format
    gathers rows (`can_gather`) and rounded none of them at load (its codes are the checkpoint's,
    so a looked-up row is the float table's: exactly, or for a GGUF K-quant on the CPU up to the
    fp16 rounding of its scale products that every layer of such a file takes, gguf_blocks.py)."""
    fmt = layer.fmt
    return getattr(fmt, "can_gather", lambda _: False)(layer) and not getattr(fmt, "rounded", False)
