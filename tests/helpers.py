"""Shared test utilities: tiny random HF checkpoints written by transformers itself, and a
driver that runs bitfold's runner through the paged cache chunk by chunk."""
from __future__ import annotations

import torch

from bitfold.config import EngineConfig
from bitfold.core.block_pool import BlockPool
from bitfold.core.kv_manager import KVManager
from bitfold.core.request import Request
from bitfold.core.scheduler import ScheduledChunk
from bitfold.loader import open_model
from bitfold.runner.model_runner import ModelRunner
from bitfold.sampling import SamplingParams


def write_tiny_hf_model(kind: str, folder, seed: int = 0, shard: bool = False, **overrides):
    """Save a tiny random float32 model of `kind` (llama, mistral, qwen2, qwen3) with
    transformers' own save_pretrained; weights are re-drawn larger than HF's init so that
    every path (norm weights, biases) matters to the logits. Returns the HF model (eval)."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  rms_norm_eps=1e-5, tie_word_embeddings=False)
    common.update(overrides)
    cls_cfg, cls_model = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
    }[kind]
    cfg = cls_cfg(**common)
    cfg._attn_implementation = "eager"
    model = cls_model(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.08)
    model.save_pretrained(folder, safe_serialization=True, **({"max_shard_size": "200KB"} if shard else {}))
    return model


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


class PagedDriver:
    """Runs sequences through bitfold's ModelRunner by hand: chunks of chosen sizes, one step
    at a time, over a shuffled block pool (so block tables are not contiguous)."""

    def __init__(self, path: str, num_blocks: int = 64, block_size: int = 4, dtype=torch.float32,
                 weights: str = "dense"):
        src = open_model(str(path))
        cfg = EngineConfig(model=str(path), device="cpu", block_size=block_size, num_kv_blocks=num_blocks,
                           weights=weights)
        self.runner = ModelRunner(src, cfg, torch.device("cpu"), dtype, max_model_len=src.max_context)
        self.pool = BlockPool(num_blocks)
        g = torch.Generator().manual_seed(1)
        self.pool._free = type(self.pool._free)(torch.randperm(num_blocks, generator=g).tolist())
        self.kv = KVManager(self.pool, block_size)

    def new(self, ids: list[int]) -> Request:
        return Request(f"r{id(ids)}-{len(ids)}", list(ids), SamplingParams(temperature=0, max_tokens=1000))

    def step(self, work: list[tuple[Request, int]]) -> list[torch.Tensor]:
        """work: (request, number of its not-yet-computed tokens to run). Returns each chunk's
        logits for all its tokens."""
        chunks = []
        for req, n in work:
            assert self.kv.allocate_slots(req, n)
            chunks.append(ScheduledChunk(req, req.num_computed_tokens, n, list(self.kv.block_table(req))))
        logits = self.runner.forward_logits(chunks, all_tokens=True)
        out, off = [], 0
        for (req, n) in work:
            out.append(logits[off : off + n])
            off += n
            req.num_computed_tokens += n
        return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def gpt2_bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (openai/gpt-2 encoder.py), written out here as an
    independent reference for byte-level BPE vocabularies: printable bytes map to themselves,
    the others to code points from 256 on."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class fail_after:
    """`with fail_after(s):` raises TimeoutError in the main thread after `s` seconds (SIGALRM),
    so code that could hang (a loop waiting for an output that never comes) fails instead."""

    def __init__(self, seconds: int):
        self.seconds = seconds

    def __enter__(self):
        import signal

        def expire(signum, frame):
            raise TimeoutError(f"still running after {self.seconds}s")

        self.previous = signal.signal(signal.SIGALRM, expire)
        signal.alarm(self.seconds)
        return self

    def __exit__(self, *exc) -> None:
        import signal

        signal.alarm(0)
        signal.signal(signal.SIGALRM, self.previous)
