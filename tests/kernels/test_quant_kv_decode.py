"""Both compressed-KV decode kernels ("tiles", "planes") against the PyTorch reference, per
codec, with a partly written last page (no-ring codecs), a ring, GQA 4 and a sliding window:
the codec matrix (tests/attention) runs only the default variant of each codec. (int8 is left
out: both variants miss this test's fp32 tolerance under the interpreter; the matrix covers it.)"""
import math

import pytest
import torch

from bitfold.kernels.quant_kv_attention import DECODE_VARIANTS, quant_paged_decode, quant_paged_decode_ref
from bitfold.kvcache.codecs import make_codec
from tests.kernels._util import DEVICE, INTERPRETED, need_triton

DTYPE = torch.float32 if INTERPRETED else torch.bfloat16


def _random_storage(st, gen):
    for t in st:
        if not isinstance(t, torch.Tensor) or not t.numel():
            continue
        if t.dtype == torch.float16:  # scales / zero points
            t.copy_(torch.rand(t.shape, generator=gen) * 0.09 + 0.01)
        elif t.dtype.is_floating_point:
            t.copy_(torch.randn(t.shape, generator=gen))
        elif t.dtype == torch.int8:
            t.copy_(torch.randint(-127, 128, t.shape, generator=gen, dtype=torch.int8))
        else:  # packed codes or fp8 bits (finite: from real floats)
            t.copy_((torch.randn(t.shape, generator=gen) * 4).to(torch.float8_e4m3fn).view(torch.uint8))


@pytest.mark.parametrize("variant", sorted(DECODE_VARIANTS))
@pytest.mark.parametrize("name,window", [("int4", 0), ("int2", 0), ("k8v4", 0), ("fp8", 100),
                                         ("k4v2", 0), ("int4", 150)])
def test_decode_variants_match_the_reference(name, window, variant):
    need_triton()
    codec = make_codec(name, DTYPE)
    bs, kvh, d, qg = codec.default_block_size, 2, 64, 4
    lens = torch.tensor([5 * bs - 7, 2 * bs + 3, 200], dtype=torch.int32)
    B = lens.shape[0]
    nb = -(-int(lens.max()) // bs)
    gen = torch.Generator().manual_seed(0)
    st = codec.allocate(B * nb + 2, bs, kvh, d, torch.device("cpu"), B)
    _random_storage(st, gen)
    tables = torch.randperm(B * nb + 2, generator=gen)[: B * nb].view(B, nb).to(torch.int32)
    slots = torch.tensor([2, 0, 1], dtype=torch.int32)
    q = torch.randn(B, kvh * qg, d, generator=gen).to(DTYPE)
    dev = lambda x: x.to(DEVICE)  # noqa: E731
    st_dev = type(st)(*[dev(t) if isinstance(t, torch.Tensor) else t for t in st])
    args = (st.layout, dev(q), st_dev, dev(tables), dev(lens), dev(slots), 1 / math.sqrt(d), window)
    ref = quant_paged_decode_ref(*args).float()
    for splits in (1, 3):
        out = quant_paged_decode(*args, num_splits=splits, variant=variant).float()
        torch.testing.assert_close(out, ref, atol=2e-3 if INTERPRETED else 2e-2, rtol=2e-3 if INTERPRETED else 2e-2)
