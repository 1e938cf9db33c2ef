"""The sampler (`bitfold.layers.sampler`) against an independent float64 reference.

The reference follows the usual definition (HF's warpers, vLLM): divide by the temperature,
keep the tokens whose value is >= the k-th largest (top-k, ties kept), renormalize, then keep
the smallest most-probable prefix whose mass reaches top_p (top-p, the first token always).
Empirical frequencies of `sample` over many seeded draws must match it; seeded generators
must make a row's draws reproducible and independent of the other rows.
"""
from __future__ import annotations


import numpy as np
import pytest
import torch

from bitfold.layers.sampler import filter_logits, sample
from bitfold.sampling import SamplingParams


def ref_probs(logits, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """float64 reference distribution after temperature, top-k and top-p."""
    x = np.asarray(logits, dtype=np.float64) / temperature
    v = x.size
    if 0 < top_k < v:
        kth = np.sort(x)[::-1][top_k - 1]
        x = np.where(x >= kth, x, -np.inf)
    p = np.exp(x - x.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        n_keep = int(np.searchsorted(cum, top_p, side="left")) + 1  # first prefix with mass >= top_p
        keep = np.zeros(v, dtype=bool)
        keep[order[:n_keep]] = True
        p = np.where(keep, p, 0.0)
        p /= p.sum()
    return p


def _logits(seed: int, v: int = 8, scale: float = 1.5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(v, generator=g, dtype=torch.float64) * scale).float()


def _safe_top_p(logits: torch.Tensor, temperature: float, top_k: int, j: int) -> float:
    """A top_p halfway between the masses of the j+1 and j+2 most probable tokens (so j+2 are
    kept), far enough from both that float32 rounding cannot flip which tokens are kept."""
    p = np.sort(ref_probs(logits.numpy(), temperature, top_k, 1.0))[::-1]
    cum = np.cumsum(p)
    return float((cum[j] + cum[j + 1]) / 2)


# ---- the reference itself, checked by hand ----------------------------------------------------


def test_reference_on_a_hand_computed_case():
    logits = np.log([0.5, 0.2, 0.15, 0.1, 0.05])
    np.testing.assert_allclose(ref_probs(logits, 1.0, 0, 1.0), [0.5, 0.2, 0.15, 0.1, 0.05])
    np.testing.assert_allclose(ref_probs(logits, 1.0, 2, 1.0), [0.5 / 0.7, 0.2 / 0.7, 0, 0, 0])
    # top_p 0.8: 0.5, 0.7 < 0.8, 0.85 >= 0.8 -> three tokens
    np.testing.assert_allclose(ref_probs(logits, 1.0, 0, 0.8), [0.5 / 0.85, 0.2 / 0.85, 0.15 / 0.85, 0, 0])
    # temperature 0.5 squares the probabilities (before renormalizing)
    sq = np.array([0.5, 0.2, 0.15, 0.1, 0.05]) ** 2
    np.testing.assert_allclose(ref_probs(logits, 0.5, 0, 1.0), sq / sq.sum())


# ---- filter_logits ---------------------------------------------------------------------------

CASES = [  # (temperature, top_k, top_p: None = 1.0, or j = keep the j+2 most probable tokens)
    (1.0, 0, None), (0.7, 0, None), (1.8, 0, None),
    (1.0, 3, None), (0.5, 1, None), (1.0, -1, None), (1.0, 8, None), (1.0, 50, None),
    (1.0, 0, 0), (1.0, 0, 2), (0.8, 0, 4), (1.3, 5, 1), (0.9, 4, 2),
]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("temperature,top_k,top_p_j", CASES)
def test_filter_logits_matches_reference(seed, temperature, top_k, top_p_j):
    logits = _logits(seed)
    top_p = 1.0 if top_p_j is None else _safe_top_p(logits, temperature, top_k, top_p_j)
    ref = ref_probs(logits.numpy(), temperature, top_k, top_p)
    out = filter_logits(logits.clone(), temperature, top_k, top_p)
    assert out.shape == logits.shape
    kept = torch.isfinite(out).numpy()
    np.testing.assert_array_equal(kept, ref > 0)
    if top_p_j is not None:
        assert kept.sum() == top_p_j + 2
    got = torch.softmax(out.double(), -1).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-6, rtol=1e-5)


def test_top_k_keeps_ties_and_top_p_keeps_at_least_one():
    logits = torch.tensor([1.0, 3.0, 3.0, 0.5, 3.0, -2.0])
    out = filter_logits(logits, 1.0, 2, 1.0)
    np.testing.assert_array_equal(torch.isfinite(out).numpy(), ref_probs(logits.numpy(), 1.0, 2, 1.0) > 0)
    one = filter_logits(torch.tensor([0.0, 5.0, 1.0]), 1.0, 0, 1e-9)  # tiny top_p: just the argmax
    assert torch.isfinite(one).tolist() == [False, True, False]


def test_masked_logits_stay_masked():
    logits = _logits(11)
    logits[[1, 4]] = float("-inf")
    for top_k, top_p in [(0, 1.0), (3, 1.0), (0, 0.9), (5, 0.6)]:
        out = filter_logits(logits.clone(), 0.8, top_k, top_p)
        assert not torch.isfinite(out[[1, 4]]).any()
        np.testing.assert_allclose(torch.softmax(out.double(), -1).numpy(),
                                   ref_probs(logits.numpy(), 0.8, top_k, top_p), atol=1e-6)


# ---- sample: empirical distribution ------------------------------------------------------------

N_DRAWS = 20_000

DIST_CASES = [  # temperature, top_k, top_p_j
    (1.0, 0, None), (0.6, 0, None), (2.0, 0, None), (1.0, 3, None), (1.0, 0, 3), (0.8, 5, 2),
]


@pytest.mark.parametrize("temperature,top_k,top_p_j", DIST_CASES)
def test_sample_frequencies_match_reference(temperature, top_k, top_p_j):
    logits = _logits(100 + top_k, scale=1.0)
    top_p = 1.0 if top_p_j is None else _safe_top_p(logits, temperature, top_k, top_p_j)
    ref = ref_probs(logits.numpy(), temperature, top_k, top_p)
    sp = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    g = torch.Generator().manual_seed(1234)
    # N rows of the same logits through one call, all drawing from one generator in turn.
    draws = np.array(sample(logits.expand(N_DRAWS, -1).contiguous(), [sp] * N_DRAWS, [g] * N_DRAWS))
    freq = np.bincount(draws, minlength=logits.numel()) / N_DRAWS
    assert (freq[ref == 0] == 0).all(), "a filtered-out token was sampled"
    # Binomial std at p=0.5 and 20k draws is 0.0035: 0.015 is > 4 sigma.
    assert np.abs(freq - ref).max() < 0.015, (freq, ref)
    # and a chi-square goodness of fit on the support (df <= 7, 30 is far in the tail)
    support = ref > 0
    expected = ref[support] * N_DRAWS
    chi2 = float((((freq[support] * N_DRAWS) - expected) ** 2 / expected).sum())
    assert chi2 < 30.0, chi2


def test_tiny_temperature_is_the_argmax_not_nan():
    """Any temperature > 0 is valid; a very small one must behave like greedy, not overflow
    logits / T to inf and make the softmax NaN (which argmax would then pick)."""
    logits = torch.tensor([[0.5, 3.0, -1.0, 2.9, 0.0, 1.0, -4.0, 2.0]])
    for t in [1e-3, 1e-6, 1e-20, 1e-38, 1e-45, 1e-300]:
        sp = SamplingParams(temperature=t)
        for seed in range(5):
            assert sample(logits, [sp], [torch.Generator().manual_seed(seed)]) == [1], t
        out = filter_logits(logits[0], t, 0, 0.9)
        assert not torch.isnan(out).any() and torch.isfinite(out).sum() == 1


# ---- greedy, seeds, per-row independence -------------------------------------------------------


def test_greedy_rows_are_the_argmax_whatever_the_others_do():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=1),
              SamplingParams(temperature=0, top_k=3, top_p=0.5), SamplingParams(temperature=0.7, top_k=5),
              SamplingParams(temperature=0), SamplingParams(temperature=1.5, top_p=0.8)]
    gens = [None if p.greedy else torch.Generator().manual_seed(i) for i, p in enumerate(params)]
    out = sample(logits, params, gens)
    ref_argmax = np.argmax(logits.double().numpy(), axis=1)
    for i in (0, 2, 4):
        assert out[i] == ref_argmax[i]
    for i in (1, 3, 5):  # sampled rows land in their filtered support
        p = params[i]
        assert ref_probs(logits[i].numpy(), p.temperature, p.top_k, p.top_p)[out[i]] > 0


