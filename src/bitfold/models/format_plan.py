"""Which weight format each Linear of a decoder model is built in.

A model takes either one format name for every Linear (what `--weights` gives) or a
`FormatPlan`: a default format plus overrides per merged linear of a decoder layer, the unit
bitfold runs as one matmul (q|k|v, o, gate|up, down). The shards of a merged linear share one
Linear and hence one format, so a plan cannot split them; this is the granularity of mixed
precision (more bits where rounding costs most, as llama.cpp's k-quant mixes and SAIL do).
`bitfold quantize --bits-per-weight` chooses such a plan (`bitfold/allocation.py`) and records
it in the checkpoint; `loader/hf.py` reads it back and `plan_for` hands it to the model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

# merged linear kind -> its checkpoint shards (HF module names within a decoder layer), in row order
MERGED_LINEARS: dict[str, tuple[str, ...]] = {
    "qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "o": ("self_attn.o_proj",),
    "gate_up": ("mlp.gate_proj", "mlp.up_proj"),
    "down": ("mlp.down_proj",),
}
KINDS = tuple(MERGED_LINEARS)
SHARD_KIND = {shard: kind for kind, shards in MERGED_LINEARS.items() for shard in shards}


@dataclass(frozen=True)
class FormatPlan:
    """default: the format of every Linear not overridden; overrides: {(layer index, kind):
    format} with kind one of KINDS; lm_head: the output layer's format (None: the default
    format's own choice, `lm_head_format`, e.g. int4-g64 under int3-g64)."""

    default: str
    overrides: Mapping[tuple[int, str], str] = field(default_factory=dict)
    lm_head: str | None = None

    def __post_init__(self):
        from bitfold.weights import WEIGHT_FORMATS

        for name in (self.default, self.lm_head, *self.overrides.values()):
            if name is not None and name not in WEIGHT_FORMATS:
                raise ValueError(f"unknown weight format {name!r}; known: {', '.join(WEIGHT_FORMATS.names())}")
        for key in self.overrides:
            if not (isinstance(key, tuple) and len(key) == 2 and isinstance(key[0], int) and key[0] >= 0
                    and key[1] in KINDS):
                raise ValueError(f"format plan key {key!r}: expected (layer index >= 0, one of {', '.join(KINDS)})")
        # aliases by their registered name (int4 -> int4-g64), so equal plans compare equal
        canonical = lambda name: name and getattr(WEIGHT_FORMATS.get(name), "name", name)  # noqa: E731
        object.__setattr__(self, "default", canonical(self.default))
        object.__setattr__(self, "lm_head", canonical(self.lm_head))
        object.__setattr__(self, "overrides", {k: canonical(v) for k, v in sorted(self.overrides.items())})

    @classmethod
    def of(cls, fmt: str | FormatPlan) -> FormatPlan:
        return fmt if isinstance(fmt, FormatPlan) else cls(fmt)

    def format(self, layer: int, kind: str) -> str:
        """The format of layer `layer`'s merged linear `kind`."""
        if kind not in KINDS:
            raise ValueError(f"unknown linear kind {kind!r}; known: {', '.join(KINDS)}")
        return self.overrides.get((layer, kind), self.default)

    def head_format(self) -> str:
        from bitfold.weights import WEIGHT_FORMATS

        return self.lm_head or getattr(WEIGHT_FORMATS.get(self.default), "lm_head_format", None) or self.default

    def check_layers(self, num_layers: int) -> None:
        beyond = [k for k in self.overrides if k[0] >= num_layers]
        if beyond:
            raise ValueError(f"format plan overrides layer {beyond[0][0]}, but the model has {num_layers} layers")

    @property
    def mixed(self) -> bool:
        return any(f != self.default for f in self.overrides.values())

    def __str__(self) -> str:
        if not self.overrides:
            return self.default
        counts: dict[str, int] = {}
        for f in self.overrides.values():
            counts[f] = counts.get(f, 0) + 1
        return f"{self.default} ({', '.join(f'{n} linears {f}' for f, n in sorted(counts.items()))})"


def plan_for(fmt: str, overrides: Mapping[tuple[int, str], str], device_type: str) -> str | FormatPlan:
    """What a model is built with: `fmt` (resolved by weights.base.resolve_weight_format) with
    the checkpoint's per-linear `overrides` applied when `fmt` keeps its stored codes (it is the
    checkpoint's own low-bit format); dense (dequantizing everything) ignores them."""
    if not overrides or fmt == "dense":
        return fmt
    from bitfold.errors import BitfoldError
    from bitfold.weights import WEIGHT_FORMATS

    for name in sorted(set(overrides.values())):
        devices = getattr(WEIGHT_FORMATS.get(name), "devices", None)
        if devices is not None and device_type not in devices:
            raise BitfoldError(f"the checkpoint stores some linears as {name}, which runs on {', '.join(devices)} "
                               f"only; use --device {devices[0]} or --weights dense")
    return FormatPlan(fmt, overrides)


def stored_bits(spec, rows: int, cols: int) -> int:
    """Bits a `bitfold quantize` checkpoint stores for a [rows, cols] weight in low-bit `spec`:
    the codes over the inputs padded to whole groups plus an fp16 scale and an fp16 min per
    group (every spec stores both, see quantize.py)."""
    padded = spec.padded(cols)
    return rows * (spec.bits * padded + 32 * (padded // spec.group_size(padded)))


def linear_formats(model) -> dict[str, tuple[int, int]]:
    """{format name: (weights, stored bits or 0 for a format without a low-bit spec)} over a
    model's decoder-layer Linears."""
    from bitfold.weights.lowbit import lowbit_spec

    out: dict[str, tuple[int, int]] = {}
    for layer in model.layers:
        for lin in (layer.attn.qkv, layer.attn.o, layer.mlp.gate_up, layer.mlp.down):
            spec = lowbit_spec(lin.fmt.name)
            n, b = out.get(lin.fmt.name, (0, 0))
            out[lin.fmt.name] = (n + lin.in_features * lin.out_features,
                                 b + (stored_bits(spec, lin.out_features, lin.in_features) if spec else 0))
    return out


def describe_weights(model) -> str:
    """One line (what -v logs at load): the decoder linears' formats with each one's share of the
    weights, their average stored bits per weight (codes + scales and mins) when all are low-bit,
    and the output layer's format."""
    counts = linear_formats(model)
    total = sum(n for n, _ in counts.values())
    if len(counts) == 1:
        text = next(iter(counts))
    else:
        text = "mixed " + " + ".join(f"{f} ({100 * n / total:.0f}%)"
                                     for f, (n, _) in sorted(counts.items(), key=lambda kv: -kv[1][0]))
    if all(b for _, b in counts.values()):
        text += f", {sum(b for _, b in counts.values()) / total:.2f} bits per weight"
    head = model.lm_head.fmt.name if model.lm_head is not None else "the embedding (tied)"
    return f"weights: decoder linears {text}; lm_head {head}"
