"""KV-cache codecs: how K/V pages are stored. Importing this package registers them all."""
from __future__ import annotations

import torch

from bitfold.errors import BitfoldError
from bitfold.kvcache.codecs.base import KV_CODECS, KVCodec  # noqa: F401
from bitfold.kvcache.codecs import dense, quant  # noqa: F401


def make_codec(name: str, dtype: torch.dtype, residual: int | None = None, rotate: str = "auto") -> KVCodec:
    """The codec `name` for compute dtype `dtype` with the engine's KV settings (a residual window
    and key rotation apply to compressed codecs only; "auto" rotation = the codec's default)."""
    if name not in KV_CODECS:
        raise BitfoldError(f"unknown KV cache {name!r}; known: {', '.join(KV_CODECS.names())}")
    cls = KV_CODECS.get(name)
    if not issubclass(cls, quant.QuantCodec):
        if residual is not None or rotate == "on":
            raise BitfoldError(f"--kv-residual and --kv-rotate apply to compressed KV caches, not {name!r}")
        return cls(dtype)
    return cls(dtype, residual=residual, rotate=cls.rotate_by_default if rotate == "auto" else rotate == "on")
