"""Compile every Triton kernel specialization a KV codec uses for a Hopper target (sm_90) on
this machine, without a GPU: catches what Triton's interpreter accepts but its compiler does
not (constexpr rules, dtype casts) before a GPU call is spent on it. Needs the ptxas that
Triton's wheel ships. Prints registers, spills and shared memory per kernel.

    python benchmarks/compile_check.py [--codecs int4,int2,...] [--head-dims 128] [--dtype bf16]
"""
from __future__ import annotations

import argparse
import inspect
import re
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from bitfold.kernels import quant_kv_attention as A, quant_kv_write as W  # noqa: E402
from bitfold.kernels.paged_decode import _decode_merge_kernel  # noqa: E402
from bitfold.kvcache.codecs import KV_CODECS, make_codec  # noqa: E402
from bitfold.kvcache.codecs.quant import QuantCodec  # noqa: E402

_T = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.uint8: "u8", torch.int8: "i8"}


def compile_kernel(kern, types: dict, consts: dict, num_warps: int = 4, div16: tuple = (), num_stages: int | None = None):
    names = list(inspect.signature(kern.fn).parameters)
    sig = {n: ("constexpr" if n in consts else types[n]) for n in names}
    # As the JIT specializes at launch: every pointer 16-byte aligned (torch allocations are), and
    # the integer arguments named in div16 multiples of 16 (real model shapes are).
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if sig[n].startswith("*") or n in div16}
    src = ASTSource(kern, sig, {(names.index(k),): v for k, v in consts.items()}, attrs)
    opts = {"num_warps": num_warps} if num_stages is None else {"num_warps": num_warps, "num_stages": num_stages}
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)


def resources(kernel) -> str:
    """Registers / spills / shared memory of a compiled kernel, read from its cubin by the
    cuobjdump that Triton's wheel ships."""
    import re
    import subprocess
    import tempfile

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    return f"{m.group(1)} regs, stack {m.group(2)}, local {m.group(4)}, smem {kernel.metadata.shared}" if m else "?"


# ----------------------------------------------------------------------------- SASS profile

# Instruction classes for the decode loop's cost per byte. On Hopper the integer pipe (LOP3,
# SHF, PRMT, IMAD...) issues at half the FP32 rate and conversions (I2F, F2F, F2FP) at 1/4 to
# 1/8: unpacking codes is where a compressed-KV kernel spends its issue slots.
SASS_CLASSES = {
    "int": {"LOP3", "SHF", "PRMT", "IADD3", "IMAD", "LEA", "SEL", "ISETP", "VIADD", "IMNMX", "VIMNMX", "BMSK",
            "SGXT", "IABS", "LOP", "IADD", "SHL", "SHR", "IMUL", "LEA.HI", "FLO", "POPC", "BREV", "ICMP"},
    "conv": {"I2F", "F2I", "F2F", "F2FP", "I2FP", "F2IP", "FRND", "I2I", "I2IP"},
    "fp32": {"FFMA", "FADD", "FMUL", "FMNMX", "FSEL", "FSETP", "FSET", "FCHK", "FMNMX3"},
    "half": {"HFMA2", "HADD2", "HMUL2", "HMNMX2", "HSET2", "HSETP2"},
    "mufu": {"MUFU"},
    "ldg": {"LDG", "LDGSTS", "LDGDEPBAR", "LD", "LDC"},
    "smem": {"LDS", "STS", "LDSM", "STSM"},
    "mma": {"HMMA", "HGMMA", "IMMA", "WARPGROUP", "WARPSYNC"},
    "shfl": {"SHFL"},
    "bar": {"BAR", "DEPBAR", "SYNCS", "ARRIVES"},
    "uniform": {"UIADD3", "UMOV", "ULEA", "USHF", "UISETP", "ULDC", "R2UR", "S2UR", "UIMAD", "ULOP3", "USEL",
                "UPRMT", "UFLO", "UPOPC", "UBMSK", "USGXT", "UIADD3.64", "VOTEU", "UMOV32I"},
}
_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)(\.[A-Z0-9_.]+)?\s*([^;]*);")


