"""CPU cost of an embedding lookup from quantized storage against a float table (issue #12 part
2): one decode step looks up B rows, so this is what reading codes adds per step.

Two tables: the default model's (SmolLM2, its tied head's int8-g32 bytes, 49152 x 576) and one
of Qwen2.5-1.5B's size in int4-g32 LUT codes (151936 x 1536, random codes: the layout, not the
values, sets the cost), each beside F.embedding over a float32 table of the same shape.

    python benchmarks/embedding_rows.py --batches 1,8
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment, md_table, write_results  # noqa: E402

from bitfold import LLM  # noqa: E402
from bitfold.layers.linear import Linear  # noqa: E402


def per_call_us(fn, calls: int) -> tuple[float, float]:
    """(median, min) microseconds per call."""
    fn()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6, min(times) * 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    llm = LLM(None, device="cpu", kv_cache_memory_gb=0.1)
    model = llm.engine.runner.model
    if model.embed.weight.numel():
        raise SystemExit("the default model's embedding holds a float table: nothing to compare")
    tables = [("SmolLM2 tied head", model.embed.table.fmt.name, model.embed, model.embed.shape)]
    N, K = 151936, 1536
    torch.manual_seed(0)
    lin = Linear(K, {"w": N}, False, "int4-g32", torch.float32)
    q = torch.randint(0, 16, (N, K), dtype=torch.uint8)
    s = (torch.rand(N, K // 32) * 0.01).half()
    lin.fmt.load_codes(lin, q, s, -s, 0)
    del q
    tables.append(("Qwen2.5-1.5B-sized table", "int4-g32", lambda ids: lin.fmt.rows(lin, ids), (N, K)))
    rows = []
    for name, fmt, lookup, shape in tables:
        floats = torch.randn(shape)
        for b in (int(x) for x in args.batches.split(",")):
            ids = torch.randint(0, shape[0], (b,))
            codes_med, codes_min = per_call_us(lambda: lookup(ids), args.calls)
            float_med, float_min = per_call_us(lambda: F.embedding(ids, floats), args.calls)
            rows.append({"table": name, "codes": fmt, "shape": f"{shape[0]}x{shape[1]}", "batch": b,
                         "codes_us": round(codes_med, 1), "codes_min_us": round(codes_min, 1),
                         "float_us": round(float_med, 1), "float_min_us": round(float_min, 1)})
            print(f"[rows] {name} B={b}: {codes_med:.1f} us from {fmt} codes, {float_med:.1f} us from floats",
                  flush=True)
    table = md_table(rows, ["table", "codes", "shape", "batch", "codes_us", "codes_min_us", "float_us",
                            "float_min_us"])
    print(table)
    write_results("embedding-rows", {"environment": environment(), "threads": torch.get_num_threads(), "rows": rows},
                  "Embedding lookup per decode step on the CPU: rows gathered from codes vs a float32 table "
                  f"(median and min microseconds over {args.calls} calls, {torch.get_num_threads()} threads)\n\n" + table,
                  out_dir=args.out)


if __name__ == "__main__":
    main()
