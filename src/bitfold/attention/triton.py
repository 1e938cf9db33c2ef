"""The GPU backend: Triton kernels that read each codec's pages directly (CUDA graphs safe)."""
from bitfold.attention.base import ATTENTION_BACKENDS, AttentionBackend
from bitfold.kernels._triton import HAS_TRITON


@ATTENTION_BACKENDS.register("triton")
class TritonAttention(AttentionBackend):
    name, devices, priority, graph_safe = "triton", ("cuda",), 20, True

    @classmethod
    def why_unavailable(cls):
        return None if HAS_TRITON else "Triton is not installed"
