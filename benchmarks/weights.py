"""Low-bit weights on the GPU (issue #12): kernel time and achieved bandwidth per format on the
llama3-8b layer shapes, and end-to-end decode and 4K-token prefill per format through the
engine, each beside bf16 and beside its roofline from the measured copy bandwidth.

1. Kernels (random codes and scales built on the GPU): every format x layer (q|k|v, o, gate|up,
   down, lm_head) x rows (1, 4, 16, 64, 256), `qmatmul` with its default strategy for the row
   count and, where there is a choice, the alternatives (register GEMV vs skinny tl.dot at 1-4
   rows, tl.dot GEMM vs dequantize + cuBLAS at 64-256 rows); bf16 beside it with cuBLAS
   (`F.linear`) and, at <= 16 rows, the dense Triton GEMV. Each kernel is first checked against
   its reference (`qmatmul_ref`, float32) on the GPU; a mismatch is recorded and the point is
   not timed. Times are CUDA-graph replays (`common.graph_time`); bandwidth counts the weight's
   bytes (codes and scales) plus activations in and out. Unless --quick, a small launch-config
   sweep of int4-g128 at 1, 16 and 64 rows says whether the launch tables are right.
2. End to end (random weights of llama3-8b's shape, built on the GPU layer by layer, quantized
   at load by the format; `q4_k_m` = GGUF blocks as llama.cpp's Q4_K_M lays them out: Q6_K for
   attn_v, every other ffn_down and the output, Q4_K elsewhere, kept native): decode tok/s at
   batch 1, 16 and 64 (512-token contexts, random K/V; the engine's own loop with async
   scheduling and CUDA graphs, as benchmarks/decode.py) and one 4096-token prefill chunk, each
   beside its roofline: bytes per step / copy bandwidth for decode, FLOPs / the measured bf16
   matmul rate for prefill.

    GIT_COMMIT=$(git rev-parse HEAD) python benchmarks/weights.py            # guards aim at < ~7.5 min
    GIT_COMMIT=$(git rev-parse HEAD) python benchmarks/weights.py --quick    # fewer formats, no sweep
    python benchmarks/weights.py --smoke --quick   # every code path on the CPU (interpreter), tiny shapes

Results: results/weights-<time>.json and .md, rewritten after every layer and every end-to-end
format, so a run cut short keeps what it measured. Time guards keep a run inside its budget:
past `--kernel-budget-s` no new layer starts, past `--budget-s` no new end-to-end format (the
end-to-end formats run in order of interest: bf16, int4-g128, q4_k_m first); skipped work is
listed in the results.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F

if "--smoke" in sys.argv:  # before anything imports Triton
    os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import RESULTS, environment, graph_time, md_table  # noqa: E402
from decode import bitfold_decode, bitfold_prefill, copy_bandwidth, kv_bytes_per_token, matmul_rate  # noqa: E402

from bitfold.config import EngineConfig, ModelConfig  # noqa: E402
from bitfold.engine import LLMEngine  # noqa: E402
from bitfold.kernels import qmatmul as qm  # noqa: E402
from bitfold.kernels.gemv import gemv  # noqa: E402
from bitfold.loader.source import ModelSource  # noqa: E402
from bitfold.weights.lowbit import gpu_layout, lowbit_spec  # noqa: E402

LAYERS = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}
LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                 num_kv_heads=8, head_dim=128, rope_theta=500000.0)
ROWS = [1, 4, 16, 64, 256]
KERNEL_FORMATS = ["int4-g128", "int8", "int4-g32", "int3-g128", "int2-g128", "q4_k", "q6_k", "q4_0", "q8_0",
                  "nf4-g64", "int4-g64"]
QUICK_KERNEL_FORMATS = ["int4-g128", "int8", "int3-g128", "int2-g128", "q4_k"]
E2E_FORMATS = ["bf16", "int4-g128", "q4_k_m", "int8", "int2-g128", "int3-g128", "nf4"]
QUICK_E2E_FORMATS = ["bf16", "int4-g128", "q4_k_m"]
GGUF_TYPES = {"q4_0": "Q4_0", "q8_0": "Q8_0", "q4_k": "Q4_K", "q6_k": "Q6_K", "q2_k": "Q2_K", "q3_k": "Q3_K",
              "q5_k": "Q5_K"}
CHECK_TOL = 2e-2  # relative error vs the float32 reference: bf16 activations and output
DEV, DTYPE = "cuda", torch.bfloat16  # --smoke: the CPU, float32, Triton's interpreter, tiny shapes


def smoke_setup() -> None:
    """A CPU run of this script's every code path in seconds (tiny shapes, float32 through the
    Triton interpreter, timings meaningless): how it is tested without a GPU."""
    global DEV, DTYPE, ROWS
    from bitfold.weights.base import WeightFormat

    WeightFormat.gpu_storage = staticmethod(lambda device: True)  # the GPU layouts, interpreted
    DEV, DTYPE, ROWS = "cpu", torch.float32, [1, 4, 20]
    LAYERS.clear()
    LAYERS.update({"qkv": (96, 256), "down": (64, 512), "lm_head": (300, 256)})
    LLAMA3_8B.update(vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=64)


def timed(fns, reps: int) -> float:
    """Seconds per call: CUDA-graph replays on a GPU (common.graph_time), wall time on the CPU."""
    if DEV == "cuda":
        return graph_time(fns, reps)
    t0 = time.perf_counter()
    for _ in range(2):
        for f in fns:
            f()
    return (time.perf_counter() - t0) / (2 * len(fns))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


# ---- weights built on the GPU -----------------------------------------------------------------

def random_gguf_raw(qtype_name: str, n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """Random blocks of a GGUF type [n, bytes per row] on the GPU, with small finite fp16 scales
    (every code and packed sub-scale byte random)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

    qtype = getattr(Q, qtype_name)
    block, size = GGML_QUANT_SIZES[qtype]
    raw = torch.randint(0, 256, (n * k // block, size), dtype=torch.uint8, device=DEV, generator=gen)
    # byte offsets of the fp16 d (and dmin) fields: ggml-common.h (see weights/gguf_blocks.py)
    fields = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,), "Q2_K": (80, 82),
              "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}[qtype_name]
    d = (torch.rand(raw.shape[0], device=DEV, generator=gen) * 1e-3 + 1e-4).half().view(torch.uint8)
    for off in fields:
        raw[:, off:off + 2] = d.view(-1, 2)
    return raw.view(n, -1)


def random_qweight(fmt: str, n: int, k: int, gen: torch.Generator) -> qm.QWeight:
    if fmt in GGUF_TYPES:
        from gguf import GGMLQuantizationType as Q

        from bitfold.weights.gguf_blocks import native

        return native(random_gguf_raw(GGUF_TYPES[fmt], n, k, gen), getattr(Q, GGUF_TYPES[fmt]))
    spec = lowbit_spec(fmt)
    lay = gpu_layout(spec)
    kp = lay.padded(k)
    q = torch.randint(0, 2**spec.bits, (n, kp), dtype=torch.uint8, device=DEV, generator=gen)
    groups = kp // lay.group if lay.group else 1
    s = (torch.rand(n, groups, device=DEV, generator=gen) * 2e-3 + 1e-4).half()
    m = None if spec.symmetric else (-s.float() * (2**spec.bits - 1) / 2).half()
    return qm.QWeight(lay, n, k, qm.pack_codes(q, lay.planes), s, m)


# ---- 1. kernels -------------------------------------------------------------------------------

# pseudo-kinds: qmatmul arguments
KIND_ARGS = {"dp4a_fx": {"kind": "dp4a", "fuse_x": True}, "dp4a": {"kind": "dp4a", "fuse_x": False}}


def kernel_points(fmt: str, layer: str, qw: qm.QWeight, bw: float, reps: int, gen: torch.Generator) -> list[dict]:
    n, k = qw.n, qw.k
    x_all = torch.randn(max(ROWS), k, device=DEV, dtype=DTYPE, generator=gen)
    ref_all = F.linear(x_all.float(), qm.dequantize_ref(qw))  # float32 reference, checked first
    rows = []
    for M in ROWS:
        x = x_all[:M].contiguous()
        kinds = [qm.strategy(M)]
        if M <= qm.GEMV_MAX_ROWS:
            kinds.append("gemm")  # the skinny tl.dot path
        if M <= 16 and qm.dp4a_supported(qw):
            kinds += [k for k in ("dp4a", "dp4a_fx") if k not in kinds]  # int8 activations; _fx: quantized in the GEMV
        if M <= 16 and qm.tc_supported(qw):
            kinds.append("tc")  # 4-bit codes as float16 magic pairs on tensor cores (not yet a default)
        elif M >= 64:
            kinds += [kd for kd in ("gemm", "dequant") if kd not in kinds]
        for kind in kinds:
            point = {"format": fmt, "layer": layer, "N": n, "K": k, "rows": M, "kernel": kind,
                     "default": kind == kinds[0], "weight_MB": round(qw.nbytes / 1e6, 2)}
            try:
                kw = KIND_ARGS.get(kind, {"kind": kind})
                err = rel_err(qm.qmatmul(x, qw, **kw), ref_all[:M])
                point["check_rel_err"] = float(f"{err:.2e}")
                if not err < CHECK_TOL:
                    point["error"] = f"check failed: rel err {err:.3g} >= {CHECK_TOL}"
                    rows.append(point)
                    continue
                out = torch.empty(M, n, device=DEV, dtype=DTYPE)
                t = timed([lambda: qm.qmatmul(x, qw, **kw, out=out)], reps)
            except Exception as e:  # recorded, the run goes on
                point["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                rows.append(point)
                continue
            moved = qw.nbytes + 2 * M * (k + n)
            point.update(us=round(t * 1e6, 2), GBps=round(moved / t / 1e9, 1), pct_copy_bw=round(100 * moved / t / bw, 1))
            rows.append(point)
    return rows


NF4_CONFIGS = [(16, 256, 4), (8, 512, 4), (32, 256, 8), (16, 1024, 8)]  # cb4 GEMV launch configs timed at <= 4 rows


def codebook_points(fmt: str, layer: str, n: int, k: int, bw: float, reps: int, gen: torch.Generator) -> list[dict]:
    """nf4-gG: the 4-bit codebook kernels (kernels/codebook.py, a lookup per code) beside the
    int4 dequant kernel of the same bytes (`int4-gG`, the format table's row): the default path
    per row count, and at <= 4 rows each GEMV config of NF4_CONFIGS."""
    from bitfold.kernels import codebook as cbk
    from bitfold.weights.nf4 import NF4

    group = int(fmt.rsplit("-g", 1)[1]) if "-g" in fmt else 64
    words = torch.randint(-2**31, 2**31 - 1, (n, k // 8), device=DEV, dtype=torch.int32, generator=gen)
    scales = (torch.rand(n, k // group, device=DEV, generator=gen) * 0.02 + 1e-3).half()
    table = torch.tensor(NF4, device=DEV)
    nbytes = words.numel() * 4 + scales.numel() * 2
    x_all = torch.randn(max(ROWS), k, device=DEV, dtype=DTYPE, generator=gen)
    ref_all = cbk.cb4_matmul_ref(x_all.float(), words, scales, table, group)
    rows = []
    for M in ROWS:
        x = x_all[:M].contiguous()
        jobs = [("gemv", c) for c in NF4_CONFIGS] if M <= cbk.GEMV_MAX_ROWS else []
        jobs.append(("dequant", None))
        for kind, cfg in jobs:
            point = {"format": fmt, "layer": layer, "N": n, "K": k, "rows": M, "kernel": kind,
                     "config": list(cfg) if cfg else None, "weight_MB": round(nbytes / 1e6, 2),
                     "default": kind == ("gemv" if M <= cbk.GEMV_MAX_ROWS else "dequant")
                     and (cfg is None or tuple(cfg) == cbk.GEMV_CONFIG)}
            try:
                fn = lambda: cbk.cb4_matmul(x, words, scales, table, group, kind=kind, config=cfg)  # noqa: E731
                err = rel_err(fn(), ref_all[:M])
                point["check_rel_err"] = float(f"{err:.2e}")
                if not err < CHECK_TOL:
                    point["error"] = f"check failed: rel err {err:.3g} >= {CHECK_TOL}"
                else:
                    t = timed([fn], reps)
                    moved = nbytes + 2 * M * (k + n)
                    point.update(us=round(t * 1e6, 2), GBps=round(moved / t / 1e9, 1),
                                 pct_copy_bw=round(100 * moved / t / bw, 1))
            except Exception as e:
                point["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            rows.append(point)
    return rows


def bf16_points(layer: str, w: torch.Tensor, bw: float, reps: int, gen: torch.Generator) -> list[dict]:
    n, k = w.shape
    out = []
    for M in ROWS:
        x = torch.randn(M, k, device=DEV, dtype=DTYPE, generator=gen)
        fns = {"cublas": lambda: F.linear(x, w)}
        if M <= 16:
            fns["triton_gemv"] = lambda: gemv(x, w)
        for kind, fn in fns.items():
            t = timed([fn], reps)
            moved = w.numel() * 2 + 2 * M * (k + n)
            out.append({"format": "bf16", "layer": layer, "N": n, "K": k, "rows": M, "kernel": kind,
                        "default": kind == ("triton_gemv" if M <= 16 else "cublas"),
                        "weight_MB": round(w.numel() * 2 / 1e6, 2), "us": round(t * 1e6, 2),
                        "GBps": round(moved / t / 1e9, 1), "pct_copy_bw": round(100 * moved / t / bw, 1)})
    return out


GEMV_SWEEP = [(1, bn, bk, wp, st) for bn in (2, 4, 8, 16) for bk in (1024, 2048, 4096) for wp in (4, 8)
              for st in (1,)]


def sweep(bw: float, reps: int, gen: torch.Generator, formats=("int4-g128",), layers=("gate_up", "o"),
          rows=(1, 16, 64), on_layer=None, kinds=None) -> list[dict]:
    """Launch configurations per format at 1 (the register GEMV's grid), 16 and 64 rows on
    gate|up (wide) and o (square) by default."""
    grid = {1: ("gemv", GEMV_SWEEP),
            4: ("gemv", [(4, bn, bk, wp, st) for bn in (2, 4, 8) for bk in (512, 1024, 2048) for wp in (4, 8)
                         for st in (1,)]),
            16: ("gemm", [(16, bn, bk, wp, st) for bn, bk, wp, st in ((64, 128, 4, 3), (32, 256, 4, 3),
                                                                      (128, 128, 4, 3), (64, 256, 4, 4))]),
            64: ("gemm", [(64, 64, 64, 8, 3), (64, 128, 64, 8, 3), (128, 128, 32, 8, 3), (64, 64, 128, 4, 3)])}
    grid = {m: v for m, v in grid.items() if m in rows}
    DP4A = {1: [(1, bn, bk, wp, 1) for bn in (4, 8, 16) for bk in (2048, 4096) for wp in (4, 8)],
            4: [(4, bn, bk, 4, 1) for bn in (4, 8, 16) for bk in (512, 1024, 2048)],
            16: [(16, bn, bk, 4, 1) for bn in (2, 4, 8) for bk in (256, 512, 1024)] + [(8, 8, 512, 4, 1)]}
    TC = [(16, 256, 128, 8, 2), (16, 256, 128, 8, 1), (16, 128, 128, 8, 1), (16, 512, 128, 16, 1),
          (16, 512, 128, 8, 2), (16, 64, 128, 4, 3), (16, 128, 128, 4, 2)]  # kind "tc", if the format has it
    out = []
    for layer, fmt in [(lay, f) for lay in layers if lay in LAYERS for f in formats] or [(list(LAYERS)[0], formats[0])]:
        n, k = LAYERS[layer]
        qw = random_qweight(fmt, n, k, gen)
        jobs = list(grid.items())
        if qm.tc_supported(qw):
            jobs += [(M, ("tc", TC)) for M in (1, 16) if M in rows]
        if qm.dp4a_supported(qw):
            jobs += [(M, ("dp4a", DP4A[M])) for M in DP4A if M in rows]
            # 32-64-row slabs (each program quantizes all of x itself, more rows amortize it) ran
            # 25-170% slower than 8-row ones on the H200 (weights-20261204-204219): not swept
            wide = [(1, 16, 2048, 4, 1), (1, 16, 4096, 8, 1)]
            jobs += [(M, ("dp4a_fx", DP4A[M] + wide * (M == 1)))
                     for M in DP4A if M in rows]
        if kinds:
            jobs = [j for j in jobs if j[1][0] in kinds]
        for M, (kind, configs) in jobs:
            x = torch.randn(M, k, device=DEV, dtype=DTYPE, generator=gen)
            ref = qm.qmatmul_ref(x, qw).float()
            for cfg in configs:
                p = {"format": fmt, "layer": layer, "rows": M, "kernel": kind, "config": list(cfg),
                     "default": cfg == qm.default_config(M, kind, qw.layout)}
                try:
                    kw = KIND_ARGS.get(kind, {"kind": kind})
                    err = rel_err(qm.qmatmul(x, qw, **kw, config=cfg), ref)
                    if not err < CHECK_TOL:
                        p["error"] = f"check failed: rel err {err:.3g}"
                    else:
                        t = timed([lambda: qm.qmatmul(x, qw, **kw, config=cfg)], reps)
                        moved = qw.nbytes + 2 * M * (k + n)
                        p.update(us=round(t * 1e6, 2), pct_copy_bw=round(100 * moved / t / bw, 1))
                except Exception as e:
                    p["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                out.append(p)
        del qw
        if on_layer is not None:
            on_layer(out)
    return out


# ---- 2. end to end ----------------------------------------------------------------------------

def model_config(max_len: int) -> ModelConfig:
    return ModelConfig(architecture="LlamaForCausalLM", max_position_embeddings=max_len, **LLAMA3_8B)


def random_source(fmt: str, mc: ModelConfig) -> ModelSource:
    """Random weights of mc's shape, generated on the GPU one tensor at a time (never a whole bf16
    copy beside the quantized one); for q4_k_m, GGUF blocks laid out as llama.cpp's Q4_K_M."""
    from bitfold.weights.gguf_blocks import GGUFBlocks
    from gguf import GGMLQuantizationType as Q

    h, i, kvd = mc.hidden_size, mc.intermediate_size, mc.num_kv_heads * mc.head_dim
    shapes = {"model.embed_tokens.weight": (mc.vocab_size, h), "model.norm.weight": (h,),
              "lm_head.weight": (mc.vocab_size, h)}
    for layer in range(mc.num_layers):
        p = f"model.layers.{layer}."
        shapes.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kvd, h),
                       p + "self_attn.v_proj.weight": (kvd, h), p + "self_attn.o_proj.weight": (h, h),
                       p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                       p + "mlp.down_proj.weight": (h, i), p + "input_layernorm.weight": (h,),
                       p + "post_attention_layernorm.weight": (h,)})

    def q4_k_m_type(name: str) -> str:
        if name == "lm_head.weight" or name.endswith("v_proj.weight"):
            return "Q6_K"
        if name.endswith("down_proj.weight") and int(name.split(".")[2]) % 2 == 0:
            return "Q6_K"
        return "Q4_K"

    def weights():
        gen = torch.Generator(device=DEV).manual_seed(0)
        for name, shape in shapes.items():
            if len(shape) == 1:
                yield name, torch.ones(shape, device=DEV, dtype=DTYPE)
            elif fmt == "q4_k_m":
                qtype = q4_k_m_type(name)
                yield name, GGUFBlocks(random_gguf_raw(qtype, *shape, gen), getattr(Q, qtype), f"random:{name}")
            else:
                yield name, torch.randn(shape, device=DEV, dtype=DTYPE, generator=gen) * 0.02

    gguf = fmt == "q4_k_m"
    return ModelSource(path=f"random:llama3-8b:{fmt}", format="gguf" if gguf else "random", config=mc,
                       weights=weights, load_tokenizer=None, max_context=mc.max_position_embeddings,
                       weight_format="gguf" if gguf else None, stored_formats=("int4-g32", "int6-g16") if gguf else ())


def model_bytes(model) -> int:
    """Bytes a decode step reads: every parameter and buffer but the embedding and rotary table."""
    return sum(t.numel() * t.element_size() for n, t in [*model.named_parameters(), *model.named_buffers()]
               if not n.startswith("embed.") and n != "rope")


# "<format>+<variant>" end to end: a module switch set for the run ((module,) name, value; the
# module defaults to qmatmul), or EngineConfig fields (E2E_CONFIG)
E2E_VARIANTS = {"fx": ("DP4A_FUSE_X", True), "sep": ("DP4A_FUSE_X", False), "act": ("DP4A_FUSE_ACT", True),
                "noact": ("DP4A_FUSE_ACT", False), "g16": ("DP4A_G16", True),
                "rope": ("bitfold.kvcache.codecs.dense", "FUSE_ROTARY", True)}
E2E_CONFIG = {"float": {"int8_activations": "off"}, "nopdl": {"pdl": "off"}, "pdl": {"pdl": "on"},
              "i8act": {"int8_activations": "on"}}  # i8act: int8 activations for 8-bit weights too


MATMUL_KERNELS = ("gemv", "gemm", "dp4a", "cutlass", "xmma", "nvjet", "gemmk")  # name fragments
PROFILES: list[dict] = []  # step_kernels() of every end-to-end format, for the report


def step_kernels(eng, fmt: str, B: int, ctx: int, step_s: float) -> dict:
    """Where one decode step's GPU time goes (torch.profiler over CUDA graph replays): per kernel
    ms per step, the matmul kernels' sum, and the rest of the step (other kernels + GPU idle)."""
    from profile_decode import kernel_profile

    per = kernel_profile(eng, B, ctx)
    mm = sum(v for k, v in per.items() if any(f in k.lower() for f in MATMUL_KERNELS))
    out = {"format": fmt, "batch": B, "step_ms": round(step_s * 1e3, 3), "kernel_ms": round(sum(per.values()), 3),
           "matmul_ms": round(mm, 3), "non_matmul_ms": round(step_s * 1e3 - mm, 3),
           "pdl": eng.runner.graphs is not None and B <= eng.runner.graphs.pdl_rows,
           "kernels": sorted(([k, round(v, 4)] for k, v in per.items()), key=lambda kv: -kv[1])}
    print(f"[bench] {fmt} batch {B}: step {out['step_ms']} ms, matmul kernels {out['matmul_ms']} ms, "
          f"non-matmul {out['non_matmul_ms']} ms", flush=True)
    return out


def e2e(fmt: str, args, bw: float, mm_rate: float) -> list[dict]:
    """One format end to end; "<format>+<variant>" (E2E_VARIANTS, E2E_CONFIG) runs it with float activations
    in the low-bit GEMV (+float), the activations quantized inside the dp4a GEMV or by a kernel of
    their own (+fx / +sep), SiLU-and-multiply inside the down projection's GEMV or not (+act /
    +noact), groups of 16 (Q6_K) through dp4a (+g16), without / with programmatic dependent
    launch (+nopdl / +pdl; the default is EngineConfig.pdl's auto), rotary inside the decode
    attention kernel (+rope), or int8 activations for 8-bit weights too (+i8act)."""
    base, _, variant = fmt.partition("+")
    if variant and variant not in E2E_VARIANTS and variant not in E2E_CONFIG:
        raise SystemExit(f"unknown end-to-end variant {fmt!r}: expected <format>"
                         f"[+{'|+'.join([*E2E_VARIANTS, *E2E_CONFIG])}]")
    switch = E2E_VARIANTS.get(variant)
    if switch is not None:
        import importlib

        *mod, name, value = switch
        mod = importlib.import_module(mod[0]) if mod else qm
        old, n_prof = getattr(mod, name), len(PROFILES)
        setattr(mod, name, value)
        try:
            rows = e2e(base, args, bw, mm_rate)
        finally:
            setattr(mod, name, old)
        for r in rows + PROFILES[n_prof:]:
            r["format"] = fmt
        return rows
    mc = model_config(args.prefill + 256)
    weights = {"bf16": "dense", "q4_k_m": "auto"}.get(base, base)
    cfg = EngineConfig(device=DEV, dtype="bfloat16", weights=weights, **E2E_CONFIG.get(variant, {}),
                       max_model_len=mc.max_position_embeddings, max_num_seqs=max(args.batches), max_num_batched_tokens=args.prefill,
                       gpu_memory_utilization=0.85, kv_cache_memory_gb=None if DEV == "cuda" else 0.05)
    t0 = time.perf_counter()
    eng = LLMEngine(cfg, source=random_source(base, mc))
    load_s = time.perf_counter() - t0
    for storage in eng.runner.kv_caches:  # random K/V: timings on zeros can mislead
        for t in storage:
            t.normal_()
    model = eng.runner.model
    wbytes = model_bytes(model)
    kv_tok = kv_bytes_per_token(mc, DTYPE)
    rows = []
    for B in args.batches:
        step = bitfold_decode(eng, B, args.context, args.steps, args.warmup)
        if B in args.profile_batches and DEV == "cuda":
            PROFILES.append(step_kernels(eng, fmt, B, args.context, step))
        roof = B / ((wbytes + B * args.context * kv_tok) / bw)
        rows.append({"format": fmt, "what": f"decode batch {B}", "tok_s": round(B / step, 1),
                     "roofline_tok_s": round(roof, 1), "pct_roofline": round(100 * B / step / roof, 1),
                     "weight_GB": round(wbytes / 1e9, 3), "load_s": round(load_s, 1)})
        print(f"[bench] {fmt} decode batch {B}: {B / step:.1f} tok/s (roofline {roof:.0f})", flush=True)
    t = bitfold_prefill(eng, args.prefill)
    n, lin = args.prefill, mc.num_layers * (2 * mc.hidden_size * (mc.hidden_size + mc.num_kv_heads * mc.head_dim)
                                            + 3 * mc.hidden_size * mc.intermediate_size)
    flops = 2 * n * lin + 2 * n * n * mc.num_heads * mc.head_dim * mc.num_layers  # causal attention: half of 4 n^2 d
    rows.append({"format": fmt, "what": f"prefill {n}", "tok_s": round(n / t, 1),
                 "roofline_tok_s": round(n / (flops / mm_rate), 1), "pct_roofline": round(100 * flops / mm_rate / t, 1),
                 "weight_GB": round(wbytes / 1e9, 3), "load_s": round(load_s, 1), "ms": round(t * 1e3, 1)})
    print(f"[bench] {fmt} prefill {n}: {t * 1e3:.1f} ms", flush=True)
    del eng, model
    gc.collect()
    torch.cuda.empty_cache()
    return rows


# ---- report -----------------------------------------------------------------------------------

def report(payload: dict) -> str:
    env = payload
    parts = [f"{payload['environment']['device']}, copy bandwidth {env['copy_bandwidth_Bps'] / 1e9:.0f} GB/s, bf16 matmul "
             f"{env['matmul_flops'] / 1e12:.0f} TFLOP/s\n"]
    k = payload.get("kernels", [])
    if k:
        best_bf16 = {}
        for p in k:
            if p["format"] == "bf16" and "us" in p:
                key = (p["layer"], p["rows"])
                best_bf16[key] = min(best_bf16.get(key, 1e30), p["us"])
        table = []
        for p in k:
            if p["format"] == "bf16" and not p["default"]:
                continue
            r = {kk: p.get(kk, "") for kk in ("format", "layer", "rows", "kernel", "config", "us", "GBps", "pct_copy_bw")}
            if "us" in p and p["format"] != "bf16":
                r["x bf16"] = round(best_bf16.get((p["layer"], p["rows"]), float("nan")) / p["us"], 2)
            r["check"] = p.get("error", p.get("check_rel_err", ""))
            table.append(r)
        parts.append("## Kernels (llama3-8b layers; `x bf16` = best bf16 kernel's time / this one's)\n\n"
                     + md_table(table, ["format", "layer", "rows", "kernel", "config", "us", "GBps", "pct_copy_bw", "x bf16", "check"]))
    if payload.get("sweep"):
        best: dict = {}
        for p in payload["sweep"]:
            key = (p.get("format"), p["layer"], p["rows"])
            if "us" in p and (key not in best or p["us"] < best[key]["us"]):
                best[key] = p
        default = {(p.get("format"), p["layer"], p["rows"]): p for p in payload["sweep"] if p.get("default") and "us" in p}
        rows = [dict(best[k], default_us=default[k]["us"] if k in default else "") for k in best]
        parts.append("## Launch configurations: the fastest per format, layer and rows (beside the default's time)\n\n"
                     + md_table(rows, ["format", "layer", "rows", "kernel", "config", "us", "pct_copy_bw", "default_us"]))
        parts.append("## Every launch configuration\n\n" + md_table(
            payload["sweep"], ["format", "layer", "rows", "kernel", "config", "default", "us", "pct_copy_bw", "error"]))
    if payload.get("e2e"):
        bf = {r["what"]: r.get("tok_s") for r in payload["e2e"] if r["format"] == "bf16"}
        for r in payload["e2e"]:
            if bf.get(r["what"]) and r.get("tok_s"):
                r["x bf16"] = round(r["tok_s"] / bf[r["what"]], 2)
        parts.append("## End to end (llama3-8b shape, random weights, bf16 activations; decode at 512-token contexts)\n\n"
                     + md_table(payload["e2e"], ["format", "what", "tok_s", "x bf16", "roofline_tok_s", "pct_roofline",
                                                 "weight_GB", "load_s"]))
    for p in payload.get("profiles", []):
        parts.append(f"### {p['format']} batch {p['batch']}: step {p['step_ms']} ms = matmul kernels {p['matmul_ms']} ms "
                     f"+ everything else {p['non_matmul_ms']} ms (other kernels and GPU idle)"
                     + (" — with PDL kernels overlap and their times include waiting for the one before: only the "
                        "no-PDL split is meaningful" if p.get("pdl") else "") + "\n\n"
                     + md_table([{"ms/step": v, "kernel": f"`{k}`"} for k, v in p["kernels"][:14]], ["ms/step", "kernel"]))
    if payload.get("skipped"):
        parts.append("Skipped: " + "; ".join(payload["skipped"]))
    return "\n\n".join(parts)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer formats, no launch-config sweep")
    ap.add_argument("--formats", default=None, help="kernel formats (comma-separated; '' for none)")
    ap.add_argument("--e2e-formats", default=None, help="end-to-end formats (comma-separated; '' for none)")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--profile-batches", default="1", help="end-to-end batches whose step is profiled per kernel ('' for none)")
    ap.add_argument("--prefill", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--reps", type=int, default=20, help="kernel calls per CUDA graph replay")
    ap.add_argument("--kernel-budget-s", type=float, default=150, help="start no new kernel layer past this")
    ap.add_argument("--budget-s", type=float, default=380, help="start no new end-to-end format past this")
    ap.add_argument("--sweep-only", default=None, metavar="FORMATS",
                    help="only the launch-config sweep, for these formats (comma-separated), e.g. int4-g128,q4_k")
    ap.add_argument("--sweep-layers", default="gate_up,o")
    ap.add_argument("--sweep-rows", default="1,16,64")
    ap.add_argument("--sweep-kinds", default=None, help="only these kernels' configurations (gemv,gemm,tc)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true", help="CPU smoke test of the script (tiny shapes, interpreter)")
    args = ap.parse_args()
    if args.smoke:
        smoke_setup()
        args.prefill, args.context, args.steps, args.warmup, args.reps = 64, 32, 2, 1, 1
        args.batches = "1,4"
    elif not torch.cuda.is_available():
        sys.exit("benchmarks/weights.py needs a CUDA GPU (or --smoke)")
    start = time.perf_counter()
    args.batches = [int(b) for b in args.batches.split(",")]
    args.profile_batches = [int(b) for b in args.profile_batches.split(",") if b]
    kformats = ([f for f in args.formats.split(",") if f] if args.formats is not None
                else (QUICK_KERNEL_FORMATS if args.quick else KERNEL_FORMATS))  # '' for none
    eformats = ([f for f in args.e2e_formats.split(",") if f] if args.e2e_formats is not None
                else (QUICK_E2E_FORMATS if args.quick else E2E_FORMATS))
    if args.quick:
        args.batches = [b for b in args.batches if b <= 16] or [1]
    dev = torch.device(DEV)
    bw, mm = copy_bandwidth(dev), matmul_rate(dev, DTYPE)
    payload = {"environment": environment(), "args": {k: v for k, v in vars(args).items()}, "copy_bandwidth_Bps": bw,
               "matmul_flops": mm, "kernels": [], "sweep": [], "e2e": [], "skipped": [], "profiles": PROFILES}
    print(f"[bench] copy bandwidth {bw / 1e9:.0f} GB/s, bf16 matmul {mm / 1e12:.0f} TFLOP/s", flush=True)
    gen = torch.Generator(device=DEV).manual_seed(0)

    base = os.path.join(args.out or RESULTS, "weights-" + time.strftime("%Y%m%d-%H%M%S"))
    os.makedirs(os.path.dirname(base), exist_ok=True)

    def save():
        """results/weights-<start time>.json and .md, rewritten (common.write_results' header)."""
        payload["seconds"] = round(time.perf_counter() - start, 1)
        env = payload["environment"]
        with open(base + ".json", "w") as f:
            json.dump(payload, f, indent=1)
        with open(base + ".md", "w") as f:
            f.write(f"# weights\n\n{env['date']} · {env['device']} · torch {env['torch']} · triton {env.get('triton')} · "
                    f"commit {env['git_commit'][:12]}\n\n`{env['command']}`\n\n" + report(payload) + "\n")
        return base + ".json", base + ".md"

    if args.sweep_only:
        payload["sweep"] = sweep(bw, args.reps, gen, args.sweep_only.split(","), args.sweep_layers.split(","),
                                 [int(r) for r in args.sweep_rows.split(",")],
                                 on_layer=lambda pts: (payload.__setitem__("sweep", pts), save()),
                                 kinds=args.sweep_kinds.split(",") if args.sweep_kinds else None)
        print(*save())
        return
    for layer, (n, k) in LAYERS.items() if kformats else ():
        if time.perf_counter() - start > args.kernel_budget_s:
            payload["skipped"].append(f"kernels of {layer} (past --kernel-budget-s {args.kernel_budget_s:.0f})")
            continue
        w = torch.randn(n, k, device=DEV, dtype=DTYPE, generator=gen) * 0.02
        payload["kernels"] += bf16_points(layer, w, bw, args.reps, gen)
        for fmt in kformats:
            try:
                if fmt.startswith("nf4"):
                    payload["kernels"] += codebook_points(fmt, layer, n, k, bw, args.reps, gen)
                else:
                    qw = random_qweight(fmt, n, k, gen)
                    payload["kernels"] += kernel_points(fmt, layer, qw, bw, args.reps, gen)
            except Exception as e:
                payload["kernels"].append({"format": fmt, "layer": layer, "error": f"{type(e).__name__}: {e}"[:300]})
                traceback.print_exc()
            qw = None
            torch.cuda.empty_cache()
        del w
        save()
        print(f"[bench] kernels {layer} done at {time.perf_counter() - start:.0f}s", flush=True)
    if kformats and not args.quick and time.perf_counter() - start < args.kernel_budget_s + 30:
        payload["sweep"] = sweep(bw, args.reps, gen)
        print(f"[bench] sweep done at {time.perf_counter() - start:.0f}s", flush=True)
        save()
    gc.collect()
    torch.cuda.empty_cache()
    for fmt in eformats:
        if time.perf_counter() - start > args.budget_s:
            payload["skipped"].append(f"{fmt} end to end (past --budget-s {args.budget_s:.0f})")
            continue
        try:
            payload["e2e"] += e2e(fmt, args, bw, mm)
        except Exception as e:
            payload["e2e"].append({"format": fmt, "what": f"error: {type(e).__name__}: {str(e)[:200]}"})
            traceback.print_exc()
            gc.collect()
            torch.cuda.empty_cache()
        save()
    json_path, md_path = save()
    print(report(payload))
    print(f"[bench] wrote {json_path} and {md_path} in {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
