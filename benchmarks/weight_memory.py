"""Weight memory of a model as a device would hold it, beside its file: every parameter and buffer
of the built model (the rotary table aside), per weight format, and how the embedding is held
(a float table, the tied head's codes, or its own table of codes).

`--layouts gpu` builds the GPU layouts (GGUF blocks kept native, low-bit planes) on the CPU in
bf16, as tests do (no kernel runs while loading), so the bytes a GPU would hold are counted on a
machine without one; `cpu` counts the CPU layouts (LUT packing) in float32.

    python benchmarks/weight_memory.py --model qwen.gguf --weights auto --layouts gpu,cpu
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports Triton: nothing runs on a GPU here
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import environment, md_table, write_results  # noqa: E402

from bitfold import LLM  # noqa: E402
from bitfold.weights.base import WeightFormat  # noqa: E402


def embedding_storage(model) -> str:
    """How the embedding is held: "float" (a table of the compute dtype), "head" (it reads the tied
    output layer's codes) or the format of its own table of codes."""
    emb = model.embed
    if emb.weight.numel():
        return "float"
    return "head" if emb.table is model.lm_head else emb.table.fmt.name


def held_bytes(model) -> tuple[int, int]:
    """(all weights, the embedding's) in bytes: parameters and buffers but the rotary table."""
    items = [*model.named_parameters(), *model.named_buffers()]
    total = sum(t.numel() * t.element_size() for n, t in items if n != "rope")
    emb = sum(t.numel() * t.element_size() for n, t in items if n.startswith("embed."))
    return total, emb


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model path (default: the embedded SmolLM2)")
    ap.add_argument("--weights", default="auto", help="comma-separated weight formats (EngineConfig.weights)")
    ap.add_argument("--layouts", default="gpu,cpu", help="gpu (built on the CPU), cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from bitfold.loader.default_model import default_model_path

    path = args.model or default_model_path()
    file_bytes = os.path.getsize(path) if os.path.isfile(path) else sum(
        os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith((".safetensors", ".gguf")))
    rows = []
    real = WeightFormat.__dict__["gpu_storage"]  # the staticmethod itself (the attribute is its function)
    for layout in args.layouts.split(","):
        for fmt in args.weights.split(","):
            WeightFormat.gpu_storage = staticmethod(lambda d: True) if layout == "gpu" else real
            try:
                t0 = time.perf_counter()
                dtype = "bfloat16" if layout == "gpu" else "float32"  # what each device computes in by default
                llm = LLM(path, device="cpu", dtype=dtype, kv_cache_memory_gb=0.01, weights=fmt, max_model_len=64)
                model = llm.engine.runner.model
                total, emb = held_bytes(model)
                kinds = Counter(type(m.fmt).__name__ for m in model.modules() if hasattr(m, "fmt"))
                rows.append({"layouts": layout, "weights": fmt, "held_MB": round(total / 1e6, 1),
                             "file_MB": round(file_bytes / 1e6, 1), "pct_of_file": round(100 * total / file_bytes, 1),
                             "embedding_MB": round(emb / 1e6, 1), "embedding": embedding_storage(model), "dtype": dtype, "linear_formats": dict(kinds),
                             "load_s": round(time.perf_counter() - t0, 1)})
                print(f"[memory] {layout} {fmt}: {total / 1e6:.1f} MB held = {100 * total / file_bytes:.1f}% of the "
                      f"{file_bytes / 1e6:.1f} MB file", flush=True)
                del llm, model
            finally:
                WeightFormat.gpu_storage = real
    table = md_table(rows, ["layouts", "weights", "held_MB", "file_MB", "pct_of_file", "embedding_MB", "embedding",
                            "load_s"])
    print(table)
    name = os.path.splitext(os.path.basename(path.rstrip("/")))[0].lower()
    write_results(f"weight-memory-{name}", {"environment": environment(), "model": path, "rows": rows},
                  f"{os.path.basename(path)}: weights held per layout and format (GPU layouts built on the CPU)\n\n"
                  + table, out_dir=args.out)


if __name__ == "__main__":
    main()
