"""How far bf16 logits land from the fp32 CPU reference path, per implementation, on the real
SmolLM2 GGUF: bitfold with Triton attention, bitfold with the PyTorch reference attention, and
transformers (sdpa and eager). Locates precision loss by swapping one component at a time."""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bitfold import LLM  # noqa: E402
from bitfold.loader import open_model  # noqa: E402
from bitfold.loader.default_model import default_model_path  # noqa: E402
from tests.helpers import rel_err  # noqa: E402
from tests.test_gpu_path import PROMPTS, _prefill_logits  # noqa: E402


def main():
    import transformers

    path = default_model_path()
    ref = _prefill_logits(LLM(path, device="cpu", kv_cache_memory_gb=0.5))
    rows = {}
    for backend in ("triton", "torch"):
        llm = LLM(path, device="cuda", dtype="bfloat16", attention_backend=backend, gpu_memory_utilization=0.3)
        rows[f"bitfold bf16 {backend} attention"] = [rel_err(g.float(), c) for g, c in zip(_prefill_logits(llm), ref)]
        del llm
    folder, name = os.path.split(path)
    tokenizer = open_model(path).load_tokenizer()
    prompt_ids = [tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS]
    for impl in ("sdpa", "eager"):
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.bfloat16,
                                                               attn_implementation=impl).cuda()
        errs = []
        for ids, c in zip(prompt_ids, ref):
            with torch.no_grad():
                errs.append(rel_err(hf(torch.tensor([ids], device="cuda")).logits[0].float().cpu(), c))
        rows[f"transformers bf16 {impl}"] = errs
        del hf
    for k, v in rows.items():
        print(f"{k:36s}", " ".join(f"{e:.4f}" for e in v), f"mean {sum(v) / len(v):.4f}")


if __name__ == "__main__":
    main()
