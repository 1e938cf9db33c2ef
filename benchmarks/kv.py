"""Compressed KV cache (issue #11): capacity, kernel bandwidth and decode speed per codec, side
by side in one run, on a random-weight model of a real shape (bf16 weights) on the GPU.

Modes (comma list, `--modes`):
- `capacity`: KV tokens that fit in the same memory (`--kv-gb`) and KV bytes per token at each
  context (pages + scales + the residual window amortized), per codec, from the block pool's
  own budget arithmetic, and the largest batch of `--max-batch-context` tokens each codec holds;
- `kernels`: one layer's attention step (quantize-on-write of the new token + decode attention)
  per codec, timed in a CUDA graph, beside its roofline (KV bytes read / measured copy
  bandwidth), after checking each kernel against its PyTorch reference on the same pages;
- `decode`: end-to-end decode tok/s through the engine loop (scheduler, CUDA graphs, async
  scheduling, sampling) at each context x batch, for every codec in the same KV memory; each
  point beside its roofline ((weights + that codec's KV bytes) / copy bandwidth) and the ideal
  ratio over bf16 (bf16 step bytes / codec step bytes); then the largest batch each codec can
  run at `--max-batch-context` and its throughput.

    python benchmarks/kv.py --model llama3-8b --codecs bf16,fp8,int8,int4,int2 \\
        --contexts 8192,32768,131072 --batches 1,8,32,max --kv-gb 60
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import environment, graph_time, md_table, write_results  # noqa: E402
from decode import bitfold_decode, build_hf, copy_bandwidth, weight_bytes  # noqa: E402

from bitfold.attention import AttentionMetadata  # noqa: E402
from bitfold.config import EngineConfig, ModelConfig  # noqa: E402
from bitfold.engine import LLMEngine  # noqa: E402
from bitfold.kvcache.codecs import make_codec  # noqa: E402
from bitfold.kvcache.spec import KVCacheSpec  # noqa: E402
from bitfold.loader.source import ModelSource  # noqa: E402


def sync():
    torch.cuda.synchronize()


def randomize(storage) -> None:
    """Random but valid contents for any codec's pages: timings on zeros can mislead, and fp8
    bit patterns must not be NaN."""
    for t in storage:
        if not isinstance(t, torch.Tensor) or not t.numel():
            continue
        flat = t.view(-1)
        for i in range(0, flat.numel(), 1 << 28):  # chunks: no multi-GB float temporaries
            part = flat[i : i + (1 << 28)]
            if t.dtype == torch.float16:  # scales / zero points
                part.uniform_(0.01, 0.1)
            elif t.dtype.is_floating_point:
                part.normal_()
            elif t.dtype == torch.int8:
                part.random_(-127, 128)
            else:  # uint8 codes: packed ints or fp8 e4m3 bits
                part.copy_((torch.randn(part.shape, device=t.device) * 4).to(torch.float8_e4m3fn).view(torch.uint8))


# llama3-8b's attention shape for the one-layer kernel scripts (tune_kv_attention.py,
# kv_decode_variants.py): 32 q heads, 8 kv heads, head_dim 128.
LLAMA3_8B = ModelConfig("LlamaForCausalLM", 128256, 4096, 14336, 32, 32, 8, 128)


def paged_storage(name: str, batch: int, tokens: int, kvh: int, d: int, dev, dtype=torch.bfloat16, *,
                  block_size: int | None = None, shuffle: bool = True, extra_blocks: int = 0):
    """(codec, storage, block tables [batch, pages]) of `batch` sequences with room for `tokens`
    each, random valid contents, in the codec's default page size unless `block_size`; with
    `shuffle` each sequence's pages are scattered through the pool (as a real cache's are);
    `extra_blocks` more pages in the pool that no table uses."""
    codec = make_codec(name, dtype)
    bs = block_size or codec.default_block_size
    nb = -(-tokens // bs)
    st = codec.allocate(batch * nb + extra_blocks, bs, kvh, d, dev, batch)
    randomize(st)
    tables = torch.arange(batch * nb, dtype=torch.int32, device=dev).view(batch, nb)
    if shuffle:
        tables = tables[:, torch.randperm(nb, device=dev)].contiguous()
    return codec, st, tables


def dense_decode_point(batch: int, ctx: int, mc: ModelConfig, dev, dtype, timer, reps: int):
    """One layer's decode inputs at batch x ctx and bf16's reference point beside the codecs
    (16-token pages in order, kernels/paged_decode.py): (q, context lengths, sequence slots,
    seconds per call by `timer`, KV bytes it reads)."""
    from bitfold.kernels.paged_decode import paged_decode

    H, KVH, D = mc.num_heads, mc.num_kv_heads, mc.head_dim
    q = torch.randn(batch, H, D, device=dev, dtype=dtype)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
    slots = torch.arange(batch, dtype=torch.int32, device=dev)
    _, st, tables = paged_storage("bf16", batch, ctx, KVH, D, dev, dtype, block_size=16, shuffle=False)
    scale = 1 / math.sqrt(D)
    t = timer([lambda: paged_decode(q, st.k, st.v, tables, lens, scale, max_context_len=ctx)], reps)
    return q, lens, slots, t, batch * ctx * 2 * KVH * D * 2


def spec_for(name: str, mc: ModelConfig, num_seqs: int, dtype=torch.bfloat16) -> KVCacheSpec:
    codec = make_codec(name, dtype)
    bs = codec.default_block_size
    slots = num_seqs if codec.needs_seq_slots(bs, mc.num_kv_heads, mc.head_dim) else 0
    return KVCacheSpec(mc.num_layers, mc.num_kv_heads, mc.head_dim, bs, codec, slots)


def max_batch(name: str, mc: ModelConfig, budget: int, context: int) -> int:
    """Most sequences of `context` tokens (+ a few decode steps) a codec fits in `budget` bytes,
    counting each one's residual-window slot."""
    n = 0
    while True:
        spec = spec_for(name, mc, n + 1)
        need = (n + 1) * -(-(context + 64) // spec.block_size)
        if spec.num_blocks_for(budget) < need:
            return n
        n += 1


# ---------------------------------------------------------------------------------- kernels
def kernel_points(codecs, mc: ModelConfig, points, bw, reps) -> list[dict]:
    from bitfold.kernels.quant_kv_attention import quant_paged_decode_ref
    from bitfold.kernels.paged_decode import paged_decode_ref

    dev = torch.device("cuda")
    H, KVH, D = mc.num_heads, mc.num_kv_heads, mc.head_dim
    out = []
    for B, ctx in points:
        base = None
        for name in codecs:
            # room for the token the step writes; pages scattered
            codec, st, tables = paged_storage(name, B, ctx + 1, KVH, D, dev, extra_blocks=1)
            bs = codec.default_block_size
            ctx_lens = torch.full((B,), ctx, dtype=torch.int32, device=dev)
            slots = torch.arange(B, dtype=torch.int32, device=dev)
            slot_map = (tables[:, (ctx - 1) // bs].long() * bs + (ctx - 1) % bs).contiguous()
            meta = AttentionMetadata(slot_map, tables, ctx_lens, torch.arange(B + 1, dtype=torch.int32, device=dev),
                                     1, ctx, slots)
            q = torch.randn(B, H, D, device=dev, dtype=torch.bfloat16)
            k = torch.randn(B, KVH, D, device=dev, dtype=torch.bfloat16)
            v = torch.randn(B, KVH, D, device=dev, dtype=torch.bfloat16)
            ops = codec.ops("triton")
            scale = 1 / math.sqrt(D)
            # check on these pages first (a copy: the check writes the new token)
            o = ops.forward(q, k, v, st, meta, scale, 0)
            if B * ctx <= 65536:
                if name in ("bf16", "dense"):
                    ref = paged_decode_ref(q, st.k, st.v, tables, ctx_lens, scale)
                else:
                    ref = quant_paged_decode_ref(st.layout, q, st, tables, ctx_lens, slots, scale)
                err = ((o.float() - ref.float()).norm() / ref.float().norm()).item()
            else:
                err = None
            t = graph_time([lambda: ops.forward(q, k, v, st, meta, scale, 0)], reps)
            spec = spec_for(name, mc, B)
            kv_bytes = B * spec.bytes_per_token(ctx) * ctx / mc.num_layers  # one layer
            pt = {"codec": name, "batch": B, "context": ctx, "us": t * 1e6, "kv_bytes": kv_bytes,
                  "GBps": kv_bytes / t / 1e9, "pct_copy_bw": 100 * kv_bytes / t / bw, "rel_err_vs_ref": err}
            if base is None:
                base = pt
            pt["speedup_vs_first"] = base["us"] / pt["us"]
            pt["ideal_speedup"] = base["kv_bytes"] / kv_bytes
            print(f"[kv] kernel {name:6s} B={B:3d} ctx={ctx:6d}: {t * 1e6:8.1f} us  {kv_bytes / t / 1e9:7.0f} GB/s "
                  f"({pt['pct_copy_bw']:.0f}% of copy)  x{pt['speedup_vs_first']:.2f} (ideal x{pt['ideal_speedup']:.2f})"
                  + (f"  err {err:.1e}" if err is not None else ""), flush=True)
            out.append(pt)
            del st, tables
            gc.collect()
            torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------------------------- engine
def engine_for(hf, shape, name, kv_gb, max_seqs, max_len, args) -> LLMEngine:
    raw = hf.config.to_dict()
    raw["architectures"] = [type(hf).__name__]
    mc = ModelConfig.from_hf(raw, f"random:{shape}")
    source = ModelSource(path=f"random:{shape}", format="random", config=mc,
                         weights=lambda: iter(hf.state_dict().items()), load_tokenizer=None, max_context=max_len)
    cfg = EngineConfig(device="cuda", dtype="bfloat16", max_model_len=max_len, max_num_seqs=max_seqs,
                       max_num_batched_tokens=2048, kv_cache_memory_gb=kv_gb, kv_cache=name)
    eng = LLMEngine(cfg, source=source)
    for st in eng.runner.kv_caches:
        randomize(st)
    return eng


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--codecs", default="bf16,fp8,int8,int4,int2")
    ap.add_argument("--modes", default="capacity,kernels,decode")
    ap.add_argument("--contexts", default="8192,32768,131072")
    ap.add_argument("--batches", default="1,8,32,max", help="'max' = the largest batch bf16 holds at that context")
    ap.add_argument("--kernel-points", default="1x32768,8x32768,32x8192,8x131072")
    ap.add_argument("--kv-gb", type=float, default=60.0, help="KV memory every codec gets (GiB)")
    ap.add_argument("--max-batch-context", type=int, default=32768)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=20, help="kernel calls per graph replay")
    ap.add_argument("--name", default="kv")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    codecs = args.codecs.split(",")
    modes = set(args.modes.split(","))
    contexts = [int(x) for x in args.contexts.split(",")]
    env = environment()
    dev = torch.device("cuda")
    bw = copy_bandwidth(dev)
    print(f"[kv] {env['device']}: copy {bw / 1e12:.2f} TB/s", flush=True)
    max_len = max(contexts) + 256
    hf = build_hf(args.model, dev, torch.bfloat16, max_len)
    raw = hf.config.to_dict()
    raw["architectures"] = [type(hf).__name__]
    mc = ModelConfig.from_hf(raw, args.model)
    wbytes = weight_bytes(hf)
    budget = int(args.kv_gb * 2**30)
    payload = {"environment": env, "copy_bandwidth_Bps": bw, "model": args.model, "weight_bytes": wbytes,
               "kv_budget_bytes": budget, "method": __doc__.strip().splitlines()[0], "capacity": [], "kernels": [],
               "decode": [], "max_batch": []}
    tables = []

    # capacity --------------------------------------------------------------------------------
    bf16_tok = None
    caps = {}
    for name in codecs:
        spec = spec_for(name, mc, 1)
        caps[name] = {c: max_batch(name, mc, budget, c) for c in sorted(set(contexts + [args.max_batch_context]))}
        spec_n = spec_for(name, mc, caps[name][args.max_batch_context])
        tokens = spec_n.num_blocks_for(budget) * spec_n.block_size
        per_tok = {c: spec_for(name, mc, 1).bytes_per_token(c) for c in contexts}
        bf16_tok = bf16_tok or per_tok
        row = {"codec": name, "block_size": spec.block_size, "residual": spec.codec.residual,
               "bits_per_element": spec.codec.bits_per_element, "tokens_in_budget": tokens,
               "bytes_per_token": per_tok, "ratio_vs_first": {c: per_tok[c] / bf16_tok[c] for c in contexts},
               "max_batch": caps[name]}
        payload["capacity"].append(row)
        print(f"[kv] capacity {name}: {tokens} tokens in {args.kv_gb:g} GiB; bytes/token vs {codecs[0]} "
              + ", ".join(f"{c}: {row['ratio_vs_first'][c]:.3f}" for c in contexts)
              + f"; max batch {caps[name]}", flush=True)
    cap_rows = [{"codec": r["codec"], "bits/elem": f"{r['bits_per_element']:.2f}", "block": r["block_size"],
                 "residual": r["residual"], "tokens": r["tokens_in_budget"],
                 **{f"bytes/tok vs {codecs[0]} @{c}": f"{r['ratio_vs_first'][c]:.3f}" for c in contexts},
                 **{f"max seqs @{c}": r["max_batch"][c] for c in sorted(r["max_batch"])}} for r in payload["capacity"]]
    tables.append(f"Capacity in the same KV memory ({args.kv_gb:g} GiB):\n\n" + md_table(cap_rows, list(cap_rows[0])))

    # kernels ---------------------------------------------------------------------------------
    if "kernels" in modes:
        pts = [tuple(int(x) for x in p.split("x")) for p in args.kernel_points.split(",")]
        payload["kernels"] = kernel_points(codecs, mc, pts, bw, args.reps)
        rows = [{"codec": p["codec"], "batch": p["batch"], "context": p["context"], "us/layer": f"{p['us']:.1f}",
                 "GB/s": f"{p['GBps']:.0f}", "% copy bw": f"{p['pct_copy_bw']:.0f}",
                 f"x {codecs[0]}": f"{p['speedup_vs_first']:.2f}", "ideal": f"{p['ideal_speedup']:.2f}",
                 "rel err vs ref": f"{p['rel_err_vs_ref']:.1e}" if p["rel_err_vs_ref"] is not None else ""}
                for p in payload["kernels"]]
        tables.append("One layer's attention step (write + decode), CUDA graph, per codec:\n\n" + md_table(rows, list(rows[0])))

    # decode ----------------------------------------------------------------------------------
    if "decode" in modes:
        batches = args.batches.split(",")
        for name in codecs:
            need_seqs = max([caps[name][args.max_batch_context]] + [int(b) for b in batches if b != "max"]
                            + [caps[codecs[0]][c] for c in contexts])
            t0 = time.perf_counter()
            eng = engine_for(hf, args.model, name, args.kv_gb, max(need_seqs, 1), max_len, args)
            print(f"[kv] engine {name}: ready in {time.perf_counter() - t0:.1f}s, "
                  f"{eng.pool.num_blocks * eng.config.block_size} tokens", flush=True)
            spec = eng.runner.kv_spec
            runs = [(int(b) if b != "max" else caps[codecs[0]][c], c) for c in contexts for b in batches]
            runs.append((caps[name][args.max_batch_context], args.max_batch_context))
            for B, ctx in runs:
                if B < 1:
                    continue
                step_bytes = wbytes + B * ctx * spec.bytes_per_token(ctx)  # pages, scales and the ring's share
                bf_bytes = wbytes + B * ctx * spec_for(codecs[0], mc, 1).bytes_per_token(ctx)
                roof = B / (step_bytes / bw)
                pt = {"codec": name, "batch": B, "context": ctx, "roofline_tok_s": roof, "step_bytes": step_bytes,
                      "ideal_ratio_vs_first": bf_bytes / step_bytes,
                      "is_max_batch": (B, ctx) == runs[-1]}
                if B > caps[name].get(ctx, 0):
                    pt["result"] = "does not fit"
                else:
                    try:
                        t = bitfold_decode(eng, B, ctx, args.steps, args.warmup, async_scheduling=True)
                        pt.update(tok_s=B / t, ms_per_step=t * 1e3, pct_roofline=100 * B / t / roof)
                        print(f"[kv] decode {name:5s} B={B:3d} ctx={ctx:6d}: {B / t:8.1f} tok/s {t * 1e3:7.2f} ms/step "
                              f"{100 * B / t / roof:3.0f}% of roofline", flush=True)
                    except Exception as e:  # noqa: BLE001 - one failing point must not lose the run
                        pt["result"] = f"failed: {type(e).__name__}: {str(e)[:200]}"
                        print(f"[kv] decode {name} B={B} ctx={ctx}: {pt['result']}", flush=True)
                (payload["max_batch"] if pt["is_max_batch"] else payload["decode"]).append(pt)
            del eng
            gc.collect()
            torch.cuda.empty_cache()
        first = {(p["batch"], p["context"]): p for p in payload["decode"] if p["codec"] == codecs[0] and "tok_s" in p}
        for p in payload["decode"] + payload["max_batch"]:
            f = first.get((p["batch"], p["context"]))
            if f and "tok_s" in p:
                p["ratio_vs_first"] = p["tok_s"] / f["tok_s"]
        rows = [{"codec": p["codec"], "batch": p["batch"], "context": p["context"],
                 "tok/s": f"{p['tok_s']:.1f}" if "tok_s" in p else p.get("result", ""),
                 "ms/step": f"{p['ms_per_step']:.2f}" if "tok_s" in p else "",
                 "roofline tok/s": f"{p['roofline_tok_s']:.1f}", "% roofline": f"{p['pct_roofline']:.0f}" if "tok_s" in p else "",
                 f"x {codecs[0]}": f"{p['ratio_vs_first']:.2f}" if "ratio_vs_first" in p else "",
                 f"ideal x {codecs[0]}": f"{p['ideal_ratio_vs_first']:.2f}"}
                for p in sorted(payload["decode"], key=lambda p: (p["context"], p["batch"], codecs.index(p["codec"])))]
        tables.append(f"Decode through the engine ({args.model}, bf16 weights, {args.kv_gb:g} GiB of KV for every codec; "
                      "roofline = (weights + the codec's KV bytes) / copy bandwidth):\n\n" + md_table(rows, list(rows[0])))
        base = next((p for p in payload["max_batch"] if p["codec"] == codecs[0] and "tok_s" in p), None)
        mrows = [{"codec": p["codec"], "context": p["context"], "max batch": p["batch"],
                  "tok/s": f"{p['tok_s']:.1f}" if "tok_s" in p else p.get("result", ""),
                  "% roofline": f"{p['pct_roofline']:.0f}" if "tok_s" in p else "",
                  f"seqs x {codecs[0]}": f"{p['batch'] / base['batch']:.2f}" if base else "",
                  f"throughput x {codecs[0]}": f"{p['tok_s'] / base['tok_s']:.2f}" if base and "tok_s" in p else ""}
                 for p in payload["max_batch"]]
        tables.append(f"Largest batch at {args.max_batch_context} tokens in the same memory:\n\n" + md_table(mrows, list(mrows[0])))

    table = f"copy bandwidth {bw / 1e12:.2f} TB/s (measured in this run)\n\n" + "\n\n".join(tables)
    print(table)
    j, m = write_results(args.name, payload, table, args.out)
    print(f"[kv] wrote {j} and {m}")


if __name__ == "__main__":
    main()