def sass(kernel) -> str:
    """The kernel's SASS, disassembled by the cuobjdump that Triton's wheel ships."""
    import subprocess
    import tempfile

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        return subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout


def sass_loops(text: str) -> list[dict]:
    """Loops of a SASS listing (a branch back to an earlier address), each with its per-class
    instruction counts (one warp, one iteration, every instruction of the body counted once:
    branches inside the body are taken as straight-line code)."""
    ins = []
    for line in text.splitlines():
        m = _SASS_LINE.search(line)
        if m:
            ins.append((int(m.group(1), 16), m.group(2), (m.group(3) or ""), m.group(4)))
    loops = []
    for addr, op, mod, args in ins:
        if op != "BRA":
            continue
        t = re.search(r"0x([0-9a-f]+)", args)
        if t and int(t.group(1), 16) < addr:
            lo = int(t.group(1), 16)
            body = [(op2, mod2) for a, op2, mod2, _ in ins if lo <= a <= addr]
            counts = {}
            for op2, mod2 in body:
                cls = next((c for c, ops in SASS_CLASSES.items() if op2 in ops), "other")
                counts[cls] = counts.get(cls, 0) + 1
                counts["op:" + op2] = counts.get("op:" + op2, 0) + 1
            loops.append({"start": lo, "end": addr, "n": len(body), "counts": counts})
    return loops


def hot_loop_profile(kernel, bytes_per_iter: float, num_warps: int) -> dict:
    """The first loop's (the decode kernels' page loop; the ring loop follows it) instructions
    per KV byte it reads (all warps of the program), by class."""
    loops = sass_loops(sass(kernel))
    if not loops:
        return {}
    hot = min(loops, key=lambda l: l["start"])
    per = {c: v * num_warps / bytes_per_iter for c, v in hot["counts"].items()}
    per["total"] = hot["n"] * num_warps / bytes_per_iter
    per["int+conv"] = per.get("int", 0) + per.get("conv", 0)
    return {"loop_insts": hot["n"], "per_byte": per, "counts": hot["counts"]}


# the wrapper's default (block_m 32, 8 warps) first, then alternatives
PREFILL_CONFIGS = ((64, 8), (32, 8), (32, 4), (16, 4))


def side_types(lay, is_k, dt):
    kind = lay.k_kind if is_k else lay.v_kind
    return {0: dt, 1: "i8", 2: "u8", 3: "u8"}[kind]


