"""The one object that owns device state: the model's weights, the KV pages, the attention
backend and the per-request sampling generators. It turns a SchedulerOutput into tensors,
runs the forward pass and samples.

`launch` never waits for the device: inputs go up through pinned memory, tokens are sampled
on the device and come back through a non-blocking copy that `StepHandle.result` waits for.
A chunk whose input is the previous step's sampled token (`ScheduledChunk.pending`, async
scheduling) reads that token from the device, so the host never needs it to launch a step.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import torch

from bitfold.config import EngineConfig
from bitfold.core.request import Request
from bitfold.core.scheduler import ScheduledChunk, SchedulerOutput
from bitfold.errors import BitfoldError
from bitfold.kernels import _triton
from bitfold.kvcache.codecs import make_codec
from bitfold.kvcache.spec import KVCacheSpec
from bitfold.attention import AttentionMetadata, select_backend
from bitfold.layers.sampler import TokenLogprob, apply_penalties, assemble_logprobs, logprobs_on_device, sample_tokens
from bitfold.loader.source import ModelSource
from bitfold.models import MODELS
from bitfold.models.format_plan import plan_for
from bitfold.weights.base import resolve_weight_format
from bitfold.models.base import StepContext
from bitfold.runner.cpu_step import FusedSteps
from bitfold.runner.cuda_graphs import DecodeGraphs, default_batch_sizes

log = logging.getLogger("bitfold")

DEFAULT_CPU_KV_GB = 2.0


@dataclass
class StepHandle:
    """A launched step. `tokens` (int64 [N], one per sampling chunk, in chunk order) and the
    logprob tensors are host tensors that a non-blocking copy fills; `ready` marks the copy's
    end on the device (None on the CPU, where everything ran synchronously)."""

    sched: SchedulerOutput
    request_ids: list[str]
    tokens: torch.Tensor | None = None
    ready: torch.cuda.Event | None = None
    logprob_rows: list[int] = field(default_factory=list)
    logprob_ks: list[int] = field(default_factory=list)
    logprob_tensors: tuple[torch.Tensor, ...] = ()

    def result(self) -> tuple[dict[str, int], dict[str, TokenLogprob]]:
        """Wait for the step; return {request_id: token} and {request_id: TokenLogprob}."""
        if self.tokens is None:
            return {}, {}
        if self.ready is not None:
            self.ready.synchronize()
        tokens = self.tokens.tolist()
        sampled = dict(zip(self.request_ids, tokens))
        logprobs = {}
        if self.logprob_rows:
            lps = assemble_logprobs([tokens[i] for i in self.logprob_rows], self.logprob_ks, *self.logprob_tensors)
            logprobs = {self.request_ids[i]: lp for i, lp in zip(self.logprob_rows, lps)}
        return sampled, logprobs


# Decode graphs of up to this many rows launch with PDL under EngineConfig.pdl "auto": on the
# H200 it gained 3-7% at batch 1 (bf16 235.1 vs 227.3, int4-g128 448.2 vs 417.7, Q4_K_M 366.6 vs
# 347.7 tok/s) but lost bf16 4-5% at 4 and 16 rows (weights-20261204-205250, one run).
PDL_AUTO_ROWS = 1


class ModelRunner:
    def __init__(self, source: ModelSource, cfg: EngineConfig, device: torch.device, dtype: torch.dtype,
                 max_model_len: int):
        self.device, self.dtype, self.cfg = device, dtype, cfg
        pdl_ok, why = _triton.pdl_supported(device)
        if cfg.pdl == "on" and not pdl_ok:  # before the weights load: say so now, not after minutes of it
            raise BitfoldError(f"--pdl on: {why}")
        model_cls = MODELS.get(source.config.architecture)
        self.model_config = replace(source.config, **model_cls.config_overrides)
        with torch.device(device):
            fmt = resolve_weight_format(cfg.weights, source.weight_format, device.type, source.stored_formats)
            fmt = plan_for(fmt, source.format_overrides, device.type)  # a mixed checkpoint: per-linear formats
            self.model = model_cls(self.model_config, dtype, max_positions=max_model_len, fmt=fmt)
        self.model.load_weights(source.weights(), source.path)
        self.model.eval().requires_grad_(False)
        if device.type == "cuda":  # before any CUDA graph is captured: the graphs keep the kernel
            from bitfold.kernels import qmatmul

            qmatmul.DP4A_MAX_ROWS = 0 if cfg.int8_activations == "off" else qmatmul.DP4A_ROWS
            qmatmul.DP4A_MAX_BITS = 8 if cfg.int8_activations == "on" else 6
        self.fused_steps = FusedSteps(self.model) if cfg.cpu_fused_step and device.type == "cpu" else None

        mc = self.model_config
        self.block_size = bs = cfg.effective_block_size()
        codec = make_codec(cfg.kv_cache, dtype, cfg.kv_residual, cfg.kv_rotate)
        why = codec.validate(bs, mc.head_dim, max_model_len)
        if why is not None:
            raise BitfoldError(f"--kv-cache {cfg.kv_cache}: {why}")
        # Per-sequence codec storage (KIVI's residual window): one slot per sequence that can run.
        self.num_seq_slots = cfg.max_num_seqs if codec.needs_seq_slots(bs, mc.num_kv_heads, mc.head_dim) else 0
        self.kv_spec = KVCacheSpec(mc.num_layers, mc.num_kv_heads, mc.head_dim, bs, codec, self.num_seq_slots)
        self.backend = select_backend(cfg.attention_backend, device, dtype, codec)
        self.max_model_len = max_model_len
        self.num_blocks = cfg.num_kv_blocks or self.kv_spec.num_blocks_for(self._kv_budget_bytes())
        if self.num_blocks < 1:
            raise BitfoldError("the KV-cache budget is smaller than one block; raise --kv-cache-memory-gb "
                               "or --gpu-memory-utilization")
        offsets = getattr(self.model, "key_offsets", lambda: [None] * mc.num_layers)()
        self.kv_caches = [codec.allocate(self.num_blocks, bs, mc.num_kv_heads, mc.head_dim, device, self.num_seq_slots,
                                         key_offset=off) for off in offsets]
        self.generators: dict[str, torch.Generator] = {}
        # Filled by every `execute` for the requests that asked for logprobs (beside its return
        # value, so callers that only want token ids are unchanged).
        self.logprobs: dict[str, TokenLogprob] = {}
        # The last launched step's sampled tokens (device, int64 [N]) and each request's row in
        # it: where a pending chunk's input token is.
        self._last_tokens: torch.Tensor | None = None
        self._last_rows: dict[Request, int] = {}
        log.info("KV cache %s: %d blocks x %d tokens = %d tokens fit (%.2f GiB of pages%s, %.1f bits per element, "
                 "%s attention)", codec.name, self.num_blocks, bs, self.num_blocks * bs,
                 self.num_blocks * self.kv_spec.page_size_bytes / 2**30,
                 f" + {self.kv_spec.fixed_bytes / 2**30:.2f} GiB for {self.num_seq_slots} sequences' "
                 f"{codec.residual}-token residual windows" if self.num_seq_slots else "",
                 codec.bits_per_element, self.backend.name)
        self.graphs = None
        if device.type == "cuda" and not cfg.enforce_eager and self.backend.is_graph_safe:
            sizes = default_batch_sizes(cfg.max_num_seqs)
            pdl_rows = 0 if not pdl_ok or cfg.pdl == "off" else (max(sizes) if cfg.pdl == "on" else PDL_AUTO_ROWS)
            with torch.inference_mode():
                self.graphs = DecodeGraphs(self.model, self.kv_caches, self.backend, sizes, max_model_len, bs, pdl_rows)
            log.info("captured CUDA graphs for decode batch sizes %s%s", sizes,
                     f" (programmatic dependent launch up to {pdl_rows} rows)" if pdl_rows else "")

    def _kv_budget_bytes(self) -> int:
        if self.cfg.kv_cache_memory_gb is not None:
            return int(self.cfg.kv_cache_memory_gb * 2**30)
        if self.device.type != "cuda":
            return int(DEFAULT_CPU_KV_GB * 2**30)
        # vLLM's recipe: profile the largest step with a throw-away cache, then give the KV
        # cache what is left of `gpu_memory_utilization` of the card.
        peak = self._profile_peak_bytes()
        free, total = torch.cuda.mem_get_info(self.device)
        others = total - free - torch.cuda.memory_reserved(self.device)  # CUDA context, other processes
        logits = self.cfg.max_num_seqs * self.model_config.vocab_size * 4 * 2  # decode logits, graphs included
        budget = int(total * self.cfg.gpu_memory_utilization) - peak - others - logits
        log.info("GPU memory: %.1f GiB total, peak %.2f GiB for weights + activations, %.2f GiB KV budget",
                 total / 2**30, peak / 2**30, budget / 2**30)
        return max(budget, 0)

    @torch.inference_mode()
    def _profile_peak_bytes(self) -> int:
        """Peak memory of a forward over `max_num_batched_tokens` tokens (weights included)."""
        from bitfold.sampling import SamplingParams

        n = min(self.cfg.max_num_batched_tokens, self.max_model_len)
        bs = self.block_size
        nb = -(-n // bs)
        mc = self.model_config
        scratch = [self.kv_spec.codec.allocate(nb, bs, mc.num_kv_heads, mc.head_dim, self.device, 1)
                   for _ in range(mc.num_layers)]
        req = Request("profile", [0] * n, SamplingParams(max_tokens=1))
        chunk = ScheduledChunk(req, 0, n, list(range(nb)), seq_slot=0 if self.num_seq_slots else -1)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(self.device)
        saved, self.kv_caches = getattr(self, "kv_caches", None), scratch
        try:
            self.forward_logits([chunk])
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated(self.device)
        finally:
            self.kv_caches = saved
            del scratch
            torch.cuda.empty_cache()

    def to_device(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        """A host list on the device without waiting: a pageable host-to-device copy would
        block until the device is idle, which async scheduling must never do."""
        if self.device.type != "cuda":
            return torch.tensor(values, dtype=dtype)
        return torch.tensor(values, dtype=dtype, pin_memory=True).to(self.device, non_blocking=True)

    def prepare(self, chunks: list[ScheduledChunk]) -> tuple[torch.Tensor, StepContext]:
        """Flatten the step's chunks into input_ids [T] and the attention metadata, with three
        non-blocking host-to-device transfers (int64 ids/positions/slots, int32 lengths, the
        block tables): this runs every decode step, for up to max_num_seqs sequences. Pending
        chunks take their token from the previous step's sampled tokens, on the device."""
        bs = self.block_size
        ids, pos, slots, ctx_lens, cu, tables = [], [], [], [], [0], []
        pend_dst, pend_src = [], []
        max_blocks = max(len(c.block_table) for c in chunks)
        for c in chunks:
            table, end = c.block_table, c.start + c.num_tokens
            if c.pending:
                row = self._last_rows.get(c.request)
                if row is None or c.num_tokens != 1:
                    raise BitfoldError(f"internal: no sampled token on the device for {c.request.request_id}")
                pend_dst.append(len(ids))
                pend_src.append(row)
            ids.extend(c.token_ids)
            p = range(c.start, end)
            pos.extend(p)
            slots.extend(table[j // bs] * bs + j % bs for j in p)
            ctx_lens.append(end)
            cu.append(cu[-1] + c.num_tokens)
            tables.append(table + [0] * (max_blocks - len(table)))
        T, B, P = len(ids), len(chunks), len(pend_dst)
        vec64 = self.to_device(ids + pos + slots + pend_dst + pend_src, torch.int64)
        seq_slots = [c.seq_slot for c in chunks] if self.num_seq_slots else []
        small32 = self.to_device(ctx_lens + cu + seq_slots, torch.int32)
        meta = AttentionMetadata(
            slot_mapping=vec64[2 * T : 3 * T],
            block_tables=self.to_device(tables, torch.int32),
            context_lens=small32[:B],
            cu_seqlens_q=small32[B : 2 * B + 1],
            max_q_len=max(c.num_tokens for c in chunks),
            max_context_len=max(ctx_lens),
            seq_slots=small32[2 * B + 1 :] if self.num_seq_slots else None,
        )
        input_ids = vec64[:T]
        if P:
            src = vec64[3 * T + P :]
            input_ids.index_copy_(0, vec64[3 * T : 3 * T + P], self._last_tokens.index_select(0, src))
        return input_ids, StepContext(vec64[T : 2 * T], meta, self.kv_caches, self.backend)

    @torch.inference_mode()
    def forward_logits(self, chunks: list[ScheduledChunk], all_tokens: bool = False) -> torch.Tensor:
        """float32 logits of each chunk's last token [B, V] (or of every token [T, V])."""
        input_ids, ctx = self.prepare(chunks)
        fused = self.fused_steps.plan(ctx) if self.fused_steps is not None else None
        h = fused(input_ids, ctx) if fused is not None else self.model(input_ids, ctx)  # a CPU low-bit decode step
        if not all_tokens:
            h = h[ctx.attn.cu_seqlens_q[1:].long() - 1]
        return self.model.compute_logits(h)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> dict[str, int]:
        """Run one scheduled step and wait for it; return {request_id: sampled token} for
        chunks that sample. Requests whose sampling asks for logprobs also get an entry in
        `self.logprobs`."""
        sampled, self.logprobs = self.launch(out).result()
        return sampled

    @torch.inference_mode()
    def launch(self, out: SchedulerOutput) -> StepHandle:
        """Start one scheduled step (forward, sampling, the copy of its tokens to the host)
        without waiting for the device; `StepHandle.result()` waits."""
        chunks = out.chunks
        if self.graphs is not None and all(c.num_tokens == 1 for c in chunks) and self.graphs.fits(len(chunks)):
            input_ids, ctx = self.prepare(chunks)
            logits = self.graphs.run(input_ids, ctx.positions, ctx.attn)
        else:
            logits = self.forward_logits(chunks)
        rows = [i for i, c in enumerate(chunks) if c.samples]
        handle = StepHandle(out, [chunks[i].request.request_id for i in rows])
        if not rows:
            self._last_tokens, self._last_rows = None, {}
            return handle
        reqs = [chunks[i].request for i in rows]
        gens = [self._generator(r.request_id, r.sampling.seed) if not r.sampling.greedy else None for r in reqs]
        if len(rows) < len(chunks):  # partial-prefill chunks sample nothing
            logits = logits.index_select(0, self.to_device(rows, torch.int64))
        params = [r.sampling for r in reqs]
        raw = logits
        if any(sp.penalized for sp in params):
            logits = apply_penalties(logits, [r.output_token_ids for r in reqs], params, self._pending_tokens(
                [chunks[i] for i in rows]))
        tokens = sample_tokens(logits, params, gens)
        self._last_tokens, self._last_rows = tokens, {r: i for i, r in enumerate(reqs)}
        want = [i for i, sp in enumerate(params) if sp.logprobs is not None]
        if want:
            handle.logprob_rows, handle.logprob_ks = want, [params[i].logprobs for i in want]
            idx = self.to_device(want, torch.int64)
            lp = logprobs_on_device(raw.index_select(0, idx), tokens.index_select(0, idx), max(handle.logprob_ks))
            handle.logprob_tensors = tuple(self._to_host(t) for t in lp)
        handle.tokens = self._to_host(tokens)
        if self.device.type == "cuda":
            handle.ready = torch.cuda.Event()
            handle.ready.record()
        return handle

    def _to_host(self, t: torch.Tensor) -> torch.Tensor:
        # non_blocking device-to-host copies land in pinned memory; StepHandle.ready says when.
        return t.to("cpu", non_blocking=True) if t.is_cuda else t

    def _pending_tokens(self, chunks: list[ScheduledChunk]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(rows, token ids) on the device of the sampling chunks whose request has a token
        the host has not read yet: penalties must count it."""
        rows = [i for i, c in enumerate(chunks) if c.pending]
        if not rows:
            return None
        src = self.to_device([self._last_rows[chunks[i].request] for i in rows], torch.int64)
        return self.to_device(rows, torch.int64), self._last_tokens.index_select(0, src)

    def _generator(self, request_id: str, seed: int | None) -> torch.Generator:
        g = self.generators.get(request_id)
        if g is None:
            g = torch.Generator(device=self.device)
            g.manual_seed(seed if seed is not None else torch.randint(0, 2**62, (1,)).item())
            self.generators[request_id] = g
        return g

    def release(self, request_id: str) -> None:
        self.generators.pop(request_id, None)
