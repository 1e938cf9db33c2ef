"""Llama 2/3/3.1 and Mistral (and the decoder blocks the Qwen files reuse).

Weights use HF names; GGUF loaders translate to them. q|k|v and gate|up are merged into one
matmul each, loaded shard by shard.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from bitfold.config import ModelConfig
from bitfold.errors import ModelLoadError
from bitfold.layers.embedding import Embedding
from bitfold.layers.linear import Linear
from bitfold.layers.norm import RMSNorm
from bitfold.layers.rotary import cos_sin_cache
from bitfold.weights.packed import PackedWeight
from bitfold.models.base import MODELS, StepContext
from bitfold.models.format_plan import FormatPlan


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, fmt: str | FormatPlan, dtype: torch.dtype, layer: int = 0):
        """fmt: every Linear's format, or a plan consulted for (layer, "qkv") and (layer, "o")."""
        super().__init__()
        plan = FormatPlan.of(fmt)
        self.h, self.kvh, self.d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.qkv = Linear(cfg.hidden_size, {"q": self.h * self.d, "k": self.kvh * self.d, "v": self.kvh * self.d},
                          cfg.attention_bias, plan.format(layer, "qkv"), dtype)
        self.o = Linear(self.h * self.d, {"o": cfg.hidden_size}, cfg.o_bias, plan.format(layer, "o"), dtype)
        self.q_norm = RMSNorm(self.d, cfg.rms_norm_eps, dtype) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.d, cfg.rms_norm_eps, dtype) if cfg.qk_norm else None
        self.scale = self.d ** -0.5
        self.window = cfg.sliding_window

    def forward(self, x: torch.Tensor, rope: torch.Tensor, ctx: StepContext, kv) -> torch.Tensor:
        T = x.shape[0]
        q, k, v = self.qkv(x).split([self.h * self.d, self.kvh * self.d, self.kvh * self.d], dim=-1)
        if self.q_norm is not None:  # Qwen3: RMSNorm over each head before rotary
            q = self.q_norm(q.reshape(-1, self.d).contiguous())
            k = self.k_norm(k.reshape(-1, self.d).contiguous())
        # views of the fused q|k|v rows: the backend rotates q and k (a rotary kernel reading them
        # strided, or its decode kernel as it writes the new K/V) and reads v where it is
        o = ctx.backend.forward_rope(q.reshape(T, self.h, self.d), k.reshape(T, self.kvh, self.d),
                                     v.reshape(T, self.kvh, self.d), ctx.positions, rope, kv, ctx.attn, self.scale,
                                     self.window)
        return self.o(o.reshape(T, self.h * self.d))

    def key_offset(self) -> torch.Tensor | None:
        """The constant every key of this layer carries, float32 [KVH, D]: its k bias (before
        rotary; any constant will do for attention, kvcache/codecs/quant.py), or None without
        one (or with Qwen3's per-head k norm, which the bias passes through first)."""
        if self.qkv.bias is None or self.k_norm is not None:
            return None
        q_rows, k_rows = self.h * self.d, self.kvh * self.d
        return self.qkv.bias.detach()[q_rows:q_rows + k_rows].float().view(self.kvh, self.d)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, fmt: str | FormatPlan, dtype: torch.dtype, layer: int = 0):
        """fmt: every Linear's format, or a plan consulted for (layer, "gate_up") and (layer, "down")."""
        super().__init__()
        plan = FormatPlan.of(fmt)
        i = cfg.intermediate_size
        self.gate_up = Linear(cfg.hidden_size, {"gate": i, "up": i}, cfg.mlp_bias, plan.format(layer, "gate_up"), dtype)
        self.down = Linear(i, {"down": cfg.hidden_size}, cfg.mlp_bias, plan.format(layer, "down"), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.gate_up(x), act="silu_mul")  # the format may fuse silu(gate) * up into down


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, fmt: str | FormatPlan, dtype: torch.dtype, layer: int = 0):
        """fmt: one format for every Linear, or a FormatPlan read at index `layer`."""
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.attn = Attention(cfg, fmt, dtype, layer)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = MLP(cfg, fmt, dtype, layer)

    def forward(self, h, residual, rope, ctx: StepContext, kv):
        if residual is None:
            residual, h = h, self.attn_norm(h)
        else:
            h, residual = self.attn_norm(h, residual)
        h = self.attn(h, rope, ctx, kv)
        h, residual = self.mlp_norm(h, residual)
        return self.mlp(h), residual


