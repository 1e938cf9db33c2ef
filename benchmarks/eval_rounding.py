"""`bitfold eval ppl` with plain min/max RTN beside the default searched ranges.

Registers, for this process only, a `<format>-minmax` twin of every int2-4 format (its layers
round with `quantize_rtn(..., rounding="minmax")`, its output layer too), then runs the bitfold
CLI with the given arguments, so both roundings are scored in lockstep on the same windows:

    python benchmarks/eval_rounding.py eval ppl --config fp32:weights=dense \\
        --config int4:weights=int4 --config int4-minmax:weights=int4-g64-minmax \\
        --context 512 --windows 16 --prefill 256 --batch 8 --out benchmarks/results
"""
from __future__ import annotations

import sys

import torch.nn.functional as F

from bitfold.cli import main
from bitfold.weights.base import WEIGHT_FORMATS
from bitfold.weights.lowbit import GROUPS, quantize_rtn


def _minmax_twin(name: str) -> None:
    base = WEIGHT_FORMATS.get(name)

    def load(self, layer, weight, row_offset):  # LowBitFormat.load with the plain rounding
        self._check_rows(layer, weight.shape, row_offset)
        w = F.pad(weight.float(), (0, layer.in_padded - weight.shape[1]))
        self.load_codes(layer, *quantize_rtn(w, self.spec, "minmax"), row_offset)

    twin = f"{name}-minmax"
    head = None if base.lm_head_format is None else f"{base.lm_head_format}-minmax"
    cls = type(twin.replace("-", "_"), (base,), {"load": load, "name": twin, "lm_head_format": head})
    WEIGHT_FORMATS.register(twin)(cls)


for _bits in (2, 3, 4):
    for _group in GROUPS:
        _minmax_twin(f"int{_bits}-g{_group}")

if __name__ == "__main__":
    sys.exit(main())
