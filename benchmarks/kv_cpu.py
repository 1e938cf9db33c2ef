"""Issue #11 part 2, CPU: one layer's decode attention over compressed KV pages, the C++ kernel
(kernels/quant_kv_cpu.py) beside its PyTorch reference and beside dense float32 pages through
the existing C++ paged decode (cpu_ops.paged_decode), per layer shape x batch x context.

Per row: milliseconds per call (median, and the best of the repetitions: the machine may be
shared), the bytes one step reads from the cache (pages with their scales, plus the 16-bit
ring's tokens for codecs that keep one; dense: K and V in float32) and the GB/s that makes.
Caches hold random codes and scales (the layout, not the values, sets the cost), one sequence
slot per batch row, shuffled pages. The reference dequantizes the whole batch's pages at every
call, so it runs only up to --ref-max-context.

    python benchmarks/kv_cpu.py                                  # the full table
    python benchmarks/kv_cpu.py --shapes qwen2.5-1.5b --contexts 2048 --batches 1   # a quick look
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment, md_table, write_results  # noqa: E402

from bitfold.kernels import cpu_lib, cpu_ops  # noqa: E402
from bitfold.kernels.quant_kv_cpu import quant_paged_decode_cpu, quant_paged_decode_ref  # noqa: E402
from bitfold.kvcache.codecs import make_codec  # noqa: E402

SHAPES = {  # (query heads, KV heads, head_dim) of one attention layer
    "llama3-8b": (32, 8, 128),
    "qwen2.5-1.5b": (12, 2, 128),
}


def timed(fn, min_s: float, max_reps: int) -> tuple[float, float, int]:
    """(median, min) seconds per call and the repetitions run: at least 3, until min_s has passed."""
    fn()
    times = []
    t_end = time.perf_counter() + min_s
    while len(times) < 3 or (time.perf_counter() < t_end and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times), len(times)


def fill(st, gen) -> None:
    """Random contents: fp16 scales, float32 rows, int8 codes, e4m3 bits of real floats, packed codes."""
    lay = st.layout
    for t in st[:6]:
        if not t.numel():
            continue
        if t.dtype == torch.float16:
            t.copy_(torch.rand(t.shape, generator=gen) * 0.04 + 0.005)
        elif t.dtype == torch.float32:
            t.copy_(torch.randn(t.shape, generator=gen))
        elif t.dtype == torch.int8:
            t.copy_(torch.randint(-127, 128, t.shape, generator=gen, dtype=torch.int8))
        elif lay.k_kind == 2:  # fp8
            t.copy_((torch.randn(t.shape, generator=gen) * 4).to(torch.float8_e4m3fn).view(torch.uint8))
        else:
            t.copy_(torch.randint(0, 256, t.shape, generator=gen, dtype=torch.uint8))


def step_bytes(lay, ctx: int, batch: int) -> int:
    """Bytes one decode step reads from the cache: sealed pages (codes + scales) and ring tokens."""
    sealed = lay.n_sealed(ctx)
    pages = -(-sealed // lay.block_size)
    per_seq = pages * lay.num_kv_heads * (lay.side_bytes(True, 4) + lay.side_bytes(False, 4))
    per_seq += (ctx - sealed) * lay.num_kv_heads * lay.head_dim * 4 * 2
    return batch * per_seq


def run_case(shape: str, batch: int, ctx: int, codecs: list[str], args) -> list[dict]:
    H, KVH, D = SHAPES[shape]
    gen = torch.Generator().manual_seed(ctx + batch)
    q = torch.randn(batch, H, D, generator=gen)
    lens = torch.full((batch,), ctx, dtype=torch.int32)
    scale = 1 / math.sqrt(D)
    rows = []

    def row(variant, impl, med, best, reps, nbytes):
        r = dict(shape=shape, batch=batch, context=ctx, variant=variant, impl=impl, ms=round(med * 1e3, 3),
                 best_ms=round(best * 1e3, 3), reps=reps, mb_read=round(nbytes / 1e6, 2),
                 gb_s=round(nbytes / best / 1e9, 2))
        rows.append(r)
        print(r, flush=True)
        return r

    if "dense" in codecs:  # float32 pages [blocks, 16, KVH, D], the engine's dense CPU layout
        bs = 16
        nb = batch * (-(-ctx // bs))
        kc = torch.randn(nb, bs, KVH, D, generator=gen)
        vc = torch.randn(nb, bs, KVH, D, generator=gen)
        tables = torch.randperm(nb, generator=gen).view(batch, -1).to(torch.int32)
        med, best, reps = timed(lambda: cpu_ops.paged_decode(q, kc, vc, tables, lens, scale), args.min_s, args.max_reps)
        row("dense fp32", "C++", med, best, reps, batch * ctx * KVH * D * 4 * 2)
        del kc, vc
        gc.collect()
    for name in codecs:
        if name == "dense":
            continue
        codec = make_codec(name, torch.float32)
        bs = codec.default_block_size
        nb = batch * (-(-ctx // bs))
        st = codec.allocate(nb, bs, KVH, D, torch.device("cpu"), batch)
        fill(st, gen)
        tables = torch.randperm(nb, generator=gen).view(batch, -1).to(torch.int32)
        slots = torch.arange(batch, dtype=torch.int32)
        call = (st.layout, q, st, tables, lens, slots, scale)
        nbytes = step_bytes(st.layout, ctx, batch)
        med, best, reps = timed(lambda: quant_paged_decode_cpu(*call), args.min_s, args.max_reps)
        fast = row(name, "C++", med, best, reps, nbytes)
        if ctx <= args.ref_max_context:
            med, best, reps = timed(lambda: quant_paged_decode_ref(*call), 0, 3)
            ref = row(name, "reference", med, best, reps, nbytes)
            fast["x_vs_ref"] = round(ref["best_ms"] / fast["best_ms"], 1)
        del st
        gc.collect()
    dense = next((r for r in rows if r["variant"] == "dense fp32"), None)
    if dense is not None:
        for r in rows:
            if r["impl"] == "C++" and r is not dense:
                r["x_vs_dense"] = round(dense["best_ms"] / r["best_ms"], 2)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--contexts", default="2048,8192,32768")
    ap.add_argument("--codecs", default="dense,fp8,int8,int4,int2")
    ap.add_argument("--ref-max-context", type=int, default=8192, help="the reference runs up to this context")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (the kernel takes as many)")
    ap.add_argument("--min-s", type=float, default=1.0, help="time each C++ variant at least this long")
    ap.add_argument("--max-reps", type=int, default=50)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not cpu_lib.available():
        raise SystemExit("the C++ CPU kernels could not be built")
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment()
    env["isa"] = {v: k for k, v in cpu_lib.ISAS.items()}[cpu_lib.load_cpu_library().bitfold_lut_isa()]
    env["loadavg_start"] = os.getloadavg()
    codecs = args.codecs.split(",")
    rows = []
    for shape in args.shapes.split(","):
        for batch in map(int, args.batches.split(",")):
            for ctx in map(int, args.contexts.split(",")):
                rows += run_case(shape, batch, ctx, codecs, args)
    env["loadavg_end"] = os.getloadavg()
    cols = ["shape", "batch", "context", "variant", "impl", "ms", "best_ms", "mb_read", "gb_s", "x_vs_dense",
            "x_vs_ref"]
    table = (md_table(rows, cols) + f"\n\n{env['cpu_threads']} threads, ISA {env['isa']}, load average "
             f"{env['loadavg_start'][0]:.2f} at start, {env['loadavg_end'][0]:.2f} at the end. gb_s and x_vs_* "
             "from the best repetition; mb_read: the cache bytes one step reads.")
    paths = write_results("kv-cpu", {"environment": env, "rows": rows}, table, args.out)
    print("\n".join(paths))


if __name__ == "__main__":
    main()
