"""Where a CPU low-bit decode step's time goes, fused (runner/cpu_step.py) against the per-op
path, on a real model through the whole engine.

One greedy request per format; after its prefill the decode steps alternate between the fused
path and the per-op path step by step (the runner's `fused_steps` set and unset), so both see the same context lengths
and, on a shared machine, the same load: the comparison holds even when absolute figures drift.
Per mode: median engine step and its parts (input preparation, the decoder stack, the lm_head,
sampling, what remains of the runner, and the engine outside the runner: scheduler, detokenizer);
for the fused mode, the decoder stack's own split from `cpu_step.profile()` (each GEMV, attention,
everything else). The load average before and after is recorded.

    python benchmarks/profile_cpu_step.py --model smollm2 --formats int4,int2 --tokens 200
    python benchmarks/profile_cpu_step.py --model .models/qwen-coder-1.5b.gguf --formats int4
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment, md_table, write_results  # noqa: E402
from cpu_decode import PROMPT  # noqa: E402

import bitfold.runner.model_runner as model_runner  # noqa: E402
from bitfold import LLM, SamplingParams  # noqa: E402
from bitfold.runner import cpu_step  # noqa: E402
from bitfold.loader.default_model import default_model_path  # noqa: E402

PARTS = ["step", "prepare", "decoder", "lm_head", "sample", "runner other", "engine other"]


class Clock:
    """Seconds spent in wrapped callables during the current step."""

    def __init__(self):
        self.t: dict[str, float] = {}

    def wrap(self, obj, attr: str, key: str) -> None:
        real = getattr(obj, attr)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                self.t[key] = self.t.get(key, 0.0) + time.perf_counter() - t0

        setattr(obj, attr, timed)


def profile_format(path: str, fmt: str, tokens: int) -> list[dict]:
    llm = LLM(path, device="cpu", weights=fmt, kv_cache_memory_gb=0.25)
    eng, runner = llm.engine, llm.engine.runner
    model = runner.model
    clock = Clock()
    clock.wrap(runner, "launch", "launch")
    clock.wrap(runner, "prepare", "prepare")
    clock.wrap(model, "forward", "decoder")  # nn.Module.__call__ looks forward up on the instance
    real_call = cpu_step.FusedDecodeStep.__call__
    clock.wrap(cpu_step.FusedDecodeStep, "__call__", "decoder")  # the fused stack replaces model.forward
    clock.wrap(model, "compute_logits", "lm_head")
    real_sample = model_runner.sample_tokens
    model_runner.sample_tokens = lambda *a, **k: _timed(clock, "sample", real_sample, *a, **k)
    try:
        llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=4))  # warm-up (and the plan)
        eng.add_request(PROMPT, SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True))
        eng.step()  # prefill
        samples: dict[bool, list[dict]] = {True: [], False: []}
        phases: list[dict] = []
        fused, steps = True, runner.fused_steps
        assert steps is not None, "the runner was built without fused steps (cpu_fused_step off)"
        cpu_step.profile()
        while eng.has_unfinished_requests():
            runner.fused_steps = steps if fused else None
            clock.t = {}
            t0 = time.perf_counter()
            eng.step()
            t = dict(clock.t, step=time.perf_counter() - t0)
            t["runner other"] = t["launch"] - sum(t.get(k, 0.0) for k in ("prepare", "decoder", "lm_head", "sample"))
            t["engine other"] = t["step"] - t["launch"]
            samples[fused].append(t)
            if fused:
                phases.append(cpu_step.profile())
            fused = not fused
        runner.fused_steps = steps
    finally:
        model_runner.sample_tokens = real_sample
        cpu_step.FusedDecodeStep.__call__ = real_call
    rows = []
    for mode in (True, False):
        row = {"model": os.path.basename(path), "weights": fmt, "path": "fused" if mode else "per-op",
               "steps": len(samples[mode])}
        for k in PARTS:
            row[f"{k} ms"] = round(statistics.median(s.get(k, 0.0) for s in samples[mode]) * 1e3, 3)
        row["min step ms"] = round(min(s["step"] for s in samples[mode]) * 1e3, 3)
        if mode:
            for k in cpu_step.PHASES:
                row[f"C++ {k} ms"] = round(statistics.median(p[k] for p in phases) * 1e3, 3)
        rows.append(row)
    return rows


def _timed(clock: Clock, key: str, fn, *args, **kwargs):
    t0 = time.perf_counter()
    try:
        return fn(*args, **kwargs)
    finally:
        clock.t[key] = clock.t.get(key, 0.0) + time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", help="'smollm2' (the default model) or a GGUF/HF path")
    ap.add_argument("--formats", default="int4,int2")
    ap.add_argument("--tokens", type=int, default=200, help="decode steps per format (half of them fused)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = default_model_path() if args.model == "smollm2" else args.model
    env = environment()
    env["loadavg_start"] = os.getloadavg()
    rows = [r for fmt in args.formats.split(",") for r in profile_format(path, fmt, args.tokens)]
    env["loadavg_end"] = os.getloadavg()
    cols = ["model", "weights", "path", "steps", "min step ms"] + [f"{k} ms" for k in PARTS]
    phase_cols = ["model", "weights"] + [f"C++ {k} ms" for k in cpu_step.PHASES]
    table = "\n".join([
        f"## Decode step, batch 1, medians over alternating steps ({args.threads} threads)\n",
        md_table(rows, cols),
        "\n## The fused decoder stack's split (median ms per step)\n",
        md_table([r for r in rows if r["path"] == "fused"], phase_cols),
        f"\nLoad average (1/5/15 min) at start {env['loadavg_start']}, at end {env['loadavg_end']}."])
    print(table)
    write_results("profile-cpu-step", {"environment": env, "rows": rows}, table, args.out)


if __name__ == "__main__":
    main()