# HF checkpoint name suffix -> (module path within a layer, shard, is_bias)
_LAYER_WEIGHTS = {
    "self_attn.q_proj.weight": ("attn.qkv", "q", False), "self_attn.q_proj.bias": ("attn.qkv", "q", True),
    "self_attn.k_proj.weight": ("attn.qkv", "k", False), "self_attn.k_proj.bias": ("attn.qkv", "k", True),
    "self_attn.v_proj.weight": ("attn.qkv", "v", False), "self_attn.v_proj.bias": ("attn.qkv", "v", True),
    "self_attn.o_proj.weight": ("attn.o", "o", False), "self_attn.o_proj.bias": ("attn.o", "o", True),
    "mlp.gate_proj.weight": ("mlp.gate_up", "gate", False), "mlp.gate_proj.bias": ("mlp.gate_up", "gate", True),
    "mlp.up_proj.weight": ("mlp.gate_up", "up", False), "mlp.up_proj.bias": ("mlp.gate_up", "up", True),
    "mlp.down_proj.weight": ("mlp.down", "down", False), "mlp.down_proj.bias": ("mlp.down", "down", True),
    "input_layernorm.weight": ("attn_norm.weight", None, False),
    "post_attention_layernorm.weight": ("mlp_norm.weight", None, False),
    "self_attn.q_norm.weight": ("attn.q_norm.weight", None, False),
    "self_attn.k_norm.weight": ("attn.k_norm.weight", None, False),
}


