"""Per-layer weight bandwidth of the decode matmuls at small batch: cuBLAS (`F.linear`) vs the
Triton skinny matmul (`bitfold.kernels.gemv`), every candidate launch configuration.

For each linear layer of a model shape (merged q|k|v, o, merged gate|up, down, lm_head) and
each row count M, the weight is streamed from several copies in turn (more bytes than the L2
holds, so nothing is served from cache) inside one CUDA graph, as decode replays it; GB/s is
weight bytes / median time per call, beside the device-to-device copy bandwidth measured in the
same run (read + write bytes). Each configuration's output is checked against float32 first.

    python benchmarks/gemv.py --model llama3-8b --rows 1,2,4,8,16
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import environment, graph_time, md_table, write_results  # noqa: E402
from decode import SHAPES, copy_bandwidth  # noqa: E402

from bitfold.kernels import gemv as gemv_mod  # noqa: E402

REG = [(1, bn, bk, w, s) for bn, bk, w in [(4, 1024, 4), (8, 512, 4), (8, 1024, 4), (16, 256, 4), (16, 512, 4),
                                            (16, 512, 8), (32, 256, 4), (32, 512, 8), (64, 128, 4)]
       for s in (1, 3)]
DOT = [(16, bn, bk, w, s) for bn, bk, w in [(16, 256, 4), (16, 512, 4), (32, 128, 4), (32, 256, 4), (64, 128, 4),
                                             (64, 256, 8), (16, 1024, 4)]
       for s in (3, 5)]


def layer_shapes(model: str) -> dict[str, tuple[int, int, int]]:
    """name -> (N, K, layers using it per step)."""
    c = SHAPES[model][1]
    h, i, L = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    hd = h // c["num_attention_heads"]
    return {"qkv": ((c["num_attention_heads"] + 2 * c["num_key_value_heads"]) * hd, h, L), "o": (h, h, L),
            "gate_up": (2 * i, h, L), "down": (h, i, L), "lm_head": (c["vocab_size"], h, 1)}


def time_calls(fns, target_bytes: int, per_call_bytes: int) -> float:
    """Median seconds per call of `fns` (one per weight copy) replayed in a CUDA graph."""
    return graph_time(fns, max(1, target_bytes // (per_call_bytes * len(fns))))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--rows", default="1,2,4,8,16")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    env = environment()
    bw = copy_bandwidth(dev)
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    payload = {"environment": env, "copy_bandwidth_Bps": bw, "model": args.model, "points": []}
    rows_out, best_by_m = [], {}
    shapes = layer_shapes(args.model)
    for M in [int(m) for m in args.rows.split(",")]:
        cands = (REG + DOT) if M == 1 else DOT
        total = {c: 0.0 for c in cands}  # weighted step time of each config over all layers
        cublas_total, default_total = 0.0, 0.0
        for name, (N, K, count) in shapes.items():
            wbytes = N * K * 2
            copies = max(1, -(-8 * l2 // wbytes))
            ws = [torch.randn(N, K, device=dev, dtype=dt) / K ** 0.5 for _ in range(copies)]
            x = torch.randn(M, K, device=dev, dtype=dt)
            outs = [torch.empty(M, N, device=dev, dtype=dt) for _ in range(copies)]
            ref = F.linear(x.float(), ws[0].float())
            target = max(2 << 30, 2 * copies * wbytes)

            def rate(t):
                return wbytes / t

            t_cublas = time_calls([lambda w=w: F.linear(x, w) for w in ws], target, wbytes)
            per = {}
            for c in cands:
                outs[0].fill_(float("nan"))
                try:
                    gemv_mod.gemv(x, ws[0], config=c, out=outs[0])
                except Exception as e:  # noqa: BLE001 - e.g. too much shared memory for this config
                    per[c] = None
                    print(f"[gemv] {name} M={M} {c}: {type(e).__name__}", flush=True)
                    continue
                err = ((outs[0].float() - ref).norm() / ref.norm()).item()
                if not err < 1e-2:
                    per[c] = None
                    print(f"[gemv] {name} M={M} {c}: WRONG rel err {err}", flush=True)
                    continue
                per[c] = time_calls([lambda w=w, o=o, c=c: gemv_mod.gemv(x, w, config=c, out=o)
                                     for w, o in zip(ws, outs)], target, wbytes)
            dflt = gemv_mod.default_config(M, N, K)
            t_dflt = per.get(dflt) or time_calls([lambda w=w, o=o: gemv_mod.gemv(x, w, out=o)
                                                  for w, o in zip(ws, outs)], target, wbytes)
            ok = {c: t for c, t in per.items() if t is not None}
            best = min(ok, key=ok.get)
            for c in cands:
                total[c] += count * per[c] if per[c] is not None else float("inf")
            cublas_total += count * t_cublas
            default_total += count * t_dflt
            pt = {"layer": name, "M": M, "N": N, "K": K, "cublas_s": t_cublas, "default_config": dflt,
                  "default_s": t_dflt, "best_config": best, "best_s": ok[best],
                  "configs": {"x".join(map(str, c)): t for c, t in per.items()}}
            payload["points"].append(pt)
            rows_out.append({"layer": name, "M": M, "N x K": f"{N} x {K}", "MB": f"{wbytes / 1e6:.1f}",
                             "cuBLAS us": f"{t_cublas * 1e6:.1f}", "cuBLAS % copy": f"{100 * rate(t_cublas) / bw:.0f}",
                             "Triton us": f"{t_dflt * 1e6:.1f}", "Triton % copy": f"{100 * rate(t_dflt) / bw:.0f}",
                             "best config": "x".join(map(str, best)), "best % copy": f"{100 * rate(ok[best]) / bw:.0f}"})
            print(f"[gemv] {name} M={M}: cuBLAS {100 * rate(t_cublas) / bw:.1f}%, default {dflt} "
                  f"{100 * rate(t_dflt) / bw:.1f}%, best {best} {100 * rate(ok[best]) / bw:.1f}% of copy bw", flush=True)
            del ws, outs
            torch.cuda.empty_cache()
        best_all = min(total, key=total.get)
        best_by_m[M] = best_all
        payload["points"].append({"M": M, "step_cublas_s": cublas_total, "step_default_s": default_total,
                                  "best_overall": best_all, "step_best_s": total[best_all]})
        print(f"[gemv] M={M} one step's linear layers: cuBLAS {cublas_total * 1e3:.3f} ms, default "
              f"{default_total * 1e3:.3f} ms, best single config {best_all} {total[best_all] * 1e3:.3f} ms", flush=True)
    summary = "\n".join(f"- M={p['M']}: all linear layers of one step: cuBLAS {p['step_cublas_s'] * 1e3:.3f} ms, "
                        f"Triton default {p['step_default_s'] * 1e3:.3f} ms, best single config "
                        f"{'x'.join(map(str, p['best_overall']))} {p['step_best_s'] * 1e3:.3f} ms"
                        for p in payload["points"] if "best_overall" in p)
    table = (f"{args.model}, bf16, copy bandwidth {bw / 1e12:.2f} TB/s (measured in this run); configs are "
             f"block_m x block_n x block_k x warps x stages\n\n"
             + md_table(rows_out, list(rows_out[0])) + "\n\n" + summary)
    print(table)
    j, m = write_results(f"gemv-{args.model}", payload, table, args.out)
    print(f"[gemv] wrote {j} and {m}")


if __name__ == "__main__":
    main()
