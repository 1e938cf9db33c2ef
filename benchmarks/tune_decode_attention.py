"""Paged decode attention alone: achieved bandwidth per tile configuration, and what writing
the new K/V inside the kernel costs or saves, at the decode benchmark's hardest points.

Each timing is a CUDA graph of `--reps` back-to-back calls (the engine replays the kernel
inside its decode graphs too), so launch overhead is what a graph pays, not Python's. The
calls write the new token's K/V (`new_k`/`new_v`, as the engine does) and use the plan a
decode graph uses (`max_context_len` = the benchmark's max length). Bytes = the K/V the
batch must read; bandwidth is against the copy bandwidth measured in the same run.

    python benchmarks/tune_decode_attention.py
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import environment, graph_time, md_table, write_results  # noqa: E402
from decode import copy_bandwidth  # noqa: E402

from bitfold.kernels.paged_decode import paged_decode, paged_decode_ref  # noqa: E402

# name -> (num_heads, num_kv_heads, head_dim)
SHAPES = {"llama3-8b": (32, 8, 128), "llama3-70b": (64, 8, 128), "qwen2.5-7b": (28, 4, 128)}
GRAPH_MAX_LEN = 32768 + 64  # what decode.py's graphs are planned for


def make_case(shape, B, ctx, block_size=16, dtype=torch.bfloat16, seed=0):
    H, Hkv, D = SHAPES[shape]
    g = torch.Generator(device="cuda").manual_seed(seed)
    nb = -(-(ctx + 1) // block_size)
    k_cache = torch.randn(B * nb, block_size, Hkv, D, device="cuda", dtype=dtype, generator=g)
    v_cache = torch.randn_like(k_cache)
    tables = torch.arange(B * nb, device="cuda", dtype=torch.int32).view(B, nb)  # a fresh pool's order
    ctx_lens = torch.full((B,), ctx, device="cuda", dtype=torch.int32)
    q = torch.randn(B, H, D, device="cuda", dtype=dtype, generator=g)
    new_k = torch.randn(B, Hkv, D, device="cuda", dtype=dtype, generator=g)
    new_v = torch.randn_like(new_k)
    last = ctx - 1
    slots = (tables[:, last // block_size].long() * block_size + last % block_size).contiguous()
    return dict(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=tables, context_lens=ctx_lens,
                scale=D ** -0.5, new_k=new_k, new_v=new_v, slot_mapping=slots)


def time_graph(fn, reps: int) -> float:
    return graph_time([fn], reps)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", default="llama3-70b:128x8192,llama3-70b:32x32768,llama3-8b:1x32768,llama3-8b:1x512")
    ap.add_argument("--block-n", default="32,64,128")
    ap.add_argument("--num-warps", default="4,8")
    ap.add_argument("--num-stages", default="2,4")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    env = environment()
    bw = copy_bandwidth(torch.device("cuda"))
    print(f"[tune] {env['device']}: copy {bw / 1e12:.2f} TB/s", flush=True)
    configs = list(itertools.product(*(map(int, v.split(",")) for v in (args.block_n, args.num_warps, args.num_stages))))
    rows, payload = [], {"environment": env, "copy_bandwidth_Bps": bw, "results": []}
    for point in args.points.split(","):
        shape, bc = point.split(":")
        B, ctx = map(int, bc.split("x"))
        case = make_case(shape, B, ctx)
        _, Hkv, D = SHAPES[shape]
        nbytes = 2 * B * ctx * Hkv * D * 2
        # correctness of the engine's call (K/V written by the kernel) against the reference
        ref_k, ref_v = case["k_cache"].clone(), case["v_cache"].clone()
        expected = paged_decode_ref(**{**case, "k_cache": ref_k, "v_cache": ref_v})
        got = paged_decode(**case, max_context_len=GRAPH_MAX_LEN)
        err = float((got.float() - expected.float()).norm() / expected.float().norm())
        assert err < 1e-2 and torch.equal(case["k_cache"], ref_k), f"{point}: rel. error {err}"
        del ref_k, ref_v
        variants = [dict(block_n=bn, num_warps=w, num_stages=st) for bn, w, st in configs]
        variants += [dict(fuse_write=False)]
        for knobs in variants:
            kw = dict(knobs)
            call = dict(case)
            if kw.pop("fuse_write", True) is False:
                call.pop("new_k"), call.pop("new_v"), call.pop("slot_mapping")
            try:
                t = time_graph(lambda: paged_decode(**call, max_context_len=GRAPH_MAX_LEN, **kw), args.reps)
            except Exception as e:  # noqa: BLE001 - a config that does not compile (shared memory)
                print(f"[tune] {point} {knobs}: failed {type(e).__name__}: {str(e)[:120]}", flush=True)
                continue
            r = {"point": point, "knobs": knobs, "us": t * 1e6, "GBps": nbytes / t / 1e9, "pct_copy_bw": 100 * nbytes / t / bw}
            payload["results"].append(r)
            rows.append({"point": point, "knobs": " ".join(f"{k}={v}" for k, v in knobs.items()),
                         "us": f"{r['us']:.1f}", "GB/s": f"{r['GBps']:.0f}", "% copy bw": f"{r['pct_copy_bw']:.0f}"})
            print(f"[tune] {point} {knobs}: {r['us']:.1f} us, {r['GBps']:.0f} GB/s ({r['pct_copy_bw']:.0f}%)", flush=True)
        del case
        torch.cuda.empty_cache()
    best = {}
    for r in payload["results"]:
        if r["point"] not in best or r["us"] < best[r["point"]]["us"]:
            best[r["point"]] = r
    table = md_table(rows, ["point", "knobs", "us", "GB/s", "% copy bw"])
    table += "\n\nfastest per point:\n" + "\n".join(f"- {p}: {r['knobs']} {r['us']:.1f} us ({r['pct_copy_bw']:.0f}%)"
                                                 for p, r in best.items())
    print(table)
    j, m = write_results("tune-decode-attention", payload, table, args.out)
    print(f"[tune] wrote {j} and {m}")


if __name__ == "__main__":
    main()
