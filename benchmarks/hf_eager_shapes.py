"""Why transformers eager decodes 2-3x faster on a repeated run than on a first run.

benchmarks/decode.py --repeats showed HF eager at batch 1 on the llama3-8b shape at ~14 tok/s
on its first run per context and ~40 tok/s on later runs of the same context. This script
separates the candidate causes on one random-weight model: a run over KV lengths never seen
before vs. the same lengths again, after emptying the CUDA caching allocator, and per-step
times within a run. If only unseen lengths are slow, something on the host is cached per
sequence length, and every real generation (whose lengths are new at every step) pays the
slow figure.

    python benchmarks/hf_eager_shapes.py --model llama3-8b --steps 24
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
from decode import SHAPES, build_hf, sync  # noqa: E402


@torch.no_grad()
def run(model, ctx: int, steps: int, device) -> list[float]:
    """One prefill of `ctx` random tokens, then `steps` greedy steps; seconds per step."""
    ids = torch.randint(0, 500, (1, ctx), device=device)
    out = model(ids, use_cache=True, logits_to_keep=1)
    cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    times = []
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        out = model(nxt, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        nxt.tolist()
        times.append(time.perf_counter() - t0)
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama3-8b", choices=[s for s in SHAPES if s != "tiny"])
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device("cuda")
    hf = build_hf(args.model, device, torch.bfloat16, 40000)
    S = args.steps
    # (label, context, empty the allocator cache first). Contexts 512+k*S never overlap in length.
    plan = [("first run, ctx 512", 512, False), ("same lengths again", 512, False),
            ("same lengths, allocator emptied", 512, True), ("new lengths (ctx 512+S)", 512 + S, False),
            ("new lengths (ctx 512+2S)", 512 + 2 * S, False), ("same as previous", 512 + 2 * S, False),
            ("first run, ctx 8192", 8192, False), ("same lengths again", 8192, False),
            ("new lengths (ctx 8192+S)", 8192 + S, False), ("first run, ctx 32768", 32768, False),
            ("same lengths again", 32768, False), ("new lengths (ctx 32768+S)", 32768 + S, False)]
    rows, raw = [], []
    for label, ctx, empty in plan:
        if empty:
            torch.cuda.empty_cache()
        t = run(hf, ctx, S, device)
        med = statistics.median(t[2:])
        raw.append({"label": label, "context": ctx, "empty_cache": empty, "step_s": t})
        rows.append({"run": label, "context": ctx, "median ms/step (steps 3..)": f"{med * 1e3:.1f}",
                     "tok/s": f"{1 / med:.1f}", "first 3 steps ms": ", ".join(f"{x * 1e3:.0f}" for x in t[:3]),
                     "last step ms": f"{t[-1] * 1e3:.1f}"})
        print(f"[hf-eager] {label:34s} ctx={ctx:6d}: median {med * 1e3:6.1f} ms/step = {1 / med:5.1f} tok/s; "
              f"steps(ms) {' '.join(f'{x * 1e3:.0f}' for x in t)}", flush=True)
    env = environment()
    import transformers

    env["transformers"] = transformers.__version__
    write_results("hf-eager-shapes", {"environment": env, "model": args.model, "steps": S, "runs": raw},
                  f"transformers {transformers.__version__} eager (SDPA), {args.model} random weights, batch 1, "
                  f"{S} greedy steps per run after a prefill of `context` random tokens, runs in this order:\n\n"
                  + md_table(rows, list(rows[0])), args.out)


if __name__ == "__main__":
    main()
