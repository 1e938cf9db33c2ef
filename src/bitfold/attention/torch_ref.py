"""The reference backend: every codec's pure-PyTorch kernels (`*_ref`). Runs anywhere; it is
what the CPU uses where no faster family can read the pages, and what every other backend is
tested against."""
from bitfold.attention.base import ATTENTION_BACKENDS, AttentionBackend


@ATTENTION_BACKENDS.register("torch")
class TorchAttention(AttentionBackend):
    name, devices, priority = "torch", ("cpu", "cuda"), 0
