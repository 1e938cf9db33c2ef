"""Per-request sampling: greedy, temperature, top-k, top-p, seeded generators; OpenAI's
presence/frequency penalties and the log-probabilities a request may ask for.

Sampling uses the exponential-race trick (argmax of p / Exp(1) noise is a draw from p), so a
request's own generator decides its draws whatever else shares the batch.
"""
from __future__ import annotations

from dataclasses import dataclass

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


def apply_penalties(logits: torch.Tensor, output_ids: list[list[int]], params: list[SamplingParams]) -> torch.Tensor:
    """OpenAI's penalties (https://platform.openai.com/docs/advanced-usage#frequency-and-presence-penalties):
    logits[j] -= presence * (count[j] > 0) + frequency * count[j], with count[j] how often token
    j occurs in the row's generated tokens (the prompt does not count, as in vLLM).

    logits: float32 [N, V]; one list of generated ids and one SamplingParams per row. Returns a
    new tensor (the input may be a CUDA-graph output buffer)."""
    n, v = logits.shape
    counts = torch.zeros(n, v, dtype=logits.dtype, device=logits.device)
    rows = [i for i, ids in enumerate(output_ids) for _ in ids]
    if rows:
        flat = [t for ids in output_ids for t in ids]
        idx = torch.tensor([rows, flat], dtype=torch.int64).to(logits.device)
        counts.index_put_((idx[0], idx[1]), torch.ones(len(rows), dtype=logits.dtype, device=logits.device),
                          accumulate=True)
    pf = torch.tensor([[sp.presence_penalty, sp.frequency_penalty] for sp in params], dtype=logits.dtype)
    pf = pf.to(logits.device)
    return logits - pf[:, :1] * (counts > 0) - pf[:, 1:] * counts


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the model and the `k` most likely
    alternatives (id, log-probability), most likely first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


def token_logprobs(logits: torch.Tensor, tokens: list[int], ks: list[int]) -> list[TokenLogprob]:
    """logits: float32 [N, V], the model's own (before penalties and temperature, like vLLM's
    default `raw_logprobs` and OpenAI's model distribution); one chosen token and one k per row."""
    lp = logits.float().log_softmax(-1)
    chosen = lp.gather(1, torch.tensor(tokens, dtype=torch.int64, device=lp.device)[:, None])[:, 0].tolist()
    k = min(max(ks), lp.shape[1])
    vals, ids = lp.topk(k, dim=-1)
    vals, ids = vals.tolist(), ids.tolist()
    return [TokenLogprob(t, c, list(zip(i[:kk], v[:kk]))) for t, c, i, v, kk in zip(tokens, chosen, ids, vals, ks)]
