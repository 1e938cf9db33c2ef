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


def sample_tokens(logits: torch.Tensor, params: list[SamplingParams],
                  generators: list[torch.Generator | None]) -> torch.Tensor:
    """logits: float32 [N, V]; one SamplingParams and generator per row -> int64 [N] token ids
    on the logits' device, with no host sync (the engine reads them back one step late)."""
    out = logits.argmax(-1)
    for i, sp in enumerate(params):
        if sp.greedy:
            continue
        probs = filter_logits(logits[i], sp.temperature, sp.top_k, sp.top_p).softmax(-1)
        noise = torch.empty_like(probs).exponential_(generator=generators[i])
        out[i] = (probs / noise).argmax()
    return out


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[int]:
    """`sample_tokens` as a list of ints."""
    return sample_tokens(logits, params, generators).tolist()


def _host_to(device: torch.device, values: list, dtype: torch.dtype) -> torch.Tensor:
    """A host list on `device` through pinned memory: a pageable copy would wait for the device."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def apply_penalties(logits: torch.Tensor, output_ids: list[list[int]], params: list[SamplingParams],
                    pending: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """OpenAI's penalties (https://platform.openai.com/docs/advanced-usage#frequency-and-presence-penalties):
    logits[j] -= presence * (count[j] > 0) + frequency * count[j], with count[j] how often token
    j occurs in the row's generated tokens (the prompt does not count, as in vLLM).

    logits: float32 [N, V]; one list of generated ids and one SamplingParams per row; `pending`
    (rows int64 [P], token ids int64 [P], on the device): generated tokens the host has not
    read yet (async scheduling), counted too. Returns a new tensor (the input may be a
    CUDA-graph output buffer)."""
    n, v = logits.shape
    dev = logits.device
    counts = torch.zeros(n, v, dtype=logits.dtype, device=dev)
    rows = [i for i, ids in enumerate(output_ids) for _ in ids]
    if rows:
        flat = [t for ids in output_ids for t in ids]
        idx = _host_to(dev, [rows, flat], torch.int64)
        counts.index_put_((idx[0], idx[1]), torch.ones(len(rows), dtype=logits.dtype, device=dev), accumulate=True)
    if pending is not None:
        prow, ptok = pending
        counts.index_put_((prow, ptok), torch.ones(prow.shape[0], dtype=logits.dtype, device=dev), accumulate=True)
    pf = _host_to(dev, [[sp.presence_penalty, sp.frequency_penalty] for sp in params], logits.dtype)
    return logits - pf[:, :1] * (counts > 0) - pf[:, 1:] * counts


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the model and the `k` most likely
    alternatives (id, log-probability), most likely first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


def logprobs_on_device(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """logits: float32 [N, V], the model's own (before penalties and temperature, like vLLM's
    default `raw_logprobs` and OpenAI's model distribution); tokens: int64 [N] chosen ids ->
    (chosen log-probabilities [N], top-k values [N, k], top-k ids [N, k]), no host sync."""
    lp = logits.float().log_softmax(-1)
    chosen = lp.gather(1, tokens[:, None])[:, 0]
    vals, ids = lp.topk(min(k, lp.shape[1]), dim=-1)
    return chosen, vals, ids


def assemble_logprobs(tokens: list[int], ks: list[int], chosen: torch.Tensor, vals: torch.Tensor,
                      ids: torch.Tensor) -> list[TokenLogprob]:
    """`logprobs_on_device`'s tensors (on the host) -> one TokenLogprob per row, k_i alternatives."""
    chosen, vals, ids = chosen.tolist(), vals.tolist(), ids.tolist()
    return [TokenLogprob(t, c, list(zip(i[:kk], v[:kk]))) for t, c, i, v, kk in zip(tokens, chosen, ids, vals, ks)]


def token_logprobs(logits: torch.Tensor, tokens: list[int], ks: list[int]) -> list[TokenLogprob]:
    """logits: float32 [N, V], the model's own; one chosen token and one k per row."""
    t = torch.tensor(tokens, dtype=torch.int64, device=logits.device)
    return assemble_logprobs(tokens, ks, *(x.cpu() for x in logprobs_on_device(logits, t, max(ks))))
