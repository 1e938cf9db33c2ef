"""Searched ranges for round-to-nearest (`quantize_rtn(..., rounding="search")`) against plain
min/max RTN: never a larger error per group, clearly lower on heavy-tailed data, codes against
the stored fp16 scale and min, and the edge cases (constant, zero, tiny, huge groups)."""
import pytest
import torch

import bitfold.weights.lowbit as lowbit
from bitfold.weights.lowbit import GROUPS, ROUNDINGS, LowBitSpec, dequantize, quantize_rtn

INT_SPECS = [LowBitSpec(b, g) for b in (2, 3, 4) for g in GROUPS]


def group_errors(w: torch.Tensor, spec: LowBitSpec, rounding: str) -> torch.Tensor:
    """float64 squared error per group [N, G] of w as stored by `rounding`."""
    q, s, m = quantize_rtn(w, spec, rounding)
    r = dequantize(q, s, m, spec.group).double() - w.double()
    return r.pow(2).view(w.shape[0], -1, spec.group).sum(-1)


def heavy_tailed(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Student-t (3 degrees of freedom) weights: a few outliers per group stretch min/max."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return torch.distributions.StudentT(3.0).sample((rows, cols)) * 0.02


def test_default_is_search_and_unknown_rounding_is_refused():
    assert ROUNDINGS[0] == "search" and "minmax" in ROUNDINGS
    with pytest.raises(ValueError, match="unknown rounding"):
        quantize_rtn(torch.zeros(2, 64), LowBitSpec(4, 64), "nearest")


@pytest.mark.parametrize("spec", INT_SPECS, ids=lambda s: s.name)
@pytest.mark.parametrize("data", ["normal", "uniform", "heavy"])
def test_never_worse_than_minmax_per_group(spec, data):
    torch.manual_seed(spec.bits * 100 + spec.group)
    w = {"normal": lambda: torch.randn(48, 4 * spec.group) * 0.03,
         "uniform": lambda: torch.rand(48, 4 * spec.group) - 0.5,
         "heavy": lambda: heavy_tailed(48, 4 * spec.group, spec.group)}[data]()
    plain, searched = group_errors(w, spec, "minmax"), group_errors(w, spec, "search")
    assert (searched <= plain).all()


@pytest.mark.parametrize("spec,gain", [(LowBitSpec(4, 64), 0.1), (LowBitSpec(4, 32), 0.15),
                                       (LowBitSpec(3, 64), 0.15), (LowBitSpec(2, 64), 0.3)],
                         ids=lambda x: getattr(x, "name", ""))
def test_clearly_lower_on_heavy_tailed_weights(spec, gain):
    """Outliers stretch a group's [min, max]; shrinking the grid past them (and clamping them)
    costs less than the coarse step everywhere else. Measured gains are larger than `gain`
    (the relative reduction of the total squared error), and most groups improve strictly."""
    w = heavy_tailed(64, 16 * spec.group, 7)
    plain, searched = group_errors(w, spec, "minmax"), group_errors(w, spec, "search")
    assert searched.sum() < (1 - gain) * plain.sum(), (searched.sum() / plain.sum()).item()
    assert (searched < plain).float().mean() > 0.8


@pytest.mark.parametrize("spec", INT_SPECS, ids=lambda s: s.name)
def test_codes_are_nearest_to_the_stored_grid(spec):
    """q is in range and is, weight by weight, the nearest code on the grid the stored fp16
    scale and min define: dequantizing what is stored gives what the search scored."""
    w = heavy_tailed(16, 3 * spec.group, spec.bits)
    q, s, m = quantize_rtn(w, spec)
    assert q.dtype == torch.uint8 and int(q.max()) <= 2**spec.bits - 1
    assert s.dtype == m.dtype == torch.float16 and bool((s > 0).all())
    g = w.view(16, 3, spec.group)
    sf, mf = s.float()[..., None], m.float()[..., None]
    nearest = ((g - mf) / sf).round().clamp(0, 2**spec.bits - 1)
    assert torch.equal(q.view(16, 3, spec.group).float(), nearest)
    # no other code of that grid is closer (up to float32 rounding of the distance)
    levels = torch.arange(2**spec.bits, dtype=torch.float32)
    dist = (levels * sf[..., None] + mf[..., None] - g[..., None]).abs()  # [16, 3, group, levels]
    chosen = dist.gather(-1, q.view(16, 3, spec.group, 1).long())[..., 0]
    assert (chosen <= dist.amin(-1) * (1 + 1e-6) + 1e-12).all()


def test_deterministic_chunk_and_shard_independent(monkeypatch):
    """Each group is quantized alone: the same codes for a slice of rows, for another chunk size,
    and on a second call (load quantizes shard by shard; bitfold quantize whole tensors)."""
    spec = LowBitSpec(3, 32)
    w = heavy_tailed(96, 320, 3)
    whole = quantize_rtn(w, spec)
    assert all(torch.equal(a, b) for a, b in zip(whole, quantize_rtn(w, spec)))
    part = quantize_rtn(w[40:71], spec)
    assert all(torch.equal(a[40:71], b) for a, b in zip(whole, part))
    monkeypatch.setattr(lowbit, "CHUNK", 100)  # a chunk of 3 groups, the last one partial
    assert all(torch.equal(a, b) for a, b in zip(whole, quantize_rtn(w, spec)))


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_edge_groups(rounding):
    """Constant groups (zero, fp16-exact, not fp16-exact), two-valued ones, a lone outlier,
    tiny (fp16-subnormal scale) and huge (near fp16's max) magnitudes: finite, in range,
    never worse than min/max."""
    spec = LowBitSpec(4, 16)
    rows = [torch.zeros(16), torch.full((16,), 0.5), torch.full((16,), 0.1), torch.full((16,), -3e-7),
            torch.tensor([-0.5, 0.4375] * 8), torch.cat([torch.zeros(15), torch.tensor([3.75])]),
            torch.linspace(-1e-6, 1e-6, 16), torch.linspace(-6e4, 6e4, 16), torch.linspace(-6.5e4, 6.5e4, 16),
            torch.randn(16) * 1e4]
    w = torch.stack(rows)
    q, s, m = quantize_rtn(w, spec, rounding)
    deq = dequantize(q, s, m, spec.group)
    assert int(q.max()) <= 15 and torch.isfinite(deq).all()
    err = group_errors(w, spec, rounding)[:, 0]
    assert torch.equal(deq[0], w[0]) and torch.equal(deq[1], w[1])  # exact where fp16 holds it
    assert err[2] == (w[2].double() - w[2].half().double()).pow(2).sum()  # only the min's fp16 rounding
    assert torch.equal(deq[4], w[4]) and torch.equal(deq[5], w[5])  # two values, both on an fp16 grid
    assert (err <= group_errors(w, spec, "minmax")[:, 0]).all()


def test_int1_and_ternary_ignore_the_rounding():
    w = torch.randn(8, 128)
    for spec in (LowBitSpec(1, 64), LowBitSpec(2, 64, ternary=True)):
        a, b = quantize_rtn(w, spec, "minmax"), quantize_rtn(w, spec, "search")
        assert all(torch.equal(x, y) for x, y in zip(a, b))
