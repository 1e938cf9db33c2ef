"""The one object that owns device state: the model's weights, the KV pages, the attention
backend and the per-request sampling generators. It turns a SchedulerOutput into tensors,
runs the forward pass and samples."""
from __future__ import annotations

import logging
from dataclasses import replace

import torch

from bitfold.config import EngineConfig
from bitfold.core.scheduler import ScheduledChunk, SchedulerOutput
from bitfold.errors import BitfoldError
from bitfold.kvcache.codecs import KV_CODECS
from bitfold.kvcache.spec import KVCacheSpec
from bitfold.layers.attention import AttentionMetadata, select_backend
from bitfold.layers.sampler import sample
from bitfold.loader.source import ModelSource
from bitfold.models import MODELS
from bitfold.models.base import StepContext

log = logging.getLogger("bitfold")

DEFAULT_CPU_KV_GB = 2.0
DEFAULT_GPU_KV_FRACTION = 0.5  # of the memory free after loading the weights


class ModelRunner:
    def __init__(self, source: ModelSource, cfg: EngineConfig, device: torch.device, dtype: torch.dtype,
                 max_model_len: int):
        self.device, self.dtype, self.cfg = device, dtype, cfg
        model_cls = MODELS.get(source.config.architecture)
        self.model_config = replace(source.config, **model_cls.config_overrides)
        with torch.device(device):
            self.model = model_cls(self.model_config, dtype, max_positions=max_model_len)
        self.model.load_weights(source.weights(), source.path)
        self.model.eval()

        mc = self.model_config
        if cfg.kv_codec not in KV_CODECS:
            raise BitfoldError(f"unknown KV codec {cfg.kv_codec!r}; known: {', '.join(KV_CODECS.names())}")
        codec = KV_CODECS.get(cfg.kv_codec)(dtype)
        self.kv_spec = KVCacheSpec(mc.num_layers, mc.num_kv_heads, mc.head_dim, cfg.block_size, codec)
        self.num_blocks = cfg.num_kv_blocks or self.kv_spec.num_blocks_for(self._kv_budget_bytes())
        if self.num_blocks < 1:
            raise BitfoldError("the KV-cache budget is smaller than one block; raise --kv-cache-memory-gb")
        self.kv_caches = [codec.allocate(self.num_blocks, cfg.block_size, mc.num_kv_heads, mc.head_dim, device)
                          for _ in range(mc.num_layers)]
        self.backend = select_backend("auto", device, codec)
        self.generators: dict[str, torch.Generator] = {}
        log.info("KV cache: %d blocks x %d tokens = %d tokens (%.2f GiB, %s codec, %s attention)",
                 self.num_blocks, cfg.block_size, self.num_blocks * cfg.block_size,
                 self.num_blocks * self.kv_spec.page_size_bytes / 2**30, codec.name, self.backend.name)

    def _kv_budget_bytes(self) -> int:
        if self.cfg.kv_cache_memory_gb is not None:
            return int(self.cfg.kv_cache_memory_gb * 2**30)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return int(free * DEFAULT_GPU_KV_FRACTION)
        return int(DEFAULT_CPU_KV_GB * 2**30)

    def prepare(self, chunks: list[ScheduledChunk]) -> tuple[torch.Tensor, StepContext]:
        """Flatten the step's chunks into input_ids [T] and the attention metadata."""
        bs = self.cfg.block_size
        ids, pos, slots, ctx_lens, cu = [], [], [], [], [0]
        max_blocks = max(len(c.block_table) for c in chunks)
        tables = torch.zeros(len(chunks), max_blocks, dtype=torch.int32)
        for i, c in enumerate(chunks):
            ids.extend(c.token_ids)
            p = range(c.start, c.start + c.num_tokens)
            pos.extend(p)
            slots.extend(c.block_table[j // bs] * bs + j % bs for j in p)
            ctx_lens.append(c.start + c.num_tokens)
            cu.append(cu[-1] + c.num_tokens)
            tables[i, : len(c.block_table)] = torch.tensor(c.block_table, dtype=torch.int32)
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_tables=tables.to(dev),
            context_lens=torch.tensor(ctx_lens, dtype=torch.int32, device=dev),
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=dev),
            max_q_len=max(c.num_tokens for c in chunks),
        )
        ctx = StepContext(torch.tensor(pos, dtype=torch.int64, device=dev), meta, self.kv_caches, self.backend)
        return torch.tensor(ids, dtype=torch.int64, device=dev), ctx

    @torch.inference_mode()
    def forward_logits(self, chunks: list[ScheduledChunk], all_tokens: bool = False) -> torch.Tensor:
        """float32 logits of each chunk's last token [B, V] (or of every token [T, V])."""
        input_ids, ctx = self.prepare(chunks)
        h = self.model(input_ids, ctx)
        if not all_tokens:
            h = h[ctx.attn.cu_seqlens_q[1:].long() - 1]
        return self.model.compute_logits(h)

    def execute(self, out: SchedulerOutput) -> dict[str, int]:
        """Run one scheduled step; return {request_id: sampled token} for chunks that sample."""
        logits = self.forward_logits(out.chunks)
        rows = [i for i, c in enumerate(out.chunks) if c.samples]
        if not rows:
            return {}
        reqs = [out.chunks[i].request for i in rows]
        gens = [self._generator(r.request_id, r.sampling.seed) if not r.sampling.greedy else None for r in reqs]
        tokens = sample(logits[rows], [r.sampling for r in reqs], gens)
        return {r.request_id: t for r, t in zip(reqs, tokens)}

    def _generator(self, request_id: str, seed: int | None) -> torch.Generator:
        g = self.generators.get(request_id)
        if g is None:
            g = torch.Generator(device=self.device)
            g.manual_seed(seed if seed is not None else torch.randint(0, 2**62, (1,)).item())
            self.generators[request_id] = g
        return g

    def release(self, request_id: str) -> None:
        self.generators.pop(request_id, None)
