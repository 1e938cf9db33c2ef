"""Perplexity, KL divergence and top-1 agreement, computed through the engine's own paged KV path.

Teacher-forced decode: each window of N tokens is prefilled for its first P tokens (P = 0 by
default: nothing), then fed ONE token per step as a decode chunk, so every scored position's
attention reads all earlier K/V back from the paged cache through the KV codec and the
attention backend, exactly as generation does. Several windows share each step.

All configurations run in lockstep over the same windows: at each step every engine computes
its next-token distribution and it is compared at once with the reference's (the first
configuration), so nothing vocabulary-sized is stored. That keeps every engine loaded at the
same time; each engine's KV cache is sized to the windows of one batch.

  - perplexity: exp(mean negative log-likelihood of the true next token);
  - KL(ref || config) per position: sum_v p_ref(v) (log p_ref(v) - log p_config(v)), in nats
    (the measure llama.cpp's `perplexity --kl-divergence` reports);
  - top-1 agreement: how often the configuration's argmax equals the reference's.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from bitfold.core.request import Request
from bitfold.core.scheduler import ScheduledChunk
from bitfold.engine import LLMEngine
from bitfold.errors import BitfoldError
from bitfold.sampling import SamplingParams


def sample_windows(tokenizer, docs: list[str], num_windows: int, length: int, seed: int) -> list[list[int]]:
    """`num_windows` non-overlapping windows of `length` token ids: the documents in a seeded
    order, each tokenized and followed by a blank line, cut into consecutive windows. A window
    starts with BOS when the tokenizer adds one to prompts. The first k windows of a larger
    sample are the k windows of a smaller one (so --limit takes a prefix)."""
    if length < 2:
        raise BitfoldError(f"a window needs at least 2 tokens, got --context {length}")
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "add_bos", False) else []
    body = length - len(bos)
    sep = tokenizer.encode("\n\n", add_special_tokens=False)
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    need, stream = num_windows * body, []
    for i in order:
        stream += tokenizer.encode(docs[i], add_special_tokens=False) + sep
        if len(stream) >= need:
            break
    if len(stream) < need:
        raise BitfoldError(f"the corpus has {len(stream)} tokens, fewer than {num_windows} windows x {body} tokens; "
                           "ask for fewer windows or a shorter --context")
    return [bos + stream[k * body:(k + 1) * body] for k in range(num_windows)]


def step_logits(engine: LLMEngine, chunks: list[ScheduledChunk], all_tokens: bool = False) -> torch.Tensor:
    """float32 logits [B, V] (or [T, V] with all_tokens) the way `ModelRunner.execute` gets them:
    a captured CUDA graph for decode steps when the runner has one, the eager forward otherwise."""
    r = engine.runner
    decode = all(c.num_tokens == 1 for c in chunks)
    if not all_tokens and decode and r.graphs is not None and r.graphs.fits(len(chunks)):
        with torch.inference_mode():
            ids, ctx = r.prepare(chunks)
            return r.graphs.run(ids, ctx.positions, ctx.attn)
    return r.forward_logits(chunks, all_tokens=all_tokens)


@dataclass
class _Lane:
    """One configuration's engine and what it has measured so far (per scored token)."""

    name: str
    engine: LLMEngine
    reqs: list[Request] = field(default_factory=list)
    nll: list[torch.Tensor] = field(default_factory=list)
    kl: list[torch.Tensor] = field(default_factory=list)
    agree: list[torch.Tensor] = field(default_factory=list)
    correct: list[torch.Tensor] = field(default_factory=list)
    pos: list[torch.Tensor] = field(default_factory=list)
    seconds: float = 0.0

    def start(self, windows: list[list[int]], first: int) -> None:
        self.reqs = [Request(f"eval-{self.name}-{first + i}", w, SamplingParams(max_tokens=1))
                     for i, w in enumerate(windows)]

    def run(self, start: int, n: int, all_tokens: bool) -> torch.Tensor:
        kv = self.engine.kv
        chunks = []
        for r in self.reqs:
            if not kv.allocate_slots(r, n):
                raise BitfoldError(f"config {self.name!r}: the KV cache ({self.engine.pool.num_blocks} blocks) cannot "
                                   f"hold {len(self.reqs)} windows; lower --batch or raise num_kv_blocks")
            chunks.append(ScheduledChunk(r, start, n, list(kv.block_table(r)), seq_slot=kv.seq_slot(r)))
        t0 = time.perf_counter()
        logits = step_logits(self.engine, chunks, all_tokens)
        if logits.is_cuda:
            torch.cuda.synchronize(logits.device)
        self.seconds += time.perf_counter() - t0
        for r in self.reqs:
            r.num_computed_tokens += n
        return logits

    def finish(self) -> None:
        for r in self.reqs:
            self.engine.kv.free(r)
        self.reqs = []


