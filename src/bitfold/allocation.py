"""Mixed precision for `bitfold quantize --bits-per-weight B`: which merged linears of the decoder
layers are stored in a wider format (`--upgrade-format`, default one bit more with the same
group) so that the average stored bits per weight is at most B.

Why: rounding does not hurt every linear alike (llama.cpp's k-quant mixes keep attn_v and
ffn_down wider by rule; SAIL and HAWQ measure). Here each merged linear (q|k|v, o, gate|up,
down of each layer: the unit bitfold runs as one matmul, whose shards must share a format) is
measured once, before any rounding (`calibration.measure_sensitivity`):

- its sensitivity r(F) estimates the noise that rounding it alone to nearest in format F leaves
  in the last layer's output (what the final RMSNorm reads), relative to that output:
  g_i ||delta||^2 / ||h_last||^2. delta is the change of what its block adds to the residual
  stream (o's output for q|k|v and o, down's for gate|up and down), measured in the base and the
  upgrade format on the float model's inputs over a few calibration sequences
  (SENSITIVITY_TOKENS tokens, layer by layer, nothing rounded in between); g_i, the gain of
  layer i's noise on its way to the last layer, is measured once per layer by running that
  layer's output with all its linears rounded in the base format through the remaining float
  layers beside the clean stream (GAIN_TOKENS tokens; (L^2)/2 layer forwards on them in all);
- upgrading it gains r(base) - r(upgrade) and costs the extra stored bits (codes + fp16 scale
  and min per group, `format_plan.stored_bits`);
- the greedy knapsack takes linears by gain per extra bit, best first (ties by layer, then
  q|k|v, o, gate|up, down), skipping any that would overshoot the budget, until none fits.

Why this measure: noises from independent roundings add in energy, so the sum of r over the
linears approximates the noise of the final hidden state, the quantity the plan lowers, and
gain per bit is the knapsack's ratio. How a layer's noise grows on its way is the part that
differs most between models and had to be measured: on SmolLM2-135M the noise of layer 0 arrives
733x larger, of layer 15 20x, of layer 28 1.6x (the residual stream grows by orders of
magnitude), while a tiny random model's layers amplify noise by their large random weights.
Three simpler measures were tried first. The linear's own relative output error
||X (W - Q)^T||^2 / ||X W^T||^2 ignores how much of the residual a linear writes (on a tiny
model with two salient channels planted in one gate|up it spent the budget on small linears and
never upgraded that one). On SmolLM2-135M, GPTQ int3-g64 -> int4-g64 at 4.0 bits per weight
(uniform int3 +183% perplexity, int4 +34%; 16 windows x 512): the noise relative to the residual
where it is added (gain taken as the growth of the residual) upgraded all of layers 0-11:
+76.9%, KL 0.62; the noise relative to the last residual (gain 1) upgraded the last layers and
q|k|v throughout: +64.9%, KL 0.52 (benchmarks/results/eval-ppl-smollm2-mixed-calibrated-
20261204-232917); the measured gain: +49.1%, KL 0.42, top-1 agreement 66%
(eval-ppl-smollm2-mixed-gain-20261204-234253). RTN's error stands in for GPTQ's (which lowers
both formats' errors by similar factors) and the float model's inputs for the partly-quantized
model's: both are knowable before layer 0 is rounded. The plan is deterministic for a given
checkpoint, calibration sample and thread count (float sums can move a near-tie between two
linears across thread counts).
"""
from __future__ import annotations

from dataclasses import dataclass

from bitfold.errors import BitfoldError
from bitfold.models.format_plan import KINDS, stored_bits
from bitfold.weights.lowbit import LowBitSpec, lowbit_spec


@dataclass(frozen=True)
class MixedConfig:
    bits_per_weight: float  # budget: average stored bits per weight over the decoder linears
    upgrade: str | None = None  # the wider format; None: one bit more than the base, same group


@dataclass(frozen=True)
class LinearError:
    """One merged linear's measurement: [rows, cols] weight, relative output error of RTN in the
    base and in the upgrade format."""

    layer: int
    kind: str  # one of format_plan.KINDS
    rows: int
    cols: int
    base_error: float
    upgrade_error: float


