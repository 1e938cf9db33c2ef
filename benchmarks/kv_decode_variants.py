"""Old ("tiles") vs new ("planes") compressed-KV decode kernel, one llama3-8b layer (32 q heads,
8 kv heads, head_dim 128), CUDA graph: every variant and launch configuration is first checked
against the PyTorch reference, then timed; the dense bf16 kernel is the baseline. One run, a few
minutes on an H200:

    GIT_COMMIT=$(git rev-parse HEAD) python benchmarks/kv_decode_variants.py --out /root/out

Columns: us per layer, GB/s of the compressed bytes read (codes + scales + ring), % of the
measured copy bandwidth, speed-up over bf16 KV's kernel and the bytes' ideal speed-up.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import environment, graph_time, md_table, write_results  # noqa: E402
from decode import copy_bandwidth  # noqa: E402
from kv import LLAMA3_8B, dense_decode_point, paged_storage, spec_for  # noqa: E402

from bitfold.kernels.quant_kv_attention import quant_paged_decode, quant_paged_decode_ref  # noqa: E402

# (variant, num_warps, num_stages, waves): the old kernel at its tuned default, the new one at a few
CONFIGS = [("tiles", 4, 2, 8), ("planes", 4, 2, 8), ("planes", 4, 3, 8), ("planes", 8, 2, 8), ("planes", 4, 1, 8),
           ("planes", 4, 2, 4)]


def _cpu_time(fns, reps: int) -> float:
    t0 = time.perf_counter()
    for f in fns:
        f()
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--codecs", default="int4,int2,k8v4,int8,fp8")
    ap.add_argument("--points", default="8x32768,1x32768")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--check-seqs", type=int, default=2, help="sequences checked against the reference")
    args = ap.parse_args()
    t_start = time.time()
    # no GPU: a smoke run of the script itself through Triton's interpreter (TRITON_INTERPRET=1, tiny --points)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    timer = graph_time if dev.type == "cuda" else _cpu_time
    torch.manual_seed(0)
    env = environment()
    bw = copy_bandwidth(dev)
    mc = LLAMA3_8B
    KVH, D = mc.num_kv_heads, mc.head_dim
    scale = 1 / math.sqrt(D)
    rows, results = [], []
    for pt in args.points.split(","):
        B, ctx = (int(x) for x in pt.split("x"))
        q, lens, slots, t_dense, dense_bytes = dense_decode_point(B, ctx, mc, dev, dt, timer, args.reps)
        r = {"codec": "bf16", "batch": B, "context": ctx, "variant": "dense", "warps": 4, "stages": 2, "waves": "",
             "us": t_dense * 1e6, "GBps": dense_bytes / t_dense / 1e9, "pct_copy": 100 * dense_bytes / t_dense / bw,
             "x_bf16": 1.0, "ideal_x_bf16": 1.0, "rel_err": None}
        results.append(r)
        rows.append(r)
        print(f"[kv-variants] B={B} ctx={ctx} bf16 dense: {t_dense * 1e6:.1f} us ({r['pct_copy']:.0f}% of copy)", flush=True)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        for name in args.codecs.split(","):
            _, st, tables = paged_storage(name, B, ctx, KVH, D, dev, dt)  # scattered pages
            lay = st.layout
            n = min(B, args.check_seqs)
            ref = quant_paged_decode_ref(lay, q[:n], st, tables[:n], lens[:n], slots[:n], scale).float()
            kv_bytes = B * spec_for(name, mc, B).bytes_per_token(ctx) * ctx / mc.num_layers
            best = {}
            for variant, w, s, wv in CONFIGS:
                kw = dict(max_context_len=ctx, num_warps=w, num_stages=s, waves=wv, variant=variant)
                r = {"codec": name, "batch": B, "context": ctx, "variant": variant, "warps": w, "stages": s,
                     "waves": wv}
                try:
                    out = quant_paged_decode(lay, q, st, tables, lens, slots, scale, **kw)
                    err = ((out[:n].float() - ref).norm() / ref.norm()).item()
                    r["rel_err"] = err
                    if not err < 2e-2:
                        r["status"] = "WRONG"
                        print(f"[kv-variants] {name} {kw}: WRONG rel err {err:.2e}", flush=True)
                        results.append(r)
                        continue
                    t = timer([lambda: quant_paged_decode(lay, q, st, tables, lens, slots, scale, **kw)],
                                   args.reps)
                except Exception as e:  # noqa: BLE001 - report a configuration that fails, go on
                    r["status"] = f"{type(e).__name__}: {str(e)[:200]}"
                    print(f"[kv-variants] {name} {kw}: {r['status']}", flush=True)
                    results.append(r)
                    continue
                r.update(status="ok", us=t * 1e6, GBps=kv_bytes / t / 1e9, pct_copy=100 * kv_bytes / t / bw,
                         x_bf16=t_dense / t, ideal_x_bf16=dense_bytes / kv_bytes)
                results.append(r)
                print(f"[kv-variants] B={B} ctx={ctx} {name:5s} {variant:6s} w{w} s{s} waves{wv}: {t * 1e6:7.1f} us "
                      f"{r['pct_copy']:5.1f}% of copy x{r['x_bf16']:.2f} bf16 (ideal x{r['ideal_x_bf16']:.2f}) "
                      f"err {err:.1e}", flush=True)
                if variant not in best or r["us"] < best[variant]["us"]:
                    best[variant] = r
            rows.extend(best.values())
            del st
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    cols = ["codec", "batch", "context", "variant", "warps", "stages", "waves", "us", "GBps", "pct_copy", "x_bf16",
            "ideal_x_bf16", "rel_err"]
    fmt = [{k: (f"{v:.3g}" if k == "rel_err" and isinstance(v, float) else f"{v:.2f}" if isinstance(v, float) else v)
            for k, v in r.items()} for r in rows]
    table = (f"copy bandwidth {bw / 1e12:.2f} TB/s; one layer's decode attention (no KV write), CUDA graph; best "
             f"configuration per variant:\n\n" + md_table(fmt, cols))
    print(table)
    print(f"[kv-variants] {time.time() - t_start:.0f} s")
    env["copy_bandwidth_Bps"] = bw
    paths = write_results("kv-decode-variants", {"environment": env, "configs": CONFIGS, "results": results}, table,
                          args.out)
    print("wrote", *paths)


if __name__ == "__main__":
    main()
