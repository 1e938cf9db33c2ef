"""Linear layers whose storage and matmul belong to a weight format.

`Linear` may be a merged layer (q|k|v or gate|up): `shards` names each part and its rows, and
checkpoint tensors are loaded shard by shard. A shard may arrive still quantized (a
`PackedWeight`): a low-bit format of exactly the stored kind takes its codes as they are.
"""
from __future__ import annotations

import torch
from torch import nn

from bitfold.weights.packed import PackedWeight
from bitfold.weights import WEIGHT_FORMATS, WeightFormat


class Linear(nn.Module):
    def __init__(self, in_features: int, shards: dict[str, int], bias: bool, fmt: str, dtype: torch.dtype):
        """shards: ordered {shard name: rows}; a plain layer has one shard."""
        super().__init__()
        self.in_features = in_features
        self.out_features = sum(shards.values())
        self.shard_offsets: dict[str, tuple[int, int]] = {}
        off = 0
        for name, rows in shards.items():
            self.shard_offsets[name] = (off, rows)
            off += rows
        self.fmt: WeightFormat = WEIGHT_FORMATS.get(fmt)()
        self.fmt.create_weights(self, in_features, self.out_features, dtype)
        self.bias = nn.Parameter(torch.zeros(self.out_features, dtype=dtype), requires_grad=False) if bias else None

    def load_shard(self, shard: str, tensor: torch.Tensor | PackedWeight, is_bias: bool) -> None:
        off, rows = self.shard_offsets[shard]
        if tensor.shape[0] != rows:
            raise ValueError(f"shard {shard!r} expects {rows} rows, checkpoint has {tuple(tensor.shape)}")
        if is_bias:
            if self.bias is None:
                raise ValueError(f"shard {shard!r} got a bias but the layer was built without one")
            if isinstance(tensor, PackedWeight):
                raise ValueError(f"shard {shard!r}: a bias must be a float tensor, the checkpoint stores it quantized")
            self.bias.data[off : off + rows].copy_(tensor)
        elif isinstance(tensor, PackedWeight):
            self.load_shard_codes(shard, tensor)
        else:
            self.fmt.load(self, tensor, off)

    def load_shard_codes(self, shard: str, packed: PackedWeight) -> None:
        """A stored-quantized weight: the format decides (`fmt.load_packed`): its codes go in
        unchanged when they fit the format, otherwise it is dequantized and loaded as floats
        (dense layers; a low-bit format of another kind re-rounds it)."""
        self.fmt.load_packed(self, packed, self.shard_offsets[shard][0])

    def forward(self, x: torch.Tensor, act: str | None = None) -> torch.Tensor:
        """act "silu_mul": x is [T, 2 * in_features] (gate | up) and the layer multiplies
        silu(gate) * up, computed by the weight format's kernel where it can (SwiGLU's down)."""
        if act is None:
            y = self.fmt.apply(self, x)
        elif act == "silu_mul":
            y = self.fmt.apply_silu_mul(self, x)
        else:
            raise ValueError(f"unknown activation {act!r}; known: silu_mul")
        return y if self.bias is None else y + self.bias