@MODELS.register("LlamaForCausalLM", "MistralForCausalLM", "gguf:llama")
class LlamaForCausalLM(nn.Module):
    """Decoder-only transformer with RMSNorm, rotary, GQA and a SwiGLU MLP."""

    config_overrides: dict = {}  # architecture facts the generic config cannot infer
    gguf_permuted_qk = True  # llama.cpp's converter interleaves Q/K rotary rows for "llama"

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, max_positions: int, fmt: str | FormatPlan = "dense"):
        """fmt: the weight format of every Linear, or a FormatPlan (per merged linear of each
        layer, and the output layer)."""
        super().__init__()
        self.cfg = cfg
        plan = FormatPlan.of(fmt)
        plan.check_layers(cfg.num_layers)
        self.embed = Embedding(cfg.vocab_size, cfg.hidden_size, dtype, plan.default)
        self.layers = nn.ModuleList(DecoderLayer(cfg, plan, dtype, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        # A quantized model quantizes its output projection too (for a memory-bound decode it is
        # the largest single matrix), from the embedding when the two are tied; the embedding
        # itself stays dense (one row is read per token). Formats may pick a wider head format.
        head_fmt = plan.head_format()
        self.tied_quantized_head = cfg.tie_word_embeddings and head_fmt != "dense"
        self.lm_head = (None if cfg.tie_word_embeddings and not self.tied_quantized_head
                        else Linear(cfg.hidden_size, {"lm_head": cfg.vocab_size}, False, head_fmt, dtype))
        self.register_buffer("rope", cos_sin_cache(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling),
                             persistent=False)

    def forward(self, input_ids: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """input_ids: int64 [T] -> final hidden states [T, hidden]."""
        h, residual = self.embed(input_ids), None
        for layer, kv in zip(self.layers, ctx.kv_caches):
            h, residual = layer(h, residual, self.rope, ctx, kv)
        return self.norm(h, residual)[0]

    def key_offsets(self) -> list[torch.Tensor | None]:
        """Per layer, `Attention.key_offset` (for the KV codec, which may store k minus it)."""
        return [layer.attn.key_offset() for layer in self.layers]

    def compute_logits(self, h: torch.Tensor) -> torch.Tensor:
        """h: [N, hidden] -> float32 logits [N, vocab]."""
        logits = self.lm_head(h) if self.lm_head is not None else h @ self.embed.weight.t()
        return logits.float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor | PackedWeight]], source: str) -> None:
        """Load (HF name, tensor) pairs; every expected weight must arrive exactly once. A weight
        may be a PackedWeight (stored quantized); a quantized checkpoint of a tied model may also
        store the output layer's codes as `lm_head.weight`, which then replace quantizing the
        embedding (a dense model ignores them: its head is the embedding itself)."""
        expected = self._expected_names()
        seen: set[str] = set()
        for name, tensor in weights:
            if name.endswith("rotary_emb.inv_freq"):
                continue
            tied_head_codes = name == "lm_head.weight" and self.cfg.tie_word_embeddings and \
                isinstance(tensor, PackedWeight)
            if name not in expected and not tied_head_codes:
                raise ModelLoadError(f"{source}: unexpected tensor {name!r} for {self.cfg.architecture}")
            if name in seen:  # e.g. a float weight beside its quantized codes
                raise ModelLoadError(f"{source}: tensor {name!r} is stored twice")
            try:
                if tied_head_codes:
                    if self.tied_quantized_head:
                        self.lm_head.load_shard("lm_head", tensor, False)
                elif name == "model.embed_tokens.weight" and self.tied_quantized_head and "lm_head.weight" in seen:
                    self.embed.load(tensor, keep_quantized=False)  # the head came as codes already
                else:
                    self._load_one(name, tensor)
            except (ValueError, RuntimeError) as e:
                where = tensor.origin if isinstance(tensor, PackedWeight) else f"{source}: tensor {name!r}"
                raise ModelLoadError(f"{where}: {e}") from None
            seen.add(name)
        missing = sorted(expected - seen)
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise ModelLoadError(f"{source}: missing tensors {', '.join(missing[:3])}{more}")
        for m in self.modules():
            if isinstance(m, Linear):
                m.fmt.process_after_loading(m)
        if self.tied_quantized_head:
            self.embed.tie(self.lm_head)  # one copy of the tied blocks where the head's format can share it

    def linear_for(self, name: str) -> tuple[Linear, str] | None:
        """The Linear and shard a checkpoint weight loads into; None for embeddings, norms and
        biases (`bitfold quantize` asks this to know which tensors to quantize, and how)."""
        if name == "lm_head.weight":
            return None if self.lm_head is None else (self.lm_head, "lm_head")
        parts = name.split(".", 3)
        if len(parts) < 4 or parts[:2] != ["model", "layers"] or not parts[2].isdigit():
            return None
        idx, suffix = int(parts[2]), parts[3]
        if suffix not in _LAYER_WEIGHTS or idx >= len(self.layers):
            return None
        _, shard, is_bias = _LAYER_WEIGHTS[suffix]
        target = self._layer_target(idx, suffix)
        return None if shard is None or is_bias or target is None else (target, shard)

    def _expected_names(self) -> set[str]:
        names = {"model.embed_tokens.weight", "model.norm.weight"}
        if self.lm_head is not None and not self.tied_quantized_head:
            names.add("lm_head.weight")
        for i in range(len(self.layers)):
            names.update(f"model.layers.{i}.{s}" for s in _LAYER_WEIGHTS if self._layer_target(i, s) is not None)
        return names

    def _layer_target(self, idx: int, suffix: str):
        """The parameter (norm weights) or Linear (shards) a layer weight loads into, or None
        when this configuration has no such weight (no bias, no q/k norm)."""
        path, shard, is_bias = _LAYER_WEIGHTS[suffix]
        obj = self.layers[idx]
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                return None
        if is_bias and obj.bias is None:
            return None
        return obj

    def _load_one(self, name: str, tensor: torch.Tensor) -> None:
        if name == "model.embed_tokens.weight":
            if self.tied_quantized_head:
                self.lm_head.load_shard("lm_head", tensor, False)
            return self.embed.load(tensor, keep_quantized=not self.tied_quantized_head)
        if name == "model.norm.weight":
            return _copy(self.norm.weight, tensor)
        if name == "lm_head.weight":
            return self.lm_head.load_shard("lm_head", tensor, False)
        _, _, idx, suffix = name.split(".", 3)
        target = self._layer_target(int(idx), suffix)
        _, shard, is_bias = _LAYER_WEIGHTS[suffix]
        if shard is None:
            return _copy(target, tensor)
        target.load_shard(shard, tensor, is_bias)


def _copy(param: torch.Tensor, tensor: torch.Tensor | PackedWeight) -> None:
    if isinstance(tensor, PackedWeight):
        if param.dim() != 2:
            raise ValueError(f"expected a float tensor of shape {tuple(param.shape)}, the checkpoint stores it "
                             "quantized")
        tensor = tensor.dequantize(param.shape[1])
    if param.shape != tensor.shape:
        raise ValueError(f"expected shape {tuple(param.shape)}, got {tuple(tensor.shape)}")
    param.data.copy_(tensor)
