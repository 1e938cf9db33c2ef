"""The C++ compressed-KV decode (kernels/quant_kv_cpu.py) against `quant_paged_decode_ref` and a
float64 oracle that dequantizes the pages itself (fp8 through torch's own e4m3 conversion), for
every quant codec in the registry, on every ISA this CPU has and with 1 or several splits.

Cases: head dims 64 / 128, GQA 1 / 4 / 7, a batch of very different lengths (1 token; below, at
and across the residual window; exactly whole pages; a partial last page; hundreds of tokens),
shuffled pages with -1 holes past each table, residual windows 0 / 32 / the default, sliding
windows, and a padding row (seq_slot -1: its ring is not read). Every byte the kernel must not
read is poisoned (NaN floats and scales: pages outside the tables, the unwritten tail of a last
page, ring slots outside [n_sealed, L)), so a stray read shows as NaN. Plus: SmolLM2 greedy
generation with an int4 cache gives the same tokens with the C++ path as with the reference."""
from __future__ import annotations

import math

import pytest
import torch

from bitfold.kernels import cpu_lib
from bitfold.kernels.quant_kv_cpu import (quant_paged_decode_cpu, quant_paged_decode_cpu_or_ref,
                                          quant_paged_decode_ref, why_not)
from bitfold.kernels.quant_kv_write import KIND_DENSE, KIND_FP8, KIND_INT8
from bitfold.kvcache.codecs import KV_CODECS, make_codec
from bitfold.kvcache.codecs.quant import QuantCodec

pytestmark = pytest.mark.skipif(not cpu_lib.available(), reason="the C++ CPU kernels could not be built")



