"""Triton kernels, one file per kernel. Each file holds the kernel, a wrapper with the plain
name that checks its arguments, and `<name>_ref`, a pure-PyTorch function with the same
signature that is both the test oracle and the path for machines without a GPU.

    kv_write.py       write_kv             scatter new K/V into the paged cache
    paged_decode.py   paged_decode         split-K, GQA-grouped decode attention
    paged_prefill.py  paged_prefill        tiled causal attention for (chunked) prefill
    rms_norm.py       rms_norm, fused_add_rms_norm
    rotary.py         rotary               neox / HF rotate_half rotary embedding
    silu_mul.py       silu_and_mul         SwiGLU activation

Import from the file (`from bitfold.kernels.paged_decode import paged_decode`); nothing is
re-exported here, so `bitfold.kernels.paged_decode` stays the module, and importing the
package does not import Triton. `bitfold.kernels._triton.HAS_TRITON` says whether kernels
can launch at all.
"""