def _draw_sequence(logits: torch.Tensor, sp: SamplingParams, seed: int, n: int = 60) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [sample(logits[None], [sp], [g])[0] for _ in range(n)]


def test_same_seed_same_draws_different_seed_different_draws():
    logits = _logits(5, scale=0.3)  # near flat: 60 draws from 8 tokens
    sp = SamplingParams(temperature=1.0, top_k=6, top_p=0.95)
    a = _draw_sequence(logits, sp, seed=42)
    assert a == _draw_sequence(logits, sp, seed=42)
    assert len(set(a)) > 2
    assert a != _draw_sequence(logits, sp, seed=43)


def test_each_row_draws_only_from_its_own_generator():
    torch.manual_seed(0)
    v = 16
    row0 = torch.randn(v) * 0.5
    sp0 = SamplingParams(temperature=0.9, top_p=0.97, top_k=12)

    def run(other_rows: int, other_seed: int, steps: int = 40) -> list[int]:
        g0 = torch.Generator().manual_seed(7)
        others = [torch.Generator().manual_seed(other_seed + i) for i in range(other_rows)]
        ho = torch.Generator().manual_seed(other_seed)
        seq = []
        for _ in range(steps):
            logits = torch.cat([row0[None], torch.randn(other_rows, v, generator=ho) * 2])
            params = [sp0] + [SamplingParams(temperature=1.0 + 0.1 * i, top_k=i % 4) for i in range(other_rows)]
            seq.append(sample(logits, params, [g0] + others)[0])
        return seq

    alone = run(0, 0)
    assert len(set(alone)) > 3
    assert run(3, 100) == alone
    assert run(7, 555) == alone
    # an unseeded neighbour (generator None: the global RNG) does not disturb row 0 either
    g0 = torch.Generator().manual_seed(7)
    seq = []
    for _ in range(40):
        logits = torch.stack([row0, torch.randn(v)])
        seq.append(sample(logits, [sp0, SamplingParams(temperature=1.0)], [g0, None])[0])
    assert seq == alone


def test_filtered_tokens_never_drawn_over_many_seeds():
    logits = _logits(9, scale=0.5)
    sp = SamplingParams(temperature=1.0, top_k=3)
    support = set(np.flatnonzero(ref_probs(logits.numpy(), 1.0, 3, 1.0) > 0).tolist())
    drawn = {sample(logits[None], [sp], [torch.Generator().manual_seed(s)])[0] for s in range(300)}
    assert drawn == support
    assert len(support) == 3
