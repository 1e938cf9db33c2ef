"""Where a serving load's time goes, step by step, per KV codec: the engine driven directly (no
HTTP) over a random-weight model of a real shape, steps run synchronously and timed one by one,
each classified by what it computed (prefill tokens, decode sequences, context), plus a
torch.profiler table of the GPU kernels of one prefill-heavy and one decode-only window.

Written for the int4-KV serving slowdown (24 x 3072-token prompts: TTFT 15.8 s against bf16's
~2 s): it says whether prefill steps, decode steps, recompiles (first-call steps) or preemptions
take the time, and which kernel.

    python benchmarks/step_profile.py --shape llama3-8b --kv-cache bf16,int4 --num-prompts 24 \\
        --input-len 3072 --output-len 64 --gpu-memory-utilization 0.19 --max-num-seqs 96
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment, md_table, write_results  # noqa: E402
from serve_random import build_engine  # noqa: E402

from bitfold.config import EngineConfig  # noqa: E402
from bitfold.sampling import SamplingParams  # noqa: E402


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def kernel_table(prof, top: int) -> list[dict]:
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t and e.key and not e.key.startswith("ProfilerStep"):
            rows.append({"kernel": e.key[:90], "calls": e.count, "ms": round(t / 1e3, 3)})
    rows.sort(key=lambda r: -r["ms"])
    return rows[:top]


def run(kv: str, args) -> dict:
    config = EngineConfig(device=args.device, kv_cache=kv, gpu_memory_utilization=args.gpu_memory_utilization,
                          max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                          async_scheduling="off", enforce_eager=args.enforce_eager)
    t0 = time.perf_counter()
    engine = build_engine(args.shape, None, config)
    load_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(0)
    vocab = engine.runner.model_config.vocab_size
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    for _ in range(args.num_prompts):
        engine.add_request(torch.randint(0, vocab, (args.input_len,), generator=gen).tolist(), params)
    sched = engine.scheduler
    orig = sched.schedule
    last = {}

    def schedule():
        out = orig()
        last["out"] = out
        return out

    sched.schedule = schedule
    steps, prof_rows = [], {}
    t_start = time.perf_counter()
    while engine.has_unfinished_requests():
        sync()
        t = time.perf_counter()
        engine.step()
        sync()
        ms = (time.perf_counter() - t) * 1e3
        out = last.get("out")
        if out is None or out.is_empty:
            continue
        prefill = sum(c.num_tokens for c in out.chunks if c.num_tokens > 1)
        decode = sum(1 for c in out.chunks if c.num_tokens == 1)
        ctx = max(c.start + c.num_tokens for c in out.chunks)
        kind = "prefill" if prefill else "decode"
        steps.append({"i": len(steps), "kind": kind, "prefill_tokens": prefill, "decode_seqs": decode,
                      "max_context": ctx, "preempted": len(out.preempted), "ms": round(ms, 3)})
    total_s = time.perf_counter() - t_start

    # profile one more load's windows: a prefill step and a decode step (warm by now)
    for _ in range(min(4, args.num_prompts)):
        engine.add_request(torch.randint(0, vocab, (args.input_len,), generator=gen).tolist(), params)
    from torch.profiler import ProfilerActivity, profile

    for _ in range(200):
        if not engine.has_unfinished_requests() or len(prof_rows) == 2:
            break
        with profile(activities=[ProfilerActivity.CUDA if torch.cuda.is_available() else ProfilerActivity.CPU]) as prof:
            engine.step()
            sync()
        out = last["out"]
        kind = "prefill" if any(c.num_tokens > 1 for c in out.chunks) else "decode"
        if kind not in prof_rows and not out.is_empty:
            prof_rows[kind] = {"chunks": len(out.chunks), "tokens": out.num_tokens,
                               "kernels": kernel_table(prof, args.top)}
    while engine.has_unfinished_requests():
        engine.step()

    def agg(kind):
        s = [x for x in steps if x["kind"] == kind]
        return {"steps": len(s), "total_s": round(sum(x["ms"] for x in s) / 1e3, 3),
                "median_ms": round(statistics.median([x["ms"] for x in s]), 3) if s else None,
                "max_ms": max((x["ms"] for x in s), default=None),
                "tokens": sum(x["prefill_tokens"] for x in s) if kind == "prefill" else
                sum(x["decode_seqs"] for x in s)}

    res = {"kv_cache": kv, "load_s": round(load_s, 1), "num_blocks": engine.runner.num_blocks,
           "block_size": engine.config.block_size, "wall_s": round(total_s, 3),
           "preemptions": sched.num_preemptions, "prefill": agg("prefill"), "decode": agg("decode"),
           "slowest": sorted(steps, key=lambda x: -x["ms"])[:8], "steps": steps, "profile": prof_rows}
    print(f"[{kv}] wall {total_s:.1f}s, blocks {res['num_blocks']}, preemptions {res['preemptions']}; prefill "
          f"{res['prefill']}; decode {res['decode']}", flush=True)
    for k, v in prof_rows.items():
        print(f"  {k} step ({v['tokens']} tokens, {v['chunks']} chunks):")
        for r in v["kernels"][:8]:
            print(f"    {r['ms']:9.3f} ms  x{r['calls']:<5} {r['kernel']}")
    del engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--kv-cache", default="bf16,int4", help="comma-separated codecs, one run each")
    ap.add_argument("--num-prompts", type=int, default=24)
    ap.add_argument("--input-len", type=int, default=3072)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.19)
    ap.add_argument("--max-num-seqs", type=int, default=96)
    ap.add_argument("--max-num-batched-tokens", type=int, default=1024)
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run (--shape tiny)")
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--top", type=int, default=12, help="kernels per profiled step")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    runs = [run(kv, args) for kv in args.kv_cache.split(",")]
    rows = [{"kv": r["kv_cache"], "wall s": r["wall_s"], "preempt": r["preemptions"],
             "prefill steps": r["prefill"]["steps"], "prefill s": r["prefill"]["total_s"],
             "prefill median ms": r["prefill"]["median_ms"], "decode steps": r["decode"]["steps"],
             "decode s": r["decode"]["total_s"], "decode median ms": r["decode"]["median_ms"]} for r in runs]
    table = md_table(rows, list(rows[0]))
    for r in runs:
        for k, v in r["profile"].items():
            table += f"\n\n{r['kv_cache']}, one {k} step ({v['tokens']} tokens):\n\n" + md_table(
                v["kernels"], ["kernel", "calls", "ms"])
    payload = {"environment": environment(), "args": vars(args), "runs": runs}
    print(table)
    for p in write_results(f"step-profile-{args.shape}", payload, table, args.out):
        print("wrote", p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
