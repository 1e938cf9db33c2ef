"""CPU GEMV/GEMM of Q6_K weights: the table-free Q6K kernel on the file's blocks
(`lut_gemm.q6k_gemm`, 6.5625 bits/weight) against the int6-g16 LUT layout GGUF Q6_K layers were
converted to before (two LUT passes, 4 + 2 bits, fp16 scale and min per 16: 10 bits/weight).

Both run the same random Q6_K blocks (the int6-g16 form converted from them exactly as the GGUF
CPU loader does, `gguf_blocks.convert`) on Qwen2.5-1.5B's shapes; time is the median of `--reps`
calls after warm-up, interleaved so the machine's load hits both alike.

    python benchmarks/q6k_gemv.py --batches 1,8
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import environment, md_table, write_results  # noqa: E402

from bitfold.kernels import lut_gemm as L  # noqa: E402
from bitfold.weights.gguf_blocks import convert  # noqa: E402
from bitfold.weights.lowbit import LowBitSpec  # noqa: E402
from gguf import GGMLQuantizationType as Q  # noqa: E402

SHAPES = {"qkv/o 1536x1536": (1536, 1536), "gate|up 8960x1536": (8960, 1536), "down 1536x8960": (1536, 8960),
          "lm_head 151936x1536": (151936, 1536)}


def random_blocks(N: int, K: int) -> torch.Tensor:
    b = torch.randint(0, 256, (N * K // 256, 210), dtype=torch.uint8)
    b[:, 208:210] = ((torch.rand(N * K // 256) - 0.3) * 0.02).half().view(torch.uint8).view(-1, 2)
    return b.view(N, K // 256 * 210)


def int6_passes(blocks: torch.Tensor):
    q, s, m = convert(blocks, Q.Q6_K, LowBitSpec(6, 16))
    lo = L.pack_lut(q & 15, s, m, 4, 16)
    hi = L.pack_lut(q >> 4, s.float() * 16, torch.zeros_like(m), 2, 16)
    return lo, hi


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    for name in args.shapes.split(","):
        N, K = SHAPES[name]
        blocks = random_blocks(N, K)
        (p0, s0, m0), (p1, s1, m1) = int6_passes(blocks)
        int6_bytes = sum(t.numel() * t.element_size() for t in (p0, s0, m0, p1, s1, m1))

        def q6k(x):
            return L.q6k_gemm(x, blocks)

        def lut(x):
            return L.lut_gemm(x, p0, s0, m0, N, 4, 16).add_(L.lut_gemm(x, p1, s1, m1, N, 2, 16))

        for B in map(int, args.batches.split(",")):
            x = torch.randn(B, K)
            exact = x.double() @ L.q6k_dequantize_ref(blocks, K).double().t()
            err = {k: float((f(x).double() - exact).norm() / exact.norm()) for k, f in (("q6k", q6k), ("int6", lut))}
            times = {"q6k": [], "int6": []}
            for _ in range(3):
                q6k(x), lut(x)
            for _ in range(args.reps):
                for k, f in (("q6k", q6k), ("int6", lut)):
                    t0 = time.perf_counter()
                    f(x)
                    times[k].append(time.perf_counter() - t0)
            q6k_ms, int6_ms = (statistics.median(times[k]) * 1e3 for k in ("q6k", "int6"))
            rows.append({"shape": name, "batch": B, "q6k_ms": round(q6k_ms, 3), "int6_g16_ms": round(int6_ms, 3),
                         "speedup": round(int6_ms / q6k_ms, 2), "q6k_MB": round(blocks.numel() / 1e6, 1),
                         "int6_g16_MB": round(int6_bytes / 1e6, 1), "q6k_GBps": round(blocks.numel() / q6k_ms / 1e6, 1),
                         "q6k_rel_err": f"{err['q6k']:.1e}", "int6_rel_err": f"{err['int6']:.1e}"})
            print(rows[-1], flush=True)
    cols = ["shape", "batch", "q6k_ms", "int6_g16_ms", "speedup", "q6k_MB", "int6_g16_MB", "q6k_GBps", "q6k_rel_err",
            "int6_rel_err"]
    payload = {"environment": environment(), "rows": rows}
    print(write_results("q6k-gemv", payload, md_table(rows, cols), args.out))


if __name__ == "__main__":
    main()
