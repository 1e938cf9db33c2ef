"""Per-request sampling: greedy, temperature, top-k, top-p, seeded generators.

Sampling uses the exponential-race trick (argmax of p / Exp(1) noise is a draw from p), so a
request's own generator decides its draws whatever else shares the batch.
"""
from __future__ import annotations

import torch

from bitfold.sampling import SamplingParams


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """logits: float32 [V] -> temperature-scaled logits with filtered entries at -inf.

    The logits are shifted so their maximum is 0 before dividing (softmax, top-k and top-p do
    not change): a tiny temperature then sends the others to -inf instead of overflowing the
    maximum to inf and the softmax to NaN."""
    logits = logits - logits.max()
    logits = torch.where(logits == 0, logits, logits / temperature)
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Keep the smallest prefix whose mass reaches top_p (always the first token).
        drop = (cum - sorted_logits.softmax(-1)) >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, idx, drop), float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[int]:
    """logits: float32 [N, V]; one SamplingParams and generator per row -> N token ids."""
    out = logits.argmax(-1).tolist()
    for i, sp in enumerate(params):
        if sp.greedy:
            continue
        probs = filter_logits(logits[i], sp.temperature, sp.top_k, sp.top_p).softmax(-1)
        noise = torch.empty_like(probs).exponential_(generator=generators[i])
        out[i] = int((probs / noise).argmax())
    return out
