"""Low-bit rounding on real weights: plain min/max RTN vs searched ranges (`lowbit.quantize_rtn`).

For each model, the linear weights of the chosen layers (q/k/v/o/gate/up/down) are quantized
both ways in each format, and the relative Frobenius error ||W - deq(W)|| / ||W|| is summed over
them. Then the quantization time of layer shapes, per rounding, min of --repeats (wall and
process CPU time: CPU time is the steadier one on a shared machine); `SHAPE:COUNT` adds the
shape COUNT times to a model's total (the default list is Qwen2.5-1.5B's 28 layers, q/k/v/o
and gate/up/down loaded shard by shard, and its int4 output layer from the tied embedding).

    python benchmarks/lowbit_rounding.py --model default --model .models/qwen-coder-1.5b.gguf \
        --layers 0,13,27 --formats int4-g64,int4-g32,int3-g64,int2-g64
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment, md_table, write_results  # noqa: E402

from bitfold.weights.lowbit import ROUNDINGS, dequantize, lowbit_spec, quantize_rtn  # noqa: E402

_LINEAR = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)\.weight$")


def linear_weights(path: str | None, layers: set[int] | None) -> tuple[str, dict[str, torch.Tensor]]:
    """(model file name, {HF name: float32 [out, in]}) of the chosen layers' linear weights."""
    from bitfold.loader import open_model  # (timing alone needs only torch)
    from bitfold.weights.packed import as_float

    source = open_model(path)
    out = {}
    for name, w in source.weights():
        m = _LINEAR.match(name)
        if m and (layers is None or int(m.group(1)) in layers):
            out[name] = as_float(w, w.shape[1]).float().contiguous()
    return os.path.basename(source.path), out


def reconstruction(weights: dict[str, torch.Tensor], fmt: str) -> dict[str, float]:
    """Relative Frobenius error over all weights, per rounding."""
    spec = lowbit_spec(fmt)
    res = {}
    for rounding in ROUNDINGS:
        num = den = 0.0
        for w in weights.values():
            pad = -w.shape[1] % spec.group
            wp = torch.nn.functional.pad(w, (0, pad))
            deq = dequantize(*quantize_rtn(wp, spec, rounding), spec.group)
            num += (deq - wp).double().pow(2).sum().item()
            den += wp.double().pow(2).sum().item()
        res[rounding] = (num / den) ** 0.5
    return res


def timing(shape: tuple[int, int], fmt: str, repeats: int) -> dict[str, dict[str, float]]:
    w = torch.randn(*shape) * 0.02
    res = {}
    for rounding in ROUNDINGS:
        quantize_rtn(w[:64], lowbit_spec(fmt), rounding)  # warm-up
        wall, cpu = [], []
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            quantize_rtn(w, lowbit_spec(fmt), rounding)
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        res[rounding] = {"wall_s": min(wall), "cpu_s": min(cpu)}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", default=[],
                    help="'default' (SmolLM2) or a path; repeatable (none given: timing only)")
    ap.add_argument("--layers", default="all", help="comma-separated layer indices, or all")
    ap.add_argument("--formats", default="int4-g64,int4-g32,int3-g64,int2-g64")
    ap.add_argument("--shapes", default="8960x1536:56,1536x8960:28,1536x1536:56,256x1536:56,151936x1536:1",
                    help="timed shapes OUTxIN[:COUNT in the model total], or none")
    ap.add_argument("--timing-format", default="int4-g64")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--name", default="lowbit-rounding")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    layers = None if args.layers == "all" else {int(x) for x in args.layers.split(",")}
    formats = args.formats.split(",")
    rows, times = [], []
    for model in args.model:
        name, weights = linear_weights(None if model == "default" else model, layers)
        count = sum(w.numel() for w in weights.values())
        for fmt in formats:
            r = reconstruction(weights, fmt)
            rows.append({"model": name, "layers": args.layers, "tensors": len(weights), "weights": count,
                         "format": fmt, **{f"rel_err_{k}": v for k, v in r.items()},
                         "mse_reduction": 1 - (r["search"] / r["minmax"]) ** 2 if r["minmax"] else 0.0})
            print(rows[-1], flush=True)
    total = {r: {"wall_s": 0.0, "cpu_s": 0.0} for r in ROUNDINGS}
    weights_total = 0
    for item in [] if args.shapes == "none" else args.shapes.split(","):
        shape, _, count = item.partition(":")
        out_f, in_f = (int(x) for x in shape.split("x"))
        t = timing((out_f, in_f), args.timing_format, args.repeats)
        times.append({"shape": shape, "count": int(count or 1), "format": args.timing_format,
                      "threads": torch.get_num_threads(),
                      **{f"{k}_{r}": v for r, d in t.items() for k, v in d.items()}})
        weights_total += out_f * in_f * int(count or 1)
        for r in ROUNDINGS:
            for key in ("wall_s", "cpu_s"):
                total[r][key] += t[r][key] * int(count or 1)
        print(times[-1], flush=True)
    if times:
        times.append({"shape": f"total ({weights_total / 1e9:.2f}B weights)", "format": args.timing_format,
                      "threads": torch.get_num_threads(),
                      **{f"{k}_{r}": v for r, d in total.items() for k, v in d.items()}})
    table = "" if not rows else "## Relative Frobenius error ||W - deq(W)|| / ||W||\n\n" + md_table(
        [{**r, "weights": f"{r['weights'] / 1e6:.1f}M", "rel_err_minmax": f"{r['rel_err_minmax']:.4f}",
          "rel_err_search": f"{r['rel_err_search']:.4f}", "mse_reduction": f"{100 * r['mse_reduction']:.1f}%"}
         for r in rows],
        ["model", "layers", "tensors", "weights", "format", "rel_err_minmax", "rel_err_search", "mse_reduction"])
    table += "" if not times else "\n\n## Quantization time (random weights, min of repeats; total = sum of count x time)\n\n" + md_table(
        [{k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in t.items()} for t in times],
        ["shape", "count", "format", "threads", "wall_s_minmax", "cpu_s_minmax", "wall_s_search", "cpu_s_search"])
    paths = write_results(args.name, {"environment": environment(), "args": vars(args), "errors": rows,
                                      "timing": times}, table)
    print(table)
    print("wrote", *paths)


if __name__ == "__main__":
    main()
