"""The CPU backend: C++ kernels (kernels/cpu/) for float32 caches, one call per layer instead of
~20 PyTorch ops: dense pages (cpu_ops.paged_decode) and every compressed codec's decode
(quant_kv_cpu.quant_paged_decode_cpu). Codecs without C++ kernels fall back to the reference backend."""
import torch

from bitfold.attention.base import ATTENTION_BACKENDS, AttentionBackend
from bitfold.kernels import cpu_ops


@ATTENTION_BACKENDS.register("cpu")
class CpuAttention(AttentionBackend):
    name, devices, dtypes, priority = "cpu", ("cpu",), (torch.float32,), 10

    @classmethod
    def why_unavailable(cls):
        return None if cpu_ops.available() else "the C++ CPU kernels could not be built"
