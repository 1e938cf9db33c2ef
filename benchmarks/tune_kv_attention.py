"""Sweep the compressed-KV decode kernel's launch knobs (warps, pipeline stages, split waves)
per codec at a few (batch, context) points of a llama3-8b layer, after checking every
configuration against the PyTorch reference; reports each point's best configuration and its
bandwidth beside the dense bf16 kernel's.

    python benchmarks/tune_kv_attention.py --codecs int4,int2 --points 1x32768,8x32768
"""
from __future__ import annotations

import argparse
import itertools
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import environment, graph_time, md_table, write_results  # noqa: E402
from decode import copy_bandwidth  # noqa: E402
from kv import LLAMA3_8B, dense_decode_point, paged_storage, spec_for  # noqa: E402

from bitfold.kernels.quant_kv_attention import quant_paged_decode, quant_paged_decode_ref  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--codecs", default="fp8,int8,int4,int2,k8v4")
    ap.add_argument("--points", default="1x32768,8x32768,32x8192")
    ap.add_argument("--warps", default="4,8")
    ap.add_argument("--stages", default="2,3")
    ap.add_argument("--waves", default="2,4,8")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda")
    env = environment()
    bw = copy_bandwidth(dev)
    mc = LLAMA3_8B
    KVH, D = mc.num_kv_heads, mc.head_dim
    scale = 1 / math.sqrt(D)
    rows, results = [], []
    for pt in args.points.split(","):
        B, ctx = (int(x) for x in pt.split("x"))
        q, lens, slots, t_dense, dense_bytes = dense_decode_point(B, ctx, mc, dev, torch.bfloat16, graph_time,
                                                                  args.reps)
        print(f"[tune] B={B} ctx={ctx} dense bf16: {t_dense * 1e6:.1f} us ({dense_bytes / t_dense / 1e9:.0f} GB/s)", flush=True)
        for name in args.codecs.split(","):
            _, st, tables = paged_storage(name, B, ctx, KVH, D, dev, torch.bfloat16)  # scattered pages
            lay = st.layout
            ref = quant_paged_decode_ref(lay, q[:1], st, tables[:1], lens[:1], slots[:1], scale) if ctx <= 65536 else None
            kv_bytes = B * spec_for(name, mc, B).bytes_per_token(ctx) * ctx / mc.num_layers
            best = None
            for w, s, wv in itertools.product(*(map(int, a.split(",")) for a in (args.warps, args.stages, args.waves))):
                kw = dict(max_context_len=ctx, num_warps=w, num_stages=s, waves=wv)
                try:
                    out = quant_paged_decode(lay, q, st, tables, lens, slots, scale, **kw)
                    err = None
                    if ref is not None:
                        err = ((out[:1].float() - ref.float()).norm() / ref.float().norm()).item()
                        if not err < 2e-2:
                            print(f"[tune] {name} {kw}: WRONG rel err {err:.2e}", flush=True)
                            continue
                    t = graph_time([lambda: quant_paged_decode(lay, q, st, tables, lens, slots, scale, **kw)], args.reps)
                except Exception as e:  # noqa: BLE001 - a config that does not compile is skipped
                    print(f"[tune] {name} {kw}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                    continue
                r = {"codec": name, "batch": B, "context": ctx, "warps": w, "stages": s, "waves": wv, "us": t * 1e6,
                     "GBps": kv_bytes / t / 1e9, "pct_copy": 100 * kv_bytes / t / bw, "x_dense": t_dense / t,
                     "ideal_x_dense": dense_bytes / kv_bytes, "rel_err": err}
                results.append(r)
                if best is None or t < best["us"] / 1e6:
                    best = r
            if best:
                print(f"[tune] B={B} ctx={ctx} {name:5s} best w{best['warps']} s{best['stages']} waves{best['waves']}: "
                      f"{best['us']:.1f} us {best['GBps']:.0f} GB/s ({best['pct_copy']:.0f}% of copy) "
                      f"x{best['x_dense']:.2f} dense (ideal x{best['ideal_x_dense']:.2f})", flush=True)
                rows.append({k: (f"{v:.2f}" if isinstance(v, float) else v) for k, v in best.items()})
            del st
            torch.cuda.empty_cache()
    table = f"copy bandwidth {bw / 1e12:.2f} TB/s\n\nBest configuration per codec and point:\n\n" + md_table(rows, list(rows[0]))
    print(table)
    write_results("tune-kv-attention", {"environment": env, "copy_bandwidth_Bps": bw, "results": results}, table, args.out)


if __name__ == "__main__":
    main()
