"""Where a decode step's time goes: per-kernel CUDA time (eager mode, so kernels are visible)
against the step's wall time, for a random-weight model of a named shape."""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode import bitfold_decode, bitfold_engine, build_hf  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--points", default="1x512,8x8192,1x32768")
    ap.add_argument("--prefill-tokens", type=int, default=2048)
    args = ap.parse_args()
    pts = [tuple(int(v) for v in p.split("x")) for p in args.points.split(",")]
    dev, dt = torch.device("cuda"), torch.bfloat16
    max_len = max(c for _, c in pts) + 64
    hf = build_hf(args.model, dev, dt, max_len)
    ns = argparse.Namespace(batches=[max(b for b, _ in pts)], prefill_tokens=args.prefill_tokens, enforce_eager=True,
                            gpu_memory_utilization=0.9)
    eng = bitfold_engine(hf, args.model, dev, dt, ns)
    del hf
    for B, ctx in pts:
        t_eager = bitfold_decode(eng, B, ctx, 16, 4)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            bitfold_decode(eng, B, ctx, 8, 0)
        per = defaultdict(float)
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                per[e.name[:90]] += e.device_time_total / 8 / 1e3  # ms per step
        total = sum(per.values())
        print(f"\n== B={B} ctx={ctx}: eager step {t_eager * 1e3:.2f} ms wall, kernels {total:.2f} ms per step")
        for name, ms in sorted(per.items(), key=lambda kv: -kv[1])[:12]:
            print(f"  {ms:7.3f} ms  {100 * ms / total:5.1f}%  {name}")
    # Host-side cost of one step's preparation alone.
    from bitfold.core.request import Request
    from bitfold.core.scheduler import ScheduledChunk
    from bitfold.sampling import SamplingParams

    r = Request("p", [1] * 512, SamplingParams())
    eng.kv.allocate_slots(r, 513)
    r.num_computed_tokens = 512
    ch = [ScheduledChunk(r, 512, 1, list(eng.kv.block_table(r)))]
    t0 = time.perf_counter()
    for _ in range(100):
        eng.runner.prepare(ch)
    torch.cuda.synchronize()
    print(f"\nrunner.prepare for B=1: {(time.perf_counter() - t0) * 10:.3f} ms per call")


if __name__ == "__main__":
    main()
