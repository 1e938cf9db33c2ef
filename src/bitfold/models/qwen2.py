"""Qwen2 / Qwen2.5: the Llama block with a bias on q/k/v (none on o)."""
from bitfold.models.base import MODELS
from bitfold.models.llama import LlamaForCausalLM


@MODELS.register("Qwen2ForCausalLM", "gguf:qwen2")
class Qwen2ForCausalLM(LlamaForCausalLM):
    config_overrides = {"attention_bias": True, "o_bias": False}
    gguf_permuted_qk = False
