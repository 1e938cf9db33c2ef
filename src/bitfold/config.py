"""Configuration: a few validated dataclasses; the CLI is built from EngineConfig's fields."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from bitfold.errors import BitfoldError, ModelLoadError


@dataclass
class ModelConfig:
    """Architecture hyper-parameters, normalized from an HF config.json or GGUF metadata.

    `architecture` is the models-registry key (e.g. "LlamaForCausalLM"). `rope_scaling` is
    HF's dict ({"rope_type": "llama3" | "linear" | ..., ...}) or None.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v (Qwen2 has it, Llama may)
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # per-head RMSNorm on q and k (Qwen3)
    sliding_window: int = 0  # 0 = full attention
    hidden_act: str = "silu"

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(
                f"num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads={self.num_kv_heads}"
            )
        if self.hidden_act not in ("silu", "swish"):
            raise ModelLoadError(f"hidden_act={self.hidden_act!r} is not supported (expected 'silu')")

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], source: str) -> "ModelConfig":
        """Build from a parsed HF config.json (transformers 4.x `rope_theta`/`rope_scaling` or
        5.x `rope_parameters`)."""

        def need(key: str):
            if key not in cfg:
                raise ModelLoadError(f"{source}: field {key!r} is missing from config.json")
            return cfg[key]

        def check_int(key: str, value, minimum: int = 1):
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ModelLoadError(f"{source}: field {key!r} is {value!r}, expected an integer >= {minimum}")
            return value

        def need_int(key: str):
            return check_int(key, need(key))

        def opt_int(key: str):  # optional, with "absent", null and 0 meaning "derive it"
            return check_int(key, cfg[key]) if cfg.get(key) is not None and cfg.get(key) != 0 else None

        archs = cfg.get("architectures") or []
        if not isinstance(archs, list) or not archs or not all(isinstance(a, str) for a in archs):
            raise ModelLoadError(f"{source}: config.json has no 'architectures' list (expected e.g. ['LlamaForCausalLM'])")
        n_heads = need_int("num_attention_heads")
        hidden = need_int("hidden_size")
        n_kv_heads = opt_int("num_key_value_heads") or n_heads
        if n_heads % n_kv_heads:
            raise ModelLoadError(f"{source}: num_attention_heads={n_heads} is not a multiple of "
                                 f"num_key_value_heads={n_kv_heads}")
        rope = cfg.get("rope_parameters") or {}
        rope_theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        if scaling is not None and scaling.get("rope_type", scaling.get("type", "default")) == "default":
            scaling = None
        window = cfg.get("sliding_window") or 0
        if "use_sliding_window" in cfg and not cfg["use_sliding_window"]:
            window = 0  # Qwen2/3 carry a window size but switch it off
        return cls(
            architecture=archs[0],
            vocab_size=need_int("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need_int("intermediate_size"),
            num_layers=need_int("num_hidden_layers"),
            num_heads=n_heads,
            num_kv_heads=n_kv_heads,
            head_dim=opt_int("head_dim") or hidden // n_heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=scaling,
            max_position_embeddings=opt_int("max_position_embeddings") or 2048,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", False)),
            o_bias=bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            sliding_window=int(window),
            hidden_act=cfg.get("hidden_act", "silu"),
        )


def _opt(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class EngineConfig:
    """Everything the engine needs besides the requests. The CLI flags are these fields."""

    model: str | None = _opt(None, "HF model folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    device: str = _opt("auto", "cpu, cuda or auto (cuda when available)", choices=["auto", "cpu", "cuda"])
    dtype: str = _opt("auto", "compute dtype: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16",
                      choices=["auto", "float32", "bfloat16", "float16"])
    weights: str = _opt("auto", "weight format: auto (the checkpoint's own; a GGUF keeps its blocks), dense, or a "
                        "low-bit format quantized at load (CPU and GPU): int8 (per row), int6, int5, int4, int3, "
                        "int2, int1, ternary (group 64; e.g. int4-g128; intN on an N-bit checkpoint keeps its "
                        "blocks), or nf4 (4-bit NormalFloat codebook, group 64; nf4-g32, nf4-g128)")
    max_model_len: int | None = _opt(None, "longest prompt + output in tokens (default: the model's context)")
    block_size: int | None = _opt(None, "tokens per KV-cache block (default: 16, or 64 for a compressed KV cache, "
                                  "whose key groups are one block)")
    kv_cache_memory_gb: float | None = _opt(None, "memory for the KV cache in GiB (default 2 on CPU)")
    num_kv_blocks: int | None = _opt(None, "exact number of KV blocks (overrides --kv-cache-memory-gb)")
    kv_cache: str = _opt("auto", "KV-cache storage: auto (the compute dtype), bf16, fp16, fp32, fp8, int8, int4, "
                         "int2 (KIVI), or K and V apart as kXvY with X, Y in 16/8/4/2 (e.g. k8v4, k4v2)")
    kv_residual: int | None = _opt(None, "newest tokens per sequence a compressed KV cache keeps 16-bit (KIVI's "
                                   "residual window; default 128 for int4/int2 sides, 0 for fp8/int8)")
    kv_rotate: str = _opt("auto", "Hadamard-rotate keys before quantizing them (RotateKV/QuaRot); auto = the "
                          "codec's default", choices=["auto", "on", "off"])
    attention_backend: str = _opt("auto", "attention backend: auto (triton on GPU, cpu = C++ for float32 on CPU, else torch), triton, cpu, torch")
    gpu_memory_utilization: float = _opt(0.9, "fraction of GPU memory for weights, activations and KV cache")
    enforce_eager: bool = _opt(False, "do not capture CUDA graphs for decode (GPU only)")
    max_num_seqs: int = _opt(128, "most requests decoded together in one step")
    max_num_batched_tokens: int = _opt(1024, "token budget per step; longer prompts are prefilled in chunks")
    int8_activations: str = _opt("auto", "GPU low-bit weights at 1-4 rows (decode): round activations to int8 per 32 "
                                 "values and multiply with dp4a, as llama.cpp does (int4 decode ~1.5x faster; SmolLM2 "
                                 "perplexity +1.1%% from it); off = float activations; auto = on below 8-bit weights",
                                 choices=["auto", "on", "off"])
    pdl: str = _opt("auto", "programmatic dependent launch (Hopper+): each decode kernel launches while the one before "
                    "it finishes; auto = the batch-1 decode graph where the GPU and Triton support it (H200: +3-7%% "
                    "tok/s at batch 1, bf16 -4%% at 4-16 rows), on = every decode graph", choices=["auto", "on", "off"])
    cpu_fused_step: bool = _opt(True, "run a CPU decode step of a low-bit model as one C++ call over every layer "
                                "(off: one call per operation, its reference)")
    async_scheduling: str = _opt("auto", "launch step N+1 before reading step N's tokens, hiding host work "
                                 "behind the GPU (auto = on for CUDA)", choices=["auto", "on", "off"])
    num_threads: int | None = _opt(None, "CPU threads for loading and compute (default: the cores other processes "
                                   "leave free at load, at most torch's count)")

    def validate(self) -> None:
        def bad(name, expected):
            raise BitfoldError(f"invalid engine setting {name}={getattr(self, name)!r}: expected {expected}")

        if self.block_size is not None and (self.block_size < 1 or self.block_size & (self.block_size - 1)):
            bad("block_size", "a power of two >= 1")
        if self.kv_residual is not None and self.kv_residual < 0:
            bad("kv_residual", "an integer >= 0")
        if self.max_num_seqs < 1:
            bad("max_num_seqs", "an integer >= 1")
        if self.max_num_batched_tokens < 1:
            bad("max_num_batched_tokens", "an integer >= 1")
        if self.max_model_len is not None and self.max_model_len < 2:
            bad("max_model_len", "an integer >= 2")
        if not 0 < self.gpu_memory_utilization <= 1:
            bad("gpu_memory_utilization", "a fraction in (0, 1]")
        if self.kv_cache_memory_gb is not None and self.kv_cache_memory_gb <= 0:
            bad("kv_cache_memory_gb", "a positive number of GiB")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            bad("num_kv_blocks", "an integer >= 1")
        from bitfold.weights import WEIGHT_FORMATS

        if self.weights != "auto" and self.weights not in WEIGHT_FORMATS:
            bad("weights", "one of " + ", ".join(WEIGHT_FORMATS.names()))  # "auto" is registered too
        from bitfold.kvcache.codecs import KV_CODECS

        if self.kv_cache not in KV_CODECS:
            bad("kv_cache", "one of " + ", ".join(KV_CODECS.names()))

    def effective_block_size(self) -> int:
        """`block_size`, or the KV cache's own default when it is not set."""
        from bitfold.kvcache.codecs import KV_CODECS

        if self.block_size is not None:
            return self.block_size
        return KV_CODECS.get(self.kv_cache).default_block_size if self.kv_cache in KV_CODECS else 16


def add_dataclass_args(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """Add one --flag per dataclass field, typed from its default, help from its metadata."""
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = {"int | None": int, "float | None": float, "str | None": str}.get(str(f.type), None)
        if kind is None:
            kind = type(f.default) if f.default is not None else str
        kw: dict[str, Any] = {"default": f.default, "help": f.metadata.get("help", "")}
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = kind
            if "choices" in f.metadata:
                kw["choices"] = f.metadata["choices"]
        parser.add_argument(flag, **kw)


def dataclass_from_args(cls, args: argparse.Namespace):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names})