def _plan(length: int, prefill: int, score_prefill: bool, batch: int, budget: int) -> list[tuple[int, int, bool]]:
    """The steps over a window: (first position, tokens per window, scored?). Prefill chunks keep
    batch x tokens within the engine's token budget; then one decode step per position."""
    per = max(1, budget // batch)
    steps = [(a, min(prefill, a + per) - a, score_prefill) for a in range(0, prefill, per)]
    return steps + [(t, 1, True) for t in range(prefill, length - 1)]


def _quantile(x: torch.Tensor, q: float) -> float:
    if x.numel() == 0:
        return float("nan")
    k = min(x.numel(), max(1, math.ceil(q * x.numel())))
    return float(x.kthvalue(k).values)


def score_windows(engines: dict[str, LLMEngine], windows: list[list[int]], prefill: int = 0,
                  score_prefill: bool = False, batch: int = 16, progress: bool = False) -> dict:
    """Score `windows` (equal lengths) under every engine; the first engine is the reference.

    Returns {"configs": {name: metrics}, "positions": {name: {"nll": [...], "kl": [...]}}} where
    the position curves are mean NLL / KL per target position (index 0 is never scored)."""
    if not windows:
        raise BitfoldError("no windows to score")
    length = len(windows[0])
    if any(len(w) != length for w in windows):
        raise BitfoldError("all windows must have the same length")
    if not 0 <= prefill <= length - 2:
        raise BitfoldError(f"--prefill {prefill} must leave at least one decode step: 0 <= prefill <= {length - 2}")
    lanes = [_Lane(n, e) for n, e in engines.items()]
    vocab = {lane.engine.runner.model_config.vocab_size for lane in lanes}
    if len(vocab) > 1:
        raise BitfoldError(f"the configurations' models have different vocabularies ({sorted(vocab)}); "
                           "KL needs one vocabulary")
    batch = max(1, min(batch, len(windows)))
    budget = min(lane.engine.config.max_num_batched_tokens for lane in lanes)
    plan = _plan(length, prefill, score_prefill, batch, budget)
    pos_sums = {lane.name: (torch.zeros(length, dtype=torch.float64), torch.zeros(length, dtype=torch.float64))
                for lane in lanes}
    counts = torch.zeros(length, dtype=torch.float64)
    bar = tqdm(total=len(plan) * math.ceil(len(windows) / batch), desc=f"ppl x{len(lanes)} configs", unit="step",
               disable=not progress)
    try:
        for first in range(0, len(windows), batch):
            group = windows[first:first + batch]
            ids = torch.tensor(group)
            for lane in lanes:
                lane.start(group, first)
            for start, n, scored in plan:
                outs = [lane.run(start, n, all_tokens=scored and n > 1) for lane in lanes]
                bar.update(1)
                if scored:
                    # row order: window 0's n positions, window 1's, ...; each predicts the next token
                    targets = ids[:, start + 1:start + n + 1].reshape(-1)
                    positions = torch.arange(start + 1, start + n + 1).repeat(len(group))
                    _accumulate(lanes, outs, targets, positions, pos_sums)
                    counts.index_add_(0, positions, torch.ones(len(positions), dtype=torch.float64))
            for lane in lanes:
                lane.finish()
    finally:
        bar.close()
        for lane in lanes:
            lane.finish()
    return _summarize(lanes, pos_sums, counts)


def _accumulate(lanes: list[_Lane], outs: list[torch.Tensor], targets: torch.Tensor, positions: torch.Tensor,
                pos_sums: dict) -> None:
    ref_logp = ref_top = None
    for lane, logits in zip(lanes, outs):
        logp = torch.log_softmax(logits.float(), dim=-1)
        top = logp.argmax(dim=-1)
        if ref_logp is None:
            ref_logp, ref_top, ref_p = logp, top, logp.exp()
        # p * (log p - log q), with 0 * anything = 0 where the reference gives a token no mass
        kl = torch.where(ref_p > 0, ref_p * (ref_logp - logp), 0.0).sum(dim=-1)
        nll = -logp.gather(1, targets.to(logp.device)[:, None])[:, 0]
        lane.nll.append(nll.double().cpu())
        lane.kl.append(kl.double().cpu())
        lane.agree.append((top == ref_top).cpu())
        lane.correct.append((top.cpu() == targets))
        lane.pos.append(positions)
        s_nll, s_kl = pos_sums[lane.name]
        s_nll.index_add_(0, positions, lane.nll[-1])
        s_kl.index_add_(0, positions, lane.kl[-1])


def _summarize(lanes: list[_Lane], pos_sums: dict, counts: torch.Tensor) -> dict:
    ref_nll = torch.cat(lanes[0].nll)
    configs, curves = {}, {}
    for lane in lanes:
        nll, kl = torch.cat(lane.nll), torch.cat(lane.kl)
        n = nll.numel()
        d = nll - ref_nll  # paired per-token difference: ln(ppl / ppl_ref) and its standard error
        configs[lane.name] = {
            "tokens": n,
            "ppl": math.exp(float(nll.mean())),
            "nll_mean": float(nll.mean()),
            "nll_se": float(nll.std() / math.sqrt(n)) if n > 1 else 0.0,
            "ln_ppl_ratio": float(d.mean()),
            "ln_ppl_ratio_se": float(d.std() / math.sqrt(n)) if n > 1 else 0.0,
            "kl_mean": float(kl.mean()),
            "kl_median": _quantile(kl, 0.5),
            "kl_p99": _quantile(kl, 0.99),
            "kl_max": float(kl.max()),
            "top1_agreement": float(torch.cat(lane.agree).double().mean()),
            "top1_accuracy": float(torch.cat(lane.correct).double().mean()),
            "seconds": lane.seconds,
        }
        s_nll, s_kl = pos_sums[lane.name]
        seen = counts.clamp(min=1)
        curves[lane.name] = {"nll": (s_nll / seen).tolist(), "kl": (s_kl / seen).tolist()}
    return {"configs": configs, "positions": curves, "position_counts": counts.tolist()}
