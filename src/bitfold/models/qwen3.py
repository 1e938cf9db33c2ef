"""Qwen3: the Llama block with a per-head RMSNorm on q and k before rotary."""
from bitfold.models.base import MODELS
from bitfold.models.llama import LlamaForCausalLM


@MODELS.register("Qwen3ForCausalLM", "gguf:qwen3")
class Qwen3ForCausalLM(LlamaForCausalLM):
    config_overrides = {"qk_norm": True}
    gguf_permuted_qk = False