def _shuffled_tables(need: list[int], nb: int, holes: int, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """int32 block tables: sequence b owns need[b] pages drawn in shuffled order from nb, then
    `holes` -1 entries past the longest table; and the pages no table holds."""
    perm = torch.randperm(nb, generator=gen)
    tables = torch.full((len(need), max(need) + holes), -1, dtype=torch.int32)
    used = 0
    for b, n in enumerate(need):
        tables[b, :n] = perm[used:used + n].to(torch.int32)
        used += n
    return tables, perm[used:]

def _quant_codecs() -> list[str]:
    seen, out = set(), []
    for name in KV_CODECS.names():
        cls = KV_CODECS.get(name)
        if issubclass(cls, QuantCodec) and cls not in seen:
            seen.add(cls)
            out.append(name)
    return out


QUANT = _quant_codecs()
MAIN = ["fp8", "int8", "int4", "int2", "k16v4", "k4v16"]  # every shape; the other combinations at one


def _isas() -> list[str]:
    best = cpu_lib.load_cpu_library().bitfold_lut_isa()
    return [name for name, level in cpu_lib.ISAS.items() if level <= best]


# ------------------------------------------------------------------------------ the oracle


def _dequant64(lay, is_k: bool, codes: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """Pages `[n, KVH, ...]` -> float64 `[n, KVH, BS, D]`, written apart from the code under test."""
    kind, bits, planes = lay.side(is_k)
    if kind == KIND_DENSE:
        return codes.double()
    if kind == KIND_INT8:
        return codes.double() * meta.double()[..., None]
    if kind == KIND_FP8:
        return codes.view(torch.float8_e4m3fn).double() * meta.double()[..., None]
    n, h, rows, d = codes.shape
    c = codes.long()
    tok = torch.empty(n, h, rows, planes, d, dtype=torch.float64)
    for i in range(planes):  # token r * P + i at bits [i * bits, (i + 1) * bits) of byte row r
        tok[:, :, :, i] = ((c >> (i * bits)) & ((1 << bits) - 1)).double()
    tok = tok.reshape(n, h, rows * planes, d)
    if is_k:  # per channel over the page: [n, h, 2, d] = scale row, zero row
        return tok * meta[:, :, 0:1].double() + meta[:, :, 1:2].double()
    ng = d // lay.v_group  # per token, groups of v_group channels: [n, h, bs, 2, ng]
    sc = meta[:, :, :, 0].double().repeat_interleave(lay.v_group, dim=-1)
    zp = meta[:, :, :, 1].double().repeat_interleave(lay.v_group, dim=-1)
    assert sc.shape[-1] == ng * lay.v_group
    return tok * sc + zp


def _oracle(lay, q, st, tables, lens, slots, scale, window):
    """float64 decode attention: positions [max(0, L - window), L), sealed ones from their pages,
    the rest from the ring (not at all for a padding row, seq_slot < 0)."""
    B, H, D = q.shape
    KVH, BS = lay.num_kv_heads, lay.block_size
    out = torch.zeros(B, H, D, dtype=torch.float64)
    for b in range(B):
        L = int(lens[b])
        sealed = lay.n_sealed(L)
        pages = tables[b, : -(-sealed // BS)].long()
        ks, vs = [], []
        for is_k, codes, meta, ring, acc in ((True, st.k, st.k_meta, st.ring_k, ks),
                                             (False, st.v, st.v_meta, st.ring_v, vs)):
            x = _dequant64(lay, is_k, codes[pages], meta[pages] if meta.numel() else meta)
            acc.append(x.permute(0, 2, 1, 3).reshape(-1, KVH, D)[:sealed])
            slot = int(slots[b]) if slots is not None else -1
            if lay.ring and slot >= 0:
                pos = torch.arange(sealed, L)
                acc.append(ring[slot, pos % lay.ring_cap].double())
        k, v = torch.cat(ks), torch.cat(vs)
        first = max(0, L - window) if window > 0 else 0
        k, v = k[first:], v[first:]  # the kept positions are [first, first + len(k))
        if not len(k):  # a padding row whose every kept position is in the ring it does not read
            continue
        qf = q[b].double().view(KVH, H // KVH, D)
        p = (torch.einsum("kgd,lkd->kgl", qf, k) * scale).softmax(-1)
        out[b] = torch.einsum("kgl,lkd->kgd", p, v).reshape(H, D)
    return out


# ------------------------------------------------------------------------------ random caches


def _case(name, d, gqa, residual, lens, *, padding=True, seed=0, kvh=2):
    """A codec's storage filled at random where a decode step may read and NaN elsewhere, shuffled
    block tables with -1 holes, distinct shuffled sequence slots (the last row a padding row)."""
    codec = make_codec(name, torch.float32, residual=residual)
    bs = codec.default_block_size
    gen = torch.Generator().manual_seed(seed)
    need = [-(-n // bs) for n in lens]
    nb = sum(need) + 3
    st = codec.allocate(nb, bs, kvh, d, torch.device("cpu"), len(lens) + 2)
    lay = st.layout
    for t in st[:6]:
        if not t.numel():
            continue
        if t.dtype == torch.float16:  # scales and zero points (fp16, as stored)
            t.copy_(torch.rand(t.shape, generator=gen) * 0.04 + 0.005)
        elif t.dtype == torch.float32:  # dense sides and rings
            t.copy_(torch.randn(t.shape, generator=gen))
        elif t.dtype == torch.int8:
            t.copy_(torch.randint(-127, 128, t.shape, generator=gen, dtype=torch.int8))
        elif lay.k_kind == KIND_FP8 and (t is st.k or t is st.v):  # e4m3 bits of real floats, subnormals too
            t.copy_((torch.randn(t.shape, generator=gen) * 8 * torch.rand(t.shape, generator=gen) ** 4)
                    .clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8))
        else:  # packed KIVI codes: every bit pattern
            t.copy_(torch.randint(0, 256, t.shape, generator=gen, dtype=torch.uint8))
    tables, unused = _shuffled_tables(need, nb, 2, gen)
    slots = torch.randperm(len(lens) + 2, generator=gen)[: len(lens)].to(torch.int32)
    if padding:
        slots[-1] = -1
    _poison(lay, st, tables, lens, slots, unused)
    q = torch.randn(len(lens), kvh * gqa, d, generator=gen)
    return lay, q, st, tables, torch.tensor(lens, dtype=torch.int32), slots


def _poison(lay, st, tables, lens, slots, unused_pages):
    """NaN in every float (and fp16 scale) a decode step must not read."""
    nan = float("nan")
    sides = ((lay.k_kind, st.k, st.k_meta), (lay.v_kind, st.v, st.v_meta))
    for kind, codes, meta in sides:
        (codes if kind == KIND_DENSE else meta)[unused_pages.long()] = nan
    for b, L in enumerate(lens):
        sealed = lay.n_sealed(L)
        if sealed % lay.block_size:  # the unwritten tail of a no-ring codec's last page
            page, tail = int(tables[b, sealed // lay.block_size]), sealed % lay.block_size
            for kind, codes, meta in sides:
                if kind == KIND_DENSE:
                    codes[page, :, tail:] = nan
                elif kind in (KIND_INT8, KIND_FP8):
                    meta[page, :, tail:] = nan
        if lay.ring and int(slots[b]) >= 0:
            live = torch.zeros(lay.ring_cap, dtype=torch.bool)
            live[torch.arange(sealed, L) % lay.ring_cap] = True
            st.ring_k[int(slots[b]), ~live] = nan
            st.ring_v[int(slots[b]), ~live] = nan
    if lay.ring:  # the slots no sequence holds
        held = {int(s) for s in slots if s >= 0}
        for s in range(st.ring_k.shape[0]):
            if s not in held:
                st.ring_k[s] = nan
                st.ring_v[s] = nan


# ------------------------------------------------------------------------------ kernel vs references

# 1 token; below, at and just across the residual window (128) and a page (64); whole pages; a
# partial last page; a long one; the last row is the padding row
LENS = [1, 127, 128, 191, 192, 193, 320, 700, 300]


def _check(lay, q, st, tables, lens, slots, window, padding):
    scale = 1 / math.sqrt(lay.head_dim)
    args = (lay, q, st, tables, lens, slots, scale, window)
    ref = quant_paged_decode_ref(*args)
    oracle = _oracle(*args)
    real = slice(0, q.shape[0] - 1) if padding and lay.ring else slice(None)  # the ref reads a padding row's ring as zeros
    assert not torch.isnan(ref[real]).any()
    # float32 math over O(1) values: both within ~1e-6 of float64 (atol scaled to the outputs)
    atol = 2e-6 * float(oracle.abs().max())
    torch.testing.assert_close(ref[real].double(), oracle[real], rtol=1e-5, atol=atol)
    for isa in _isas():
        for splits in (1, 3):
            out = quant_paged_decode_cpu(*args, isa=isa, num_splits=splits)
            assert out.dtype == torch.float32 and out.shape == q.shape
            torch.testing.assert_close(out.double(), oracle, rtol=1e-5, atol=atol,
                                       msg=lambda m: f"{isa}, {splits} splits vs float64: {m}")
            torch.testing.assert_close(out[real], ref[real], rtol=1e-5, atol=atol,
                                       msg=lambda m: f"{isa}, {splits} splits vs the reference: {m}")


def _shapes():
    for name in QUANT:
        if name in MAIN:
            for d in (64, 128):
                for gqa in (1, 4, 7):
                    yield name, d, gqa, None, 0 if gqa != 4 else 150
            yield name, 64, 4, 0, 0
            yield name, 128, 7, 32, 200
        else:
            yield name, 64, 4, None, 100


@pytest.mark.parametrize("name,d,gqa,residual,window", list(_shapes()))
def test_kernel_matches_reference_and_float64(name, d, gqa, residual, window):
    case = _case(name, d, gqa, residual, LENS, seed=d + gqa + (residual or 0) + window)
    _check(*case, window, padding=True)


@pytest.mark.parametrize("name", ["int8", "fp8", "k16v8"])
def test_codec_without_ring_needs_no_seq_slots(name):
    lay, q, st, tables, lens, slots = _case(name, 64, 4, 0, [5, 64, 65, 200], padding=False, seed=1)
    assert not lay.ring
    scale = 1 / math.sqrt(64)
    want = quant_paged_decode_ref(lay, q, st, tables, lens, None, scale)
    torch.testing.assert_close(quant_paged_decode_cpu(lay, q, st, tables, lens, None, scale), want,
                               rtol=1e-5, atol=2e-6 * float(want.abs().max()))


def test_more_splits_than_pages_and_a_batch_of_one_page():
    """Empty splits carry (-inf, 0) and drop out of the merge; one thread or many, same result."""
    lay, q, st, tables, lens, slots = _case("int4", 128, 4, None, [200, 3, 700], padding=False, seed=2)
    args = (lay, q, st, tables, lens, slots, 0.1, 0)
    ref = quant_paged_decode_ref(*args)
    for splits in (1, 2, 16):
        for threads in (1, 2, 5):
            out = quant_paged_decode_cpu(*args, num_splits=splits, num_threads=threads)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-6 * float(ref.abs().max()))


def test_out_of_range_pages_and_slots_raise():
    lay, q, st, tables, lens, slots = _case("int4", 64, 1, None, [300, 250], padding=False, seed=3)
    bad = tables.clone()
    bad[0, 1] = st.k.shape[0]
    with pytest.raises(ValueError, match="out of range"):
        quant_paged_decode_cpu(lay, q, st, bad, lens, slots, 0.1)
    bad_slots = slots.clone()
    bad_slots[1] = st.ring_k.shape[0]
    with pytest.raises(ValueError, match="out of range"):
        quant_paged_decode_cpu(lay, q, st, tables, lens, bad_slots, 0.1)
    with pytest.raises(ValueError, match="longer than its block table"):  # never reads past a table's row
        quant_paged_decode_cpu(lay, q, st, tables[:, :1], lens, slots, 0.1)  # sealed pages 0 and 1


def test_inputs_it_cannot_take_go_to_the_reference():
    """bfloat16 q (a bf16 ring): the C++ wrapper refuses with the reason, the CPU ops' decode
    runs the reference instead, bit for bit."""
    codec = make_codec("int4", torch.bfloat16)
    st = codec.allocate(5, 64, 2, 64, torch.device("cpu"), 2)
    for t in st[:6]:
        if t.numel():
            t.copy_(torch.randint(0, 200, t.shape) if t.dtype == torch.uint8 else torch.rand(t.shape) * 0.05)
    q = torch.randn(1, 4, 64).bfloat16()
    args = (st.layout, q, st, torch.tensor([[4, 0, 2, 1]], dtype=torch.int32), torch.tensor([250], dtype=torch.int32),
            torch.tensor([1], dtype=torch.int32), 0.125)
    assert "float32" in why_not(st.layout, q, st)
    with pytest.raises(ValueError, match="computes in float32, not bfloat16"):
        quant_paged_decode_cpu(*args)
    torch.testing.assert_close(quant_paged_decode_cpu_or_ref(*args), quant_paged_decode_ref(*args), rtol=0, atol=0)


# ------------------------------------------------------------------------------ the decode write


def _bits(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes (NaN == NaN, -0.0 != 0.0)."""
    return t.contiguous().view(torch.uint8)


def _step_kv(gen, B, kvh, d, step):
    """A decode step's new K/V: an outlier channel, a constant channel (zero range: scale 0), a
    channel of tiny spread (fp16-subnormal scales), exact halves (rounding ties) and big values."""
    k = torch.randn(B, kvh, d, generator=gen) * 2
    k[:, :, 3] += 15
    k[:, :, 5] = 0.75
    k[:, :, 6] = 1 + torch.randn(B, kvh, generator=gen) * 1e-6
    v = torch.randn(B, kvh, d, generator=gen)
    v[:, :, : d // 4] = torch.randint(-8, 8, (B, kvh, d // 4), generator=gen) * 0.5
    if step % 7 == 3:
        v *= 3e3
    return k, v


@pytest.mark.parametrize("name,residual", [(n, None) for n in QUANT] + [("int4", 0), ("k8v2", 16), ("int8", 16),
                                                                        ("fp8", 16), ("k16v4", 0), ("k4v16", 16)])
def test_decode_write_same_codes_as_reference(name, residual):
    """Many decode steps (pages sealing from the ring, or rows written in place) through the C++
    write and through write_quant_kv_ref on twin caches: every byte of codes, scales and rings equal;
    a padding row (seq_slot -1, or slot_mapping -1 without a ring) writes nothing."""
    from bitfold.attention.base import AttentionMetadata
    from bitfold.kernels.quant_kv_cpu import write_quant_kv_decode_cpu
    from bitfold.kernels.quant_kv_write import write_quant_kv_ref

    codec = make_codec(name, torch.float32, residual=residual)
    bs, kvh, d = codec.default_block_size, 2, 64
    gen = torch.Generator().manual_seed(len(name) + (residual or 0))
    starts = [79, 63, 130, 1, 40]  # the 4th row is the padding row
    steps = 70
    need = [-(-(n + steps) // bs) for n in starts]
    nb = sum(need) + 2
    tables, _ = _shuffled_tables(need, nb, 1, gen)
    st = codec.allocate(nb, bs, kvh, d, torch.device("cpu"), len(starts) + 1)
    lay = st.layout
    for t in st[:6]:
        if t.numel():
            t.copy_(torch.randint(0, 255, t.shape, generator=gen, dtype=torch.uint8).view(t.dtype)
                    if t.element_size() == 1 else torch.randn(t.shape, generator=gen).to(t.dtype))
    twin = type(st)(*[x.clone() if isinstance(x, torch.Tensor) else x for x in st])
    seq_slots = torch.tensor([4, 0, 2, -1, 1], dtype=torch.int32) if lay.ring else None
    pad = 3
    # the prompts, through the reference into both caches
    for cache in (st, twin):
        g = torch.Generator().manual_seed(7)
        T = sum(starts)
        k, v = torch.randn(T, kvh, d, generator=g), torch.randn(T, kvh, d, generator=g)
        cu = torch.tensor([0] + torch.tensor(starts).cumsum(0).tolist(), dtype=torch.int32)
        slot_map = torch.tensor([int(tables[b, p // bs]) * bs + p % bs for b, n in enumerate(starts) for p in range(n)])
        meta = AttentionMetadata(slot_map, tables, torch.tensor(starts, dtype=torch.int32), cu, max(starts), max(starts),
                                 seq_slots)
        write_quant_kv_ref(lay, cache, k, v, meta)
    lens = list(starts)
    for step in range(steps):
        lens = [n + 1 for n in lens]
        slot_map = torch.tensor([int(tables[b, (n - 1) // bs]) * bs + (n - 1) % bs for b, n in enumerate(lens)])
        if not lay.ring:
            slot_map[pad] = -1
        ctx = torch.tensor(lens, dtype=torch.int32)
        meta = AttentionMetadata(slot_map, tables, ctx, torch.arange(len(lens) + 1, dtype=torch.int32), 1, max(lens),
                                 seq_slots)
        k, v = _step_kv(gen, len(lens), kvh, d, step)
        write_quant_kv_ref(lay, st, k, v, meta)
        write_quant_kv_decode_cpu(lay, twin, k, v, meta)
        for i, (want, got) in enumerate(zip(st[:6], twin[:6])):
            assert torch.equal(_bits(got), _bits(want)), (name, step, ["k", "k_meta", "v", "v_meta", "ring_k", "ring_v"][i])
    # and the padding row's pages and ring were never touched: the reference skips it too, so the
    # equality above covers it; the decode reads agree on what was written
    q = torch.randn(len(lens), kvh * 2, d, generator=gen)
    args = (lay, q, twin, tables, torch.tensor(lens, dtype=torch.int32), seq_slots, 0.125)
    real = [b for b in range(len(lens)) if b != pad]
    torch.testing.assert_close(quant_paged_decode_cpu(*args)[real], quant_paged_decode_ref(*args)[real], rtol=1e-5,
                               atol=1e-3)  # V reaches ~1e4 (float32 steps of ~1e-3) and cancels in the sums


def test_fp16_rounding_matches_torch():
    """The writer's float -> fp16 (scales, zero points) is torch's .half(): ties to even, subnormals,
    overflow to inf, every binade."""
    from bitfold.kernels.quant_kv_cpu import write_quant_kv_decode_cpu  # noqa: F401 - the library must have it

    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(20000, generator=gen) * torch.exp2(torch.randint(-30, 18, (20000,), generator=gen)),
                   torch.tensor([65504.0, 65519.0, 65520.0, 1e9, 2.0 ** -24, 2.0 ** -25, 3 * 2.0 ** -26, 2.0 ** -14,
                                 2.0 ** -14 - 2.0 ** -25, 0.0, -0.0, 1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11])])
    codec = make_codec("int8", torch.float32)
    # int8 tokens whose absmax is x * 127: the stored scale is fp16(x * 127 / 127)
    n = x.numel()
    st = codec.allocate(n, 1, 1, 64, torch.device("cpu"))
    from bitfold.attention.base import AttentionMetadata
    from bitfold.kernels.quant_kv_cpu import write_quant_kv_decode_cpu as write

    k = torch.zeros(n, 1, 64)
    k[:, 0, 0] = x.abs() * 127
    meta = AttentionMetadata(torch.arange(n), torch.zeros(n, 1, dtype=torch.int32), torch.ones(n, dtype=torch.int32),
                             torch.arange(n + 1, dtype=torch.int32), 1, 1, None)
    write(st.layout, st, k, k.clone(), meta)
    want = ((x.abs() * 127) / 127).half()
    assert torch.equal(st.k_meta[:, 0, 0].view(torch.int16), want.view(torch.int16))


# ------------------------------------------------------------------------------ the engine


def test_engine_greedy_int4_same_tokens_as_reference(smollm2_path):
    """SmolLM2 (GQA 3, head_dim 64) with an int4 cache and a 16-token residual window, so pages
    seal during generation: the cpu backend's C++ decode and the forced reference backend pick
    the same greedy tokens with the same log-probabilities. Float weights (`weights="dense"`): the
    LUT GEMVs round activations to int8 tables, which turns float32-rounding differences between
    any two attention kernels into different tokens after a few steps (dense KV's fused C++ step
    against the reference too)."""
    from bitfold import LLM, SamplingParams
    from bitfold.kvcache.codecs.quant import QuantCppOps, QuantRefOps

    prompt = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
              "combined movable metal type, oil-based ink and a screw press. Within fifty years")
    params = SamplingParams(temperature=0, max_tokens=120, ignore_eos=True, logprobs=1)
    outs = {}
    for backend, ops in (("cpu", QuantCppOps), ("torch", QuantRefOps)):
        llm = LLM(smollm2_path, device="cpu", kv_cache="int4", kv_residual=16, attention_backend=backend,
                  weights="dense", kv_cache_memory_gb=0.25, max_num_seqs=4, num_threads=1)
        assert isinstance(llm.engine.runner.backend.ops, ops)
        outs[backend] = llm.generate([prompt], params)[0]
    got, want = outs["cpu"], outs["torch"]
    assert len(got.token_ids) == 120
    assert got.token_ids == want.token_ids
    lp = torch.tensor([[v for _, v in x.top] for x in got.logprobs])
    lp_ref = torch.tensor([[v for _, v in x.top] for x in want.logprobs])
    torch.testing.assert_close(lp, lp_ref, rtol=0, atol=1e-3)  # float32 sums in another order, 30 layers deep
