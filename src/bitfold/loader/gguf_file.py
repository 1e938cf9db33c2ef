"""GGUF files (llama.cpp's format) through the `gguf` package: metadata -> ModelConfig,
tensors renamed to HF names. 2-D tensors of a block type (weights/gguf_blocks.py) are yielded
still packed, as GGUFBlocks, so that a layer keeps their codes where they fit its format (and
`--weights auto` is the `gguf` format: each layer in its blocks' own codes); any other layer
dequantizes them just the same. Other tensors (norms, F16/F32 weights) come as floats.

llama.cpp's converter permutes the rows of Q and K for "llama" models (interleaved rotary
pairs); we undo it so every model runs HF's rotate-half rotary. Qwen2/3 are stored unpermuted.
"""
from __future__ import annotations

import os
import re
from typing import Iterator

import numpy as np
import torch

from bitfold.config import ModelConfig
from bitfold.errors import ModelLoadError, UnsupportedArchitectureError, UnsupportedFormatError
from bitfold.loader.gguf_reader import GGUFFile
from bitfold.loader.source import ModelSource
from bitfold.progress import progress
from bitfold.weights.gguf_blocks import BLOCK_TYPES, GGUFBlocks

# Types the gguf package dequantizes and we have checked against real files.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight", "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_BLK = re.compile(r"^blk\.(\d+)\.(.+)$")


def hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLK.match(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    return None


def unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Invert llama.cpp's `permute` of Q/K rows: [n_heads*head_dim, ...] back to HF order."""
    shape = w.shape
    return w.reshape(n_heads, shape[0] // n_heads // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


class GGUFMetadata:
    def __init__(self, reader, path: str):
        self.reader, self.path = reader, path

    def get(self, key: str, default=None):
        return self.reader.get(key, default)

    def need(self, key: str):
        v = self.get(key)
        if v is None:
            raise ModelLoadError(f"{self.path}: GGUF metadata field {key!r} is missing")
        return v


def _open(path: str) -> GGUFFile:
    if not os.path.exists(path):
        raise ModelLoadError(f"{path}: file not found")
    try:
        return GGUFFile(path)
    except ModelLoadError:
        raise
    except Exception as e:  # GGUFFile validates the layout; this is a safety net for anything it missed
        raise ModelLoadError(f"{path}: not a valid GGUF file ({type(e).__name__}: {e})") from None


def load_gguf(path: str) -> ModelSource:
    from bitfold.loader.tokenizer import Tokenizer
    from bitfold.models import MODELS

    reader = _open(path)
    md = GGUFMetadata(reader, path)
    arch = md.need("general.architecture")
    key = f"gguf:{arch}"
    if key not in MODELS:
        known = ", ".join(n[5:] for n in MODELS.names() if n.startswith("gguf:"))
        raise UnsupportedArchitectureError(
            f"{path}: architecture {arch!r} (field general.architecture) is not supported; supported: {known}")
    model_cls = MODELS.get(key)
    for t in reader.tensors:
        if t.tensor_type.name not in SUPPORTED_TYPES:
            raise UnsupportedFormatError(
                f"{path}: tensor {t.name!r} has GGUF type {t.tensor_type.name}, which bitfold cannot read "
                f"(supported: {', '.join(SUPPORTED_TYPES)})")
    names = {t.name for t in reader.tensors}
    n_heads = md.need(f"{arch}.attention.head_count")
    hidden = md.need(f"{arch}.embedding_length")
    for key, v in ((f"{arch}.attention.head_count", n_heads), (f"{arch}.embedding_length", hidden)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:  # 0 would divide by zero below
            raise ModelLoadError(f"{path}: GGUF metadata field {key!r} is {v!r}, expected an integer >= 1")
    tokens = reader.get("tokenizer.ggml.tokens")
    scaling = None
    if "rope_freqs.weight" in names:
        t = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
        scaling = {"rope_type": "freq_factors", "factors": np.asarray(t.data, dtype=np.float32).tolist()}
    elif md.get(f"{arch}.rope.scaling.type") == "linear":
        scaling = {"rope_type": "linear", "factor": md.need(f"{arch}.rope.scaling.factor")}
    config = ModelConfig(
        architecture=model_cls.__name__,
        vocab_size=md.get(f"{arch}.vocab_size") or (len(tokens) if tokens else 0),
        hidden_size=hidden,
        intermediate_size=md.need(f"{arch}.feed_forward_length"),
        num_layers=md.need(f"{arch}.block_count"),
        num_heads=n_heads,
        num_kv_heads=md.get(f"{arch}.attention.head_count_kv") or n_heads,
        head_dim=md.get(f"{arch}.attention.key_length") or hidden // n_heads,
        rms_norm_eps=md.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6),
        rope_theta=float(md.get(f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        max_position_embeddings=md.get(f"{arch}.context_length", 2048),
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        o_bias="blk.0.attn_output.bias" in names,
        qk_norm="blk.0.attn_q_norm.weight" in names,
        sliding_window=md.get(f"{arch}.attention.sliding_window", 0) or 0,
    )
    stored = sorted({BLOCK_TYPES[t.tensor_type].spec.name for t in reader.tensors
                     if t.tensor_type in BLOCK_TYPES and len(t.shape) == 2})
    return ModelSource(
        path=path,
        format="gguf",
        config=config,
        weights=lambda: _iter_tensors(reader, path, config, model_cls.gguf_permuted_qk),
        load_tokenizer=lambda: Tokenizer.from_gguf(reader, path),
        max_context=config.max_position_embeddings,
        weight_format="gguf" if stored else None,
        stored_formats=tuple(stored),
    )


def _iter_tensors(reader, path: str, cfg: ModelConfig, permuted_qk: bool) -> Iterator[tuple[str, torch.Tensor]]:
    from gguf import quants

    tensors = [t for t in reader.tensors if t.name != "rope_freqs.weight"]
    with progress(sum(int(t.n_bytes) for t in tensors), "loading GGUF") as bar:
        for t in tensors:
            name = hf_name(t.name)
            if name is None:
                raise ModelLoadError(f"{path}: unexpected tensor {t.name!r} for {cfg.architecture}")
            if t.tensor_type in BLOCK_TYPES and len(t.shape) == 2:
                raw = t.data.view(np.ndarray)  # [rows, bytes per row]; un-permuting moves whole rows
                if permuted_qk and t.name.endswith("attn_q.weight"):
                    raw = unpermute_rotary(raw, cfg.num_heads)
                elif permuted_qk and t.name.endswith("attn_k.weight"):
                    raw = unpermute_rotary(raw, cfg.num_kv_heads)
                bar.update(int(t.n_bytes))
                yield name, GGUFBlocks(raw, t.tensor_type, f"{path}: tensor {t.name!r} ({t.tensor_type.name})")
                continue
            try:
                w = quants.dequantize(t.data.view(np.ndarray), t.tensor_type)  # memmap subclass overhead per slice
            except Exception as e:
                raise ModelLoadError(f"{path}: tensor {t.name!r} ({t.tensor_type.name}) could not be read: {e}") from None
            expected = tuple(int(d) for d in reversed(t.shape))
            w = w.reshape(expected) if w.size == int(np.prod(expected)) else w
            if w.shape != expected:
                raise ModelLoadError(f"{path}: tensor {t.name!r} decodes to {w.shape}, header says {expected}")
            if permuted_qk and t.name.endswith(("attn_q.weight", "attn_q.bias")):
                w = unpermute_rotary(w, cfg.num_heads)
            elif permuted_qk and t.name.endswith(("attn_k.weight", "attn_k.bias")):
                w = unpermute_rotary(w, cfg.num_kv_heads)
            bar.update(int(t.n_bytes))
            w = np.ascontiguousarray(w, dtype=np.float32)
            yield name, torch.from_numpy(w if w.flags.writeable else w.copy())