def check(lay, dt: str, qg: int, num_warps: int = 4) -> list[tuple[str, object]]:
    p = lambda t: "*" + t  # noqa: E731
    c = A._consts(lay, torch.empty(0, dtype={"bf16": torch.bfloat16, "fp32": torch.float32}[dt]))
    kc, vc = side_types(lay, True, dt), side_types(lay, False, dt)
    common = dict(k_codes=p(kc), k_meta=p("fp16"), v_codes=p(vc), v_meta=p("fp16"), ring_k=p(dt), ring_v=p(dt),
                  block_tables=p("i32"), context_lens=p("i32"), seq_slots=p("i32"), q=p(dt), out=p(dt),
                  scale_log2="fp32", window="i32", bt_stride="i32")
    out = []
    dec = dict(common, part_m=p("fp32"), part_l=p("fp32"), part_acc=p("fp32"), num_splits="i32")
    for variant, kern in A.DECODE_VARIANTS.items():
        types = dec
        if variant == "planes":  # integer codes as int32 words
            types = dict(dec, **{f"{s}_codes": "*i32" for s, kind in (("k", lay.k_kind), ("v", lay.v_kind))
                                 if kind in (W.KIND_INT8, W.KIND_GROUP)})
        for single in (True, False):
            out.append((f"decode {variant} single={single}", compile_kernel(kern, types, dict(
                c, NUM_HEADS=qg * lay.num_kv_heads, QG=qg, QG_PAD=max(16, triton.next_power_of_2(qg)),
                SINGLE_SPLIT=single), num_warps=num_warps)))
    pre = dict(common, cu_seqlens_q=p("i32"), num_seqs="i32", k_new=p(dt), v_new=p(dt))
    for bm, warps in PREFILL_CONFIGS:
        gp = A.gqa_pack(qg, bm)
        out.append((f"prefill m{bm} w{warps} gqa-pack {gp}", compile_kernel(A._quant_prefill_kernel, pre, dict(
            c, NUM_HEADS=qg * lay.num_kv_heads, BLOCK_M=bm, GP=gp), num_warps=warps)))
    wc = dict(KVH=lay.num_kv_heads, BS=lay.block_size, D=lay.head_dim)
    if lay.ring:
        seal = dict(k_new=p(dt), v_new=p(dt), k_codes=p(kc), k_meta=p("fp16"), v_codes=p(vc), v_meta=p("fp16"),
                    ring_k=p(dt), ring_v=p(dt), block_tables=p("i32"), cu_seqlens_q=p("i32"), context_lens=p("i32"),
                    seq_slots=p("i32"), bt_stride="i32")
        for wr in (True, False):
            out.append((f"seal ring={wr}", compile_kernel(W._seal_kernel, seal, dict(
                wc, K_KIND=lay.k_kind, K_BITS=lay.k_bits, KP=lay.k_planes, V_KIND=lay.v_kind, V_BITS=lay.v_bits,
                VP=lay.v_planes, VG=lay.v_group, RESID=lay.residual, CAP=lay.ring_cap, WRITE_RING=wr), num_warps=8)))
        ring = dict(k_new=p(dt), v_new=p(dt), ring_k=p(dt), ring_v=p(dt), cu_seqlens_q=p("i32"), context_lens=p("i32"),
                    seq_slots=p("i32"))
        out.append(("ring write", compile_kernel(W._ring_write_kernel, ring, dict(wc, RESID=lay.residual,
                                                                                  CAP=lay.ring_cap, BLOCK_T=16))))
    else:
        direct = dict(k_new=p(dt), v_new=p(dt), k_codes=p(kc), k_meta=p("fp16"), v_codes=p(vc), v_meta=p("fp16"),
                      slot_mapping=p("i64"))
        out.append(("direct write", compile_kernel(W._direct_write_kernel, direct, dict(
            wc, K_KIND=lay.k_kind, V_KIND=lay.v_kind))))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--codecs", default=None, help="default: every compressed codec")
    ap.add_argument("--head-dims", default="64,128")
    ap.add_argument("--dtype", default="bf16")
    args = ap.parse_args()
    names = args.codecs.split(",") if args.codecs else sorted(
        {KV_CODECS.get(n).name for n in KV_CODECS.names() if issubclass(KV_CODECS.get(n), QuantCodec)})
    bad = 0
    for name in names:
        for d in (int(x) for x in args.head_dims.split(",")):
            codec = make_codec(name, torch.bfloat16)
            lay = codec.layout(codec.default_block_size, 8, d)
            t0 = time.time()
            try:
                res = check(lay, args.dtype, 4)
                info = "; ".join(f"{n}: {resources(k)}" for n, k in res)
                print(f"ok   {name:6s} d={d:3d} ({time.time() - t0:.1f}s) {info}", flush=True)
            except Exception as e:  # noqa: BLE001 - report every failing specialization
                bad += 1
                msgs, cur = [], e
                while cur is not None:
                    msgs.append(f"{type(cur).__name__}: {str(cur).splitlines()[-1] if str(cur) else ''}")
                    cur = cur.__cause__ or cur.__context__
                print(f"FAIL {name:6s} d={d:3d}: " + " <- ".join(msgs), flush=True)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
