"""FormatPlan: a model built with per-linear formats gets each merged Linear in its planned format
(its codes are the checkpoint's weights rounded in that format, its matmul is theirs), a plain
format name still builds every Linear alike, and bad plans are refused."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from bitfold.layers.linear import Linear
from bitfold.loader import open_model
from bitfold.models import MODELS
from bitfold.models.format_plan import KINDS, MERGED_LINEARS, FormatPlan, describe_weights
from bitfold.weights.lowbit import dequantize, lowbit_spec, quantize_rtn

PLAN = FormatPlan("int3-g64", {(0, "qkv"): "int4-g64", (1, "down"): "int8", (2, "gate_up"): "int2-g32",
                               (2, "o"): "int3-g64"})


def build(folder, fmt):
    src = open_model(str(folder))
    cls = MODELS.get(src.config.architecture)
    cfg = dataclasses.replace(src.config, **cls.config_overrides)
    model = cls(cfg, torch.float32, max_positions=64, fmt=fmt)
    model.load_weights(src.weights(), src.path)
    return model, dict(src.weights())


def merged(model, i: int, kind: str) -> Linear:
    layer = model.layers[i]
    return {"qkv": layer.attn.qkv, "o": layer.attn.o, "gate_up": layer.mlp.gate_up, "down": layer.mlp.down}[kind]


def test_plan_lookup_and_validation():
    assert PLAN.format(0, "qkv") == "int4-g64" and PLAN.format(0, "o") == "int3-g64"
    assert PLAN.format(5, "down") == "int3-g64" and PLAN.head_format() == "int4-g64"  # int3's head rule
    assert FormatPlan("int4-g64", lm_head="int8").head_format() == "int8-ch"
    assert FormatPlan.of("int2") == FormatPlan("int2") and FormatPlan.of(PLAN) is PLAN
    assert PLAN.mixed and not FormatPlan("int3-g64", {(0, "o"): "int3-g64"}).mixed
    assert str(PLAN) == "int3-g64 (1 linears int2-g32, 1 linears int3-g64, 1 linears int4-g64, 1 linears int8-ch)"
    assert PLAN.format(1, "down") == "int8-ch" and FormatPlan("int4").default == "int4-g64"  # registered names
    with pytest.raises(ValueError, match="unknown weight format 'int7'"):
        FormatPlan("int3-g64", {(0, "o"): "int7"})
    with pytest.raises(ValueError, match="expected \\(layer index >= 0, one of qkv, o, gate_up, down\\)"):
        FormatPlan("int3-g64", {(0, "q"): "int4"})
    with pytest.raises(ValueError, match="layer index"):
        FormatPlan("int3-g64", {(-1, "o"): "int4"})
    with pytest.raises(ValueError, match="unknown linear kind"):
        PLAN.format(0, "lm_head")
    with pytest.raises(ValueError, match="overrides layer 7, but the model has 3 layers"):
        FormatPlan("int3-g64", {(7, "o"): "int4"}).check_layers(3)


def test_each_linear_is_built_and_loaded_in_its_planned_format(tiny_model_dir):
    """Codes of each merged Linear = quantize_rtn of its shards' checkpoint weights in the planned
    spec, and its matmul is that dequantized weight's (the LUT kernel's int8 activation tables
    within 2%); a wrong format would miss both (different bit widths round differently)."""
    model, weights = build(tiny_model_dir, PLAN)
    torch.manual_seed(0)
    for i in range(3):
        for kind in KINDS:
            lin = merged(model, i, kind)
            spec = lowbit_spec(PLAN.format(i, kind))
            assert lin.fmt.spec == spec, (i, kind)
            w = torch.cat([weights[f"model.layers.{i}.{n}.weight"] for n in MERGED_LINEARS[kind]]).float()
            wp = torch.nn.functional.pad(w, (0, lin.in_padded - lin.in_features))
            q, s, m = lin.fmt.codes(lin)
            q0, s0, m0 = quantize_rtn(wp, spec)
            assert torch.equal(q, q0) and torch.equal(s, s0) and torch.equal(m, m0), (i, kind)
            x = torch.randn(3, lin.in_features)
            ref = x.double() @ dequantize(q0, s0, m0, spec.group_size(lin.in_padded))[:, :lin.in_features].double().t()
            if lin.bias is not None:
                ref += lin.bias.double()
            assert (lin(x).double() - ref).norm() <= 0.02 * ref.norm(), (i, kind)
    assert model.lm_head.fmt.spec == lowbit_spec("int4-g64")
    text = describe_weights(model)
    assert text.startswith("weights: decoder linears mixed int3-g64 (") and "int8-ch (" in text and "int2-g32 (" in text
    assert "bits per weight; lm_head int4-g64" in text


def test_a_format_name_still_builds_every_linear_alike(tiny_model_dir):
    model, _ = build(tiny_model_dir, "int2")
    assert {type(m.fmt).__name__ for m in model.modules() if isinstance(m, Linear)} == {"LowBit_int2_g64",
                                                                                      "LowBit_int4_g64"}
    # per layer: 43008 weights; int2-g64 codes + 32 bits per group of 64, down's 160 inputs padded
    # to 192: (128 + 64 + 320) * (2 * 64 + 32) + 64 * (2 * 192 + 3 * 32) = 112640 bits
    assert describe_weights(model) == "weights: decoder linears int2-g64, 2.62 bits per weight; lm_head int4-g64"
    with pytest.raises(ValueError, match="overrides layer 3, but the model has 3 layers"):
        build(tiny_model_dir, FormatPlan("int2", {(3, "o"): "int4"}))
