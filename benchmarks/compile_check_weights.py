"""Compile every low-bit weight kernel specialization (kernels/qmatmul.py) for a Hopper target
(sm_90) on this machine, without a GPU, as benchmarks/compile_check.py does for the KV codecs:
catches what Triton's interpreter accepts but its compiler does not, and prints registers,
spills and shared memory per kernel (the GEMM launch table was chosen from these: building the
weight tile K-major took the int4-g128 GEMM from 255 registers with spills to 80-173 without).

Every registered low-bit format's GPU layout and every GGUF block type's, x the register GEMV
(each row bucket of its launch table), the tl.dot GEMM (each bucket) and the dequantize kernel.

    python benchmarks/compile_check_weights.py [--formats int4-g128,q4_k] [--dtype bf16]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from compile_check import compile_kernel, resources  # noqa: E402

from bitfold.kernels import qmatmul as qm  # noqa: E402
from bitfold.weights import WEIGHT_FORMATS  # noqa: E402
from bitfold.weights.lowbit import gpu_layout, lowbit_spec  # noqa: E402

DTYPES = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}


def layouts() -> dict[str, qm.QLayout]:
    out = {}
    for n in WEIGHT_FORMATS.names():
        spec = lowbit_spec(n)
        if spec is not None and n == spec.name:
            out[n] = gpu_layout(spec)
    try:
        from bitfold.weights.gguf_blocks import BLOCK_TYPES

        out.update({t.name.lower(): bt.layout for t, bt in BLOCK_TYPES.items()})
    except ImportError:  # no gguf package
        pass
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", default=None, help="comma-separated (default: every layout)")
    ap.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    args = ap.parse_args()
    lays = layouts()
    names = args.formats.split(",") if args.formats else list(lays)
    failed = 0
    for name in names:
        lay = lays[name]
        p1 = lay.planes[1] if len(lay.planes) > 1 else 0
        types = dict(x=DTYPES[args.dtype], out=DTYPES[args.dtype], w0="*i32", w1="*i32", sp="*fp16", mp="*fp16",
                     subp="*u8" if lay.min_kind == "nibble" else "*i8", submp="*u8", M="i32", N="i32", K="i32",
                     KP="i32", NG="i32", NSUP="i32", stride_xm="i32", stride_om="i32", stride_on="i32", magic="i32",
                     magic16="i32")
        consts = dict(P0=lay.planes[0], P1=p1, GROUP=lay.group, GDIV=lay.group or 1, ZERO=lay.zero,
                      MIN_KIND=qm.MIN_KINDS.index(lay.min_kind), SUPER=lay.super_block)
        one_row = qm.default_config(1, "gemv", lay)
        jobs = [("gemv m=1", qm._qgemv_kernel, dict(consts, BLOCK_M=1, BLOCK_N=one_row[1], BLOCK_K=one_row[2],
                                                     EVEN=True), one_row[3])]
        jobs += [(f"gemv m<={m}", qm._qgemv_kernel, dict(consts, BLOCK_M=c[0], BLOCK_N=c[1],
                                                          BLOCK_K=c[2], EVEN=True), c[3])
                for m, c in qm.GEMV_CONFIGS.items()]
        prec = "ieee" if args.dtype == "fp32" else "tf32"
        jobs += [(f"gemm m<={m}", qm._qgemm_kernel, dict(consts, PRECISION=prec, BLOCK_M=c[0], BLOCK_N=c[1],
                                                         BLOCK_K=c[2], EVEN=False), c[3])
                 for m, c in qm.GEMM_CONFIGS.items()]
        if qm.tc_supported(lay):
            bm, bn, bk, warps, _ = qm.TC_CONFIG
            in_tile = 0 < lay.group < bk  # as the wrapper decides
            jobs.append(("tc", qm._qgemv_tc_kernel, dict(qm.consts_tc(consts), BLOCK_M=bm, BLOCK_N=bn,
                                                          BLOCK_K=bk if in_tile else min(bk, lay.group or bk),
                                                          EVEN=True, IN_TILE=in_tile), warps))
        bn, bk, warps = qm.DEQUANT_CONFIG
        jobs.append(("dequant", qm._dequant_kernel, dict(consts, BLOCK_N=bn, BLOCK_K=bk, EVEN=True), warps))
        for what, kern, cs, warps in jobs:
            t0 = time.time()
            try:
                # as launched on real shapes: N, K, KP and the row strides multiples of 16
                k = compile_kernel(kern, types, cs, warps, div16=("N", "K", "KP", "stride_xm", "stride_om", "stride_on"))
                print(f"{name:10} {what:12} ok  {resources(k)}  ({time.time() - t0:.1f}s)", flush=True)
            except Exception as e:  # report and go on: the point is to see every failure
                failed += 1
                print(f"{name:10} {what:12} FAILED {type(e).__name__}: {str(e)[:400]}", flush=True)
    print(f"{failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