@dataclass
class Allocation:
    overrides: dict  # {(layer, kind): upgrade format name}
    bits_per_weight: float  # achieved, over the decoder linears
    budget: float
    base: LowBitSpec
    upgrade: LowBitSpec
    base_bits: float  # every decoder linear in the base format
    upgrade_bits: float  # every one in the upgrade format
    linears: int
    seconds: float = 0.0  # the measurement's

    def lines(self) -> list[str]:
        by_kind = {k: sum(1 for (_, kind) in self.overrides if kind == k) for k in KINDS}
        layers: dict[int, list[str]] = {}
        for i, kind in self.overrides:
            layers.setdefault(i, []).append(kind)
        return [
            f"[bitfold] mixed precision: {len(self.overrides)} of {self.linears} merged linears in {self.upgrade.name} "
            f"({', '.join(f'{k} {n}' for k, n in by_kind.items() if n)}), {self.bits_per_weight:.3f} bits per weight "
            f"over the decoder linears (budget {self.budget:g}; all {self.base.name}: {self.base_bits:.3f}, all "
            f"{self.upgrade.name}: {self.upgrade_bits:.3f})",
            f"[bitfold]   {self.upgrade.name}: " + ("  ".join(f"{i}:{','.join(k)}" for i, k in sorted(layers.items()))
                                                  or "none"),
        ]


def upgrade_spec(base: LowBitSpec, upgrade: str | None) -> LowBitSpec:
    """The upgrade format's spec: `upgrade`, or int(N+1) with the base's group; BitfoldError when
    it is not a low-bit format that stores more bits per weight than `base`."""
    from bitfold.weights import WEIGHT_FORMATS

    if upgrade is None:
        if base.ternary or base.group == 0:
            raise BitfoldError(f"--format {base.name}: no default --upgrade-format; name one (e.g. int4-g64)")
        upgrade = f"int{base.bits + 1}-g{base.group}"
        if upgrade not in WEIGHT_FORMATS:
            raise BitfoldError(f"--format {base.name}: one bit more would be {upgrade}, which bitfold has no format "
                               "for; name one with --upgrade-format")
    spec = lowbit_spec(upgrade) if upgrade in WEIGHT_FORMATS else None
    if spec is None:
        raise BitfoldError(f"--upgrade-format {upgrade!r} is not a low-bit format (e.g. int4-g64)")
    if spec.bits_per_weight <= base.bits_per_weight:
        raise BitfoldError(f"--upgrade-format {spec.name} stores {spec.bits_per_weight:g} bits per weight, no more "
                           f"than --format {base.name} ({base.bits_per_weight:g}); choose a wider one")
    return spec


def decoder_linears(model) -> list[tuple[int, str, int, int]]:
    """(layer, kind, rows, cols) of every merged decoder linear of a (meta) model."""
    out = []
    for i, layer in enumerate(model.layers):
        for kind, lin in zip(KINDS, (layer.attn.qkv, layer.attn.o, layer.mlp.gate_up, layer.mlp.down)):
            out.append((i, kind, lin.out_features, lin.in_features))
    return out


def average_bits(shapes, spec: LowBitSpec) -> float:
    """Stored bits per weight of every (.., rows, cols) in `shapes` in `spec`."""
    return sum(stored_bits(spec, r, c) for *_, r, c in shapes) / sum(r * c for *_, r, c in shapes)


def check_budget(shapes, base: LowBitSpec, upgrade: LowBitSpec, budget: float) -> None:
    lo, hi = average_bits(shapes, base), average_bits(shapes, upgrade)
    if not lo < budget < hi:
        raise BitfoldError(f"--bits-per-weight {budget:g}: this model's decoder linears store {lo:.3f} bits per weight "
                           f"as {base.name} and {hi:.3f} as {upgrade.name} (codes + an fp16 scale and min per group); "
                           "ask for a value between them")


def allocate(linears: list[LinearError], base: LowBitSpec, upgrade: LowBitSpec, budget: float) -> Allocation:
    """The greedy plan (see the module docstring): {(layer, kind): upgrade.name} for the linears
    upgraded, at most `budget` stored bits per weight on average over all of `linears`."""
    weights = sum(x.rows * x.cols for x in linears)
    bits = sum(stored_bits(base, x.rows, x.cols) for x in linears)
    limit = budget * weights

    def extra(x: LinearError) -> int:
        return stored_bits(upgrade, x.rows, x.cols) - stored_bits(base, x.rows, x.cols)

    def key(x: LinearError):
        return (-(x.base_error - x.upgrade_error) / extra(x), x.layer, KINDS.index(x.kind))

    overrides = {}
    for x in sorted(linears, key=key):
        if x.base_error - x.upgrade_error <= 0:
            break  # sorted by gain: nothing after this one gains either
        if bits + extra(x) <= limit:
            overrides[(x.layer, x.kind)] = upgrade.name
            bits += extra(x)
    shapes = [(x.rows, x.cols) for x in linears]
    return Allocation(dict(sorted(overrides.items())), bits / weights, budget, base, upgrade,
                      average_bits(shapes, base), average_bits(shapes, upgrade), len(linears))
