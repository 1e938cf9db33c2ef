"""Backends are chosen by declared priority and capability, and refusals say why."""
import pytest
import torch

from bitfold.attention import ATTENTION_BACKENDS, select_backend
from bitfold.errors import BitfoldError
from bitfold.kernels import cpu_ops
from bitfold.kvcache.codecs import KV_CODECS

CPU = torch.device("cpu")


def test_auto_takes_the_highest_priority_backend_that_fits():
    codec = KV_CODECS.get("dense")(torch.float32)
    fits = [n for n in ATTENTION_BACKENDS.names() if ATTENTION_BACKENDS.get(n).why_unsupported(CPU, torch.float32, codec) is None]
    best = max(fits, key=lambda n: ATTENTION_BACKENDS.get(n).priority)
    assert select_backend("auto", CPU, torch.float32, codec).name == best
    assert best == ("cpu" if cpu_ops.available() else "torch")


def test_dtype_is_declared_data():
    codec = KV_CODECS.get("dense")(torch.bfloat16)
    assert select_backend("auto", CPU, torch.bfloat16, codec).name == "torch"  # the C++ backend is float32-only
    with pytest.raises(BitfoldError, match=r"attention backend 'cpu' cannot run KV cache 'dense' on cpu: computes in float32"):
        select_backend("cpu", CPU, torch.bfloat16, codec)


def test_named_backend_that_cannot_run_says_why():
    codec = KV_CODECS.get("dense")(torch.float32)
    with pytest.raises(BitfoldError, match=r"attention backend 'triton' cannot run .* runs on cuda, not cpu"):
        select_backend("triton", CPU, torch.float32, codec)
    with pytest.raises(BitfoldError, match=r"unknown attention backend 'nope'; known: auto, cpu, torch, triton"):
        select_backend("nope", CPU, torch.float32, codec)
