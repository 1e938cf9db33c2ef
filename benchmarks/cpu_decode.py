"""CPU decode speed of the default model (SmolLM2-135M-Instruct GGUF) through the whole engine.

Each batch size runs B requests with a real-text prompt; after every request has produced its
first token (prefill done), the remaining steps are timed. Reported beside each figure: the
roofline, i.e. the bytes one decode step must read (every weight once, as stored: float32
or packed low-bit codes with their scales, plus each sequence's K/V) divided by the CPU's
measured copy bandwidth. `--weights` picks the format (default auto: the GGUF's own blocks,
through the LUT kernels; `dense` dequantizes at load, the default before issue #12).

    python benchmarks/cpu_decode.py --batches 1,8 --tokens 64
    python benchmarks/cpu_decode.py --weights dense
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

from bitfold import LLM, SamplingParams  # noqa: E402

PROMPT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
          "combined movable metal type, oil-based ink and a wooden press adapted from wine making.")


def copy_bandwidth() -> float:
    src = torch.randn(1 << 26)  # 256 MB: far beyond the caches
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * src.numel() * 4 / statistics.median(times)


def decode_rate(llm: LLM, batch: int, tokens: int, repeats: int) -> tuple[float, float]:
    """(tokens/s, median seconds per decode step) over `repeats` runs."""
    eng = llm.engine
    sp = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    rates, steps = [], []
    for _ in range(repeats):
        for _ in range(batch):
            eng.add_request(PROMPT, sp)
        started, n, t0, step_times = 0, 0, None, []
        while eng.has_unfinished_requests():
            t = time.perf_counter()
            outs = eng.step()
            dt = time.perf_counter() - t
            if t0 is None:
                started += sum(1 for o in outs if len(o.token_ids) == 1)
                if started == batch:  # every request prefilled: decode timing starts now
                    t0 = time.perf_counter()
                continue
            step_times.append(dt)
            n += len(outs)
        rates.append(n / (time.perf_counter() - t0))
        steps.append(statistics.median(step_times))
    return statistics.median(rates), statistics.median(steps)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model path (default: the embedded SmolLM2)")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--weights", default="auto", help="weight format (EngineConfig.weights)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    env = environment()
    env["load_average"] = os.getloadavg()
    bw = copy_bandwidth()
    t0 = time.perf_counter()
    llm = LLM(args.model, device="cpu", kv_cache_memory_gb=0.5, weights=args.weights)
    load_s = time.perf_counter() - t0
    model = llm.engine.runner.model
    # Every tensor a step reads in full: parameters and buffers (packed codes) but the embedding's
    # (one row per token: its float table or its own table of codes) and the rotary table; a tied
    # dense model's logits read the embedding (a tied quantized head is counted as lm_head's).
    weights = sum(t.numel() * t.element_size() for n, t in [*model.named_parameters(), *model.named_buffers()]
                  if not n.startswith("embed.") and n != "rope")
    if model.lm_head is None:
        weights += model.embed.weight.numel() * model.embed.weight.element_size()
    formats = sorted({m.fmt.name for m in model.modules() if hasattr(m, "fmt")})
    spec = llm.engine.runner.kv_spec
    kv_per_token = spec.page_size_bytes // spec.block_size
    prompt_len = len(llm.tokenizer.encode(PROMPT))
    llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=8))  # warm-up
    rows = []
    for b in [int(x) for x in args.batches.split(",")]:
        rate, step = decode_rate(llm, b, args.tokens, args.repeats)
        ctx = prompt_len + args.tokens // 2  # mean context over the timed steps
        roof = b / ((weights + b * ctx * kv_per_token) / bw)
        rows.append({"batch": b, "tokens/s": round(rate, 1), "ms/step": round(step * 1e3, 2),
                     "roofline tokens/s": round(roof, 1), "% of roofline": round(100 * rate / roof)})
        print(f"[bench] batch {b}: {rate:.1f} tokens/s ({step * 1e3:.1f} ms/step), roofline {roof:.0f} tokens/s", flush=True)
    env["load_average_after"] = os.getloadavg()
    payload = {"environment": env, "model": llm.engine.model_path, "dtype": str(llm.engine.dtype),
               "weights": args.weights, "formats": formats, "load_seconds": load_s,
               "copy_bandwidth_Bps": bw, "weight_bytes_per_step": weights, "kv_bytes_per_token": kv_per_token,
               "prompt_tokens": prompt_len, "generated_tokens": args.tokens, "results": rows}
    table = (f"{os.path.basename(llm.engine.model_path)}, --weights {args.weights} (layers: {', '.join(formats)}; "
             f"compute {str(llm.engine.dtype)[6:]}), CPU, {torch.get_num_threads()} threads, copy bandwidth "
             f"{bw / 1e9:.1f} GB/s, {weights / 1e6:.0f} MB of weights read per step, loaded in {load_s:.1f} s, load "
             f"average {env['load_average'][0]:.2f} before / {env['load_average_after'][0]:.2f} after\n\n"
             + md_table(rows, list(rows[0])))
    print(table)
    write_results("cpu-decode", payload, table, args.out)


if __name__ == "__main__":
    main()
