"""Where a decode step's time goes, and what each decode optimization buys, on a random-weight
model of a named shape (the decode benchmark's set-up).

For each point BxCTX:
1. engine step time (`LLMEngine.step()` in steady state) for each variant (`--variants`), each
   with its own CUDA graphs: "sync, unfused" (the host waits for every step; the new K/V are
   written by a kernel of their own), "sync, fused" (the decode attention kernel writes them),
   "async, fused, cuBLAS" (step N+1 is launched before step N's tokens are read back; every
   matmul through cuBLAS), "async, fused" (the default: the same with the Triton GEMV for
   matmuls of <= 16 rows);
2. for the last variant: host time per step spent outside waits (scheduling, input
   preparation, launches, outputs) and the per-kernel CUDA time of its graph replays
   (torch.profiler): step time minus kernel time is what the GPU spent idle.

    python benchmarks/profile_decode.py --model llama3-8b --points 1x512,1x32768,128x512
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment, md_table, write_results  # noqa: E402
from decode import (bitfold_decode, bitfold_engine, build_hf, copy_bandwidth, kv_bytes_per_token,  # noqa: E402
                    use_gemv_configs, weight_bytes)

from bitfold.kernels import gemv as gemv_mod  # noqa: E402
from bitfold.runner.cuda_graphs import DecodeGraphs  # noqa: E402
from bitfold.weights import dense  # noqa: E402

# name -> (async scheduling, KV write fused into decode attention, rows up to which the Triton GEMV runs)
VARIANTS = {"sync, unfused": (False, False, 0), "sync, fused": (False, True, 0),
            "async, fused, cuBLAS": (True, True, 0), "async, fused": (True, True, dense.GEMV_MAX_ROWS)}


def recapture(eng, sizes: list[int], fused: bool, gemv_rows: int) -> None:
    r = eng.runner
    r.graphs = None
    gc.collect()
    torch.cuda.empty_cache()
    r.backend.ops.fuses_kv_write = fused
    dense.GEMV_MAX_ROWS = gemv_rows
    with torch.inference_mode():
        r.graphs = DecodeGraphs(r.model, r.kv_caches, r.backend, sizes, r.max_model_len, r.block_size)


def host_split(eng, B, ctx, steps):
    """(host ms per step outside waits, ms per step waiting for the device), async variant."""
    runner = eng.runner
    waits = []
    real_launch = runner.launch

    def launch(out):
        h = real_launch(out)
        real_result = h.result

        def result():
            t0 = time.perf_counter()
            res = real_result()
            waits.append(time.perf_counter() - t0)
            return res

        h.result = result
        return h

    runner.launch = launch
    try:
        t = bitfold_decode(eng, B, ctx, steps, 4, async_scheduling=True)
    finally:
        runner.launch = real_launch
    wait = sum(waits[-steps:]) / steps
    return (t - wait) * 1e3, wait * 1e3


def kernel_profile(eng, B, ctx, steps=8):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        bitfold_decode(eng, B, ctx, steps, 0, async_scheduling=True)
    per = defaultdict(float)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per[e.name[:80]] += e.device_time_total / steps / 1e3  # ms per step (the drain launches none)
    return per


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--points", default="1x512,1x32768,128x512")
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--variants", default=";".join(VARIANTS), help="semicolon list; the last one is profiled")
    ap.add_argument("--gemv-configs", default=None,
                    help="a benchmarks/gemv.py JSON: use its best config per row count instead of the built-in table")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    variants = args.variants.split(";")
    if args.gemv_configs:
        use_gemv_configs(args.gemv_configs)
    pts = [tuple(int(v) for v in p.split("x")) for p in args.points.split(",")]
    dev, dt = torch.device("cuda"), torch.bfloat16
    env = environment()
    bw = copy_bandwidth(dev)
    max_len = max(c for _, c in pts) + 64
    hf = build_hf(args.model, dev, dt, max_len)
    wbytes = weight_bytes(hf)
    ns = argparse.Namespace(batches=[max(b for b, _ in pts)], prefill_tokens=2048, enforce_eager=False,
                            gpu_memory_utilization=0.9)
    eng = bitfold_engine(hf, args.model, dev, dt, ns)
    del hf
    gc.collect()
    kvb = kv_bytes_per_token(eng.runner.model_config, dt)
    sizes = sorted({next(s for s in eng.runner.graphs.sizes if s >= b) for b, _ in pts})
    payload = {"environment": env, "copy_bandwidth_Bps": bw, "model": args.model, "points": [],
               "gemv_configs": {str(k): v for k, v in gemv_mod._CONFIGS.items()}}
    rows, lines = [], []
    for name in variants:
        async_on, fused, gemv_rows = VARIANTS[name]
        recapture(eng, sizes, fused, gemv_rows)
        for B, ctx in pts:
            t = bitfold_decode(eng, B, ctx, args.steps, 4, async_scheduling=async_on)
            roof = B * bw / (wbytes + B * ctx * kvb)
            pt = {"variant": name, "batch": B, "context": ctx, "ms_per_step": t * 1e3, "tok_s": B / t,
                  "roofline_tok_s": roof, "pct_roofline": 100 * B / t / roof}
            payload["points"].append(pt)
            rows.append({"variant": name, "batch": B, "context": ctx, "ms/step": f"{t * 1e3:.3f}",
                         "tok/s": f"{B / t:.1f}", "roofline tok/s": f"{roof:.1f}", "% roofline": f"{pt['pct_roofline']:.1f}"})
            print(f"[profile] {name} B={B} ctx={ctx}: {t * 1e3:.3f} ms/step, {pt['pct_roofline']:.1f}% of roofline",
                  flush=True)
    # The last variant (its graphs are still captured): where its time goes.
    for B, ctx in pts:
        host_ms, wait_ms = host_split(eng, B, ctx, args.steps)
        per = kernel_profile(eng, B, ctx)
        total = sum(per.values())
        step_ms = host_ms + wait_ms
        lines.append(f"\n### B={B} ctx={ctx}: step {step_ms:.3f} ms = host {host_ms:.3f} ms outside waits + "
                     f"{wait_ms:.3f} ms waiting; CUDA kernels {total:.3f} ms per step "
                     f"(GPU idle ~{max(step_ms - total, 0):.3f} ms)\n")
        lines.append("| ms/step | % | kernel |\n|---|---|---|")
        for kname, ms in sorted(per.items(), key=lambda kv: -kv[1])[:14]:
            lines.append(f"| {ms:.3f} | {100 * ms / total:.1f} | `{kname}` |")
        payload["points"].append({"profile": f"{B}x{ctx}", "host_ms": host_ms, "wait_ms": wait_ms,
                                  "kernel_ms": total, "kernels": dict(per)})
    table = (f"{args.model}, bf16, copy bandwidth {bw / 1e12:.2f} TB/s (measured in this run)\n\n"
             + md_table(rows, ["variant", "batch", "context", "ms/step", "tok/s", "roofline tok/s", "% roofline"])
             + "\n" + "\n".join(lines))
    print(table)
    j, m = write_results(f"profile-decode-{args.model}", payload, table, args.out)
    print(f"[profile] wrote {j} and {m}")


if __name__ == "__main__":
    main()
