"""Mixed precision (`bitfold quantize --bits-per-weight`): the allocation (budget, order, edge
cases) on synthetic measurements; on a tiny random llama with one linear made clearly sensitive
(two salient input channels folded into RMSNorm: the same float function, but those channels'
weights SCALE x finer than the rounding grid), the plan upgrades it first and keeps the budget; the
checkpoint loads with each Linear in its planned format, with the stored codes, and its logits
equal a float64 transformers model built from each linear's dequantized codes; bad overrides are
refused with one line naming config.json and the field; a checkpoint without overrides is the
uniform one it always was."""
from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from bitfold import LLM
from bitfold.allocation import LinearError, MixedConfig, allocate, check_budget, upgrade_spec
from bitfold.calibration import CalibConfig
from bitfold.cli import main
from bitfold.errors import BitfoldError, ModelLoadError
from bitfold.loader import open_model
from bitfold.models.format_plan import KINDS, MERGED_LINEARS, stored_bits
from bitfold.quantize import quantize
from bitfold.weights.lowbit import dequantize, lowbit_spec
from bitfold.weights.packed import unpack_bitplanes
from tests.helpers import rel_err
from tests.test_quantize import linears, logits, runner

INT3, INT4 = lowbit_spec("int3-g64"), lowbit_spec("int4-g64")
SALIENT = (1, "gate_up")
BUDGET = 3.9  # int3-g64 alone: 3.667 on the tiny model (down pads 160 inputs to 192); room for the gate|up
IDS = list(range(3, 300, 13))
SCALE = 16.0


# ---- the allocation on synthetic measurements ------------------------------------------------

def _errors(seed: int, layers: int = 6) -> list[LinearError]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"qkv": (96, 64), "o": (64, 64), "gate_up": (320, 64), "down": (64, 160)}
    out = []
    for i in range(layers):
        for k in KINDS:
            b = float(torch.rand((), generator=g)) * 0.05
            out.append(LinearError(i, k, *shapes[k], b, b * float(torch.rand((), generator=g))))
    return out


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("budget", [3.7, 3.9, 4.2, 4.6])
def test_allocation_keeps_the_budget_and_takes_the_best_gain_per_bit(seed, budget):
    errs = _errors(seed)
    a = allocate(errs, INT3, INT4, budget)
    weights = sum(e.rows * e.cols for e in errs)
    bits = sum(stored_bits(INT4 if (e.layer, e.kind) in a.overrides else INT3, e.rows, e.cols) for e in errs)
    assert bits / weights == pytest.approx(a.bits_per_weight) and a.bits_per_weight <= budget
    assert set(a.overrides.values()) <= {"int4-g64"}
    extra = {(e.layer, e.kind): stored_bits(INT4, e.rows, e.cols) - stored_bits(INT3, e.rows, e.cols) for e in errs}
    ratio = {(e.layer, e.kind): (e.base_error - e.upgrade_error) / extra[(e.layer, e.kind)] for e in errs}
    base = sum(stored_bits(INT3, e.rows, e.cols) for e in errs)
    assert all(ratio[k] > 0 for k in a.overrides)
    # the greedy order, characterized: a linear left out that gains was, when its turn came (after
    # every upgraded one of a better ratio), too big for the room left
    for k in ratio:
        if k not in a.overrides and ratio[k] > 0:
            before = sum(extra[j] for j in a.overrides if ratio[j] > ratio[k])
            assert base + before + extra[k] > budget * weights, k
    assert allocate(list(reversed(errs)), INT3, INT4, budget).overrides == a.overrides  # order-independent


def test_allocation_skips_what_gains_nothing_and_breaks_ties_by_position():
    e = [LinearError(0, "o", 64, 64, 0.01, 0.01), LinearError(1, "o", 64, 64, 0.02, 0.01),
         LinearError(0, "qkv", 64, 64, 0.02, 0.01), LinearError(2, "o", 64, 64, 0.01, 0.03)]
    a = allocate(e, INT3, INT4, 4.5)  # room for everything
    assert list(a.overrides) == [(0, "qkv"), (1, "o")]  # no gain, negative gain: left alone
    one = stored_bits(INT3, 64, 64) + (stored_bits(INT4, 64, 64) - stored_bits(INT3, 64, 64)) / 4
    a = allocate(e, INT3, INT4, one / (64 * 64))  # room for exactly one upgrade: the tie goes to layer 0
    assert list(a.overrides) == [(0, "qkv")] and a.bits_per_weight == pytest.approx(one / (64 * 64))
    assert a.lines()[1] == "[bitfold]   int4-g64: 0:qkv"


def test_upgrade_format_and_budget_checks():
    assert upgrade_spec(INT3, None) == INT4 and upgrade_spec(lowbit_spec("int2-g32"), None).name == "int3-g32"
    assert upgrade_spec(INT3, "int8").name == "int8-ch"
    for base, up, needle in ((INT3, "int3-g128", "stores 3.25 bits per weight, no more than --format int3-g64"),
                             (INT3, "nf4", "'nf4' is not a low-bit format"),
                             (lowbit_spec("int6-g64"), None, "would be int7-g64, which bitfold has no format for"),
                             (lowbit_spec("ternary-g64"), None, "no default --upgrade-format")):
        with pytest.raises(BitfoldError, match=needle):
            upgrade_spec(base, up)
    shapes = [(0, "o", 64, 64)]
    check_budget(shapes, INT3, INT4, 4.0)
    for b in (3.5, 4.5, 5.0, 2.0):
        with pytest.raises(BitfoldError, match="store 3.500 bits per weight as int3-g64 and 4.500 as int4-g64"):
            check_budget(shapes, INT3, INT4, b)


# ---- the measurement ---------------------------------------------------------------------------

def test_sensitivity_of_the_last_layer_against_transformers(tiny_model_dir):
    """The last layer's noise reaches the output as it is (gain 1): its o and down sensitivities
    are ||x (W - Q)^T||^2 / ||h_last||^2 with x and h_last from transformers' own forward (hooks)."""
    import dataclasses

    import transformers

    from bitfold.calibration import CalibData, LayerRunner, measure_sensitivity
    from bitfold.models import MODELS
    from bitfold.weights.lowbit import quantize_rtn

    src = open_model(str(tiny_model_dir))
    cfg = dataclasses.replace(src.config, **MODELS.get(src.config.architecture).config_overrides)
    tokens = torch.randint(0, 320, (4, 32), generator=torch.Generator().manual_seed(5))
    errs = {(e.layer, e.kind): e for e in measure_sensitivity(CalibData(tokens, LayerRunner(cfg, dict(src.weights()),
                                                                                             32)), INT3, INT4)}
    assert len(errs) == 12 and all(0 < e.upgrade_error < e.base_error for e in errs.values())
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float64).eval()
    seen = {}
    last = hf.model.layers[-1]
    hooks = [last.self_attn.o_proj.register_forward_hook(lambda m, a, o: seen.update(o=a[0])),
             last.mlp.down_proj.register_forward_hook(lambda m, a, o: seen.update(down=a[0])),
             last.register_forward_hook(lambda m, a, o: seen.update(h=o[0] if isinstance(o, tuple) else o))]
    with torch.no_grad():
        hf(tokens)
    for h in hooks:
        h.remove()
    final = seen["h"].pow(2).sum()
    for kind, lin in (("o", last.self_attn.o_proj), ("down", last.mlp.down_proj)):
        w = lin.weight.detach().float()
        for spec, got in ((INT3, errs[(2, kind)].base_error), (INT4, errs[(2, kind)].upgrade_error)):
            wp = torch.nn.functional.pad(w, (0, spec.padded(w.shape[1]) - w.shape[1]))
            wq = dequantize(*quantize_rtn(wp, spec), spec.group)[:, :w.shape[1]]
            want = float((seen[kind] @ (w - wq).double().t()).pow(2).sum() / final)
            assert got == pytest.approx(want, rel=1e-3), (kind, spec.name)


# ---- a tiny model with one clearly sensitive linear ------------------------------------------

@pytest.fixture(scope="module")
def calib_tokens():
    """The tiny model's 320 ids cannot embed SmolLM2's tokenizer's ids: calibrate on random ids."""
    import bitfold.calibration as calibration

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(calibration, "calibration_tokens", lambda tok, docs, samples, length, seed: torch.randint(
            0, 320, (samples, length), generator=torch.Generator().manual_seed(seed)))
        yield


@pytest.fixture(scope="module")
def salient_dir(tiny_model_dir, tmp_path_factory):
    """tiny_model_dir with layer 1's MLP input channels 5 and 17 scaled SCALE x in the RMSNorm
    weight and 1/SCALE in gate and up: the float function is unchanged, but rounding those
    weights on a grid set by the others costs SCALE x in output (AWQ's salient channels)."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path_factory.mktemp("salient")
    for f in tiny_model_dir.iterdir():
        shutil.copy(f, folder / f.name)
    t = load_file(str(folder / "model.safetensors"))
    for ch in (5, 17):
        t["model.layers.1.post_attention_layernorm.weight"][ch] *= SCALE
        for n in ("gate_proj", "up_proj"):
            t[f"model.layers.1.mlp.{n}.weight"][:, ch] /= SCALE
    save_file(t, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def mixed_gptq(salient_dir, calib_tokens, tmp_path_factory):
    out = tmp_path_factory.mktemp("mixed") / "gptq"
    s = quantize(str(salient_dir), "int3-g64", str(out), calib=CalibConfig("gptq", samples=4, length=32),
                 mixed=MixedConfig(BUDGET))
    return out, s


@pytest.fixture(scope="module")
def mixed_plain(tiny_model_dir, calib_tokens, tmp_path_factory):
    """The unmodified tiny model, mixed: its activations have no SCALE x channels, which the CPU LUT
    kernel's int8 activation tables (one scale per row) would resolve poorly in the others."""
    out = tmp_path_factory.mktemp("mixed") / "plain"
    s = quantize(str(tiny_model_dir), "int3-g64", str(out), calib=CalibConfig("gptq", samples=4, length=32),
                 mixed=MixedConfig(BUDGET))
    assert 0 < len(s.allocation.overrides) < 12
    return out, s


def _qc(folder) -> dict:
    return json.loads((folder / "config.json").read_text())["quantization_config"]


def test_the_plan_upgrades_the_salient_linear_within_the_budget(mixed_gptq):
    out, s = mixed_gptq
    a = s.allocation
    assert SALIENT in a.overrides and a.bits_per_weight <= BUDGET and a.base_bits == pytest.approx(3.6667, abs=1e-4)
    assert a.linears == 12 and s.method == "gptq"
    qc = _qc(out)
    assert qc["format"] == "int3-g64" and qc["method"] == "gptq+rtn" and qc["lm_head_format"] == "int4-g64"
    assert qc["bits_per_weight"] == round(a.bits_per_weight, 4)
    assert qc["overrides"] == {f"model.layers.{i}.{shard}": "int4-g64" for (i, k) in a.overrides
                               for shard in MERGED_LINEARS[k]}
    assert qc["allocation"]["upgrade_format"] == "int4-g64" and qc["allocation"]["upgraded"] == len(a.overrides)
    assert "mixed:  " in "\n".join(s.lines())


def _file_codes(folder) -> dict:
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k.removesuffix(".qweight"): (unpack_bitplanes(f.get_tensor(k)), f.get_tensor(k[:-7] + "scales"),
                                              f.get_tensor(k[:-7] + "mins"))
                for k in f.keys() if k.endswith(".qweight")}


def test_mixed_checkpoint_loads_each_linear_in_its_format(mixed_plain, tiny_model_dir):
    """Each Linear in its planned format holding the file's codes; logits equal a float64
    transformers model whose every linear weight is its dequantized codes (within the LUT
    kernel's int8 activation tables; dequantized to dense, within float32)."""
    import transformers

    out, s = mixed_plain
    src = open_model(str(out))
    assert src.weight_format == "int3-g64" and src.format_overrides == s.allocation.overrides
    r = runner(out)
    lin = linears(r)
    codes = _file_codes(out)
    for i in range(3):
        for kind, name in zip(KINDS, ("attn.qkv", "attn.o", "mlp.gate_up", "mlp.down")):
            layer = lin[f"layers.{i}.{name}"]
            want = "int4-g64" if (i, kind) in s.allocation.overrides else "int3-g64"
            assert layer.fmt.spec == lowbit_spec(want), (i, kind)
            stored = [codes[f"model.layers.{i}.{shard}"] for shard in MERGED_LINEARS[kind]]
            for got, part in zip(layer.fmt.codes(layer), zip(*stored)):
                assert torch.equal(got, torch.cat(part)), (i, kind)
    assert lin["lm_head"].fmt.spec == INT4

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float64).eval()
    params = dict(hf.named_parameters())
    for base, (q, sc, mn) in codes.items():
        w = params[f"{base}.weight"]
        spec = INT4 if base == "lm_head" or "int4" in src.format_overrides.get(
            (int(base.split(".")[2]), _kind(base)), "") else INT3
        assert q.shape[1] == spec.padded(w.shape[1])
        with torch.no_grad():
            w.copy_(dequantize(q, sc, mn, spec.group)[:, :w.shape[1]].double())
    with torch.no_grad():
        ref = hf(torch.tensor([IDS])).logits[0]
    # the CPU LUT kernel rounds activations to int8 tables: 0.040 measured, where rounding to int3
    # at all moves these logits by 0.40; dequantized to dense, the same weights agree to float32
    assert rel_err(logits(r, IDS), ref) < 0.06
    assert rel_err(logits(runner(out, "dense"), IDS), ref) < 1e-5


def _kind(base: str) -> str:
    from bitfold.models.format_plan import SHARD_KIND

    return SHARD_KIND[base.split(".", 3)[3]]


def test_mixed_is_closer_to_the_float_model_than_uniform_int3(mixed_gptq, salient_dir, calib_tokens, tmp_path):
    """The point of the plan: the salient linear in 4 bits removes a good part of the damage."""
    out, _ = mixed_gptq
    uniform = tmp_path / "uniform"
    quantize(str(salient_dir), "int3-g64", str(uniform), calib=CalibConfig("gptq", samples=4, length=32))
    assert "overrides" not in _qc(uniform)
    ref = logits(runner(salient_dir, "dense"), IDS)
    # dense: the codes dequantized, so only weight rounding counts (the SCALE x activation channels
    # would also cost the CPU LUT kernel's int8 activation tables, the same for both)
    mixed_err = rel_err(logits(runner(out, "dense"), IDS), ref)
    uniform_err = rel_err(logits(runner(uniform, "dense"), IDS), ref)
    # by the measured residual noise (summed over the linears) the plan removes ~45% of the
    # energy, i.e. ~25% of the amplitude: 0.58 against 0.78 measured
    assert mixed_err < 0.8 * uniform_err, (mixed_err, uniform_err)


def test_fused_cpu_step_runs_the_mixed_layers(mixed_plain):
    """The fused CPU decode step takes each Linear's own bits (int3 and int4 share their padding)
    and matches the per-op path."""
    from bitfold.runner.cpu_step import why_not_model
    from tests.runner.test_cpu_step import TOL, Runner

    out, _ = mixed_plain
    fused, perop = Runner(out, "auto", True), Runner(out, "auto", False)
    assert why_not_model(fused.runner.model) is None
    prompts = [[1, 2, 3, 4, 5], [7, 8]]
    assert rel_err(fused.start(prompts), perop.start(prompts)) < TOL
    for t in ([9, 10], [11, 12], [13, 14]):
        assert rel_err(fused.decode(t), perop.decode(t)) < TOL


def test_rtn_mixed_from_the_cli(salient_dir, calib_tokens, tmp_path, capsys, caplog):
    """--method rtn --bits-per-weight: the text chooses the plan, rounding stays rtn; -v names the mix."""
    out = tmp_path / "rtn"
    assert main(["quantize", "--model", str(salient_dir), "--format", "int3-g64", "--bits-per-weight", str(BUDGET),
                 "--calib-samples", "4", "--calib-len", "32", "--out", str(out)]) == 0
    cap = capsys.readouterr()
    assert "mixed precision:" in cap.err and "sensitivity layer 3/3" in cap.err and "1:" in cap.err
    assert "mixed:" in cap.out
    qc = _qc(out)
    assert qc["method"] == "rtn" and "calibration" not in qc and "model.layers.1.mlp.gate_proj" in qc["overrides"]
    with caplog.at_level(logging.INFO, logger="bitfold"):
        LLM(str(out), device="cpu", num_kv_blocks=8, block_size=4)
    assert any("weights: decoder linears mixed int3-g64" in m and "bits per weight; lm_head int4-g64" in m
               for m in caplog.messages), caplog.messages


def test_cli_mixed_errors(capsys, salient_dir, tmp_path):
    for argv, needle in (
        (["--format", "int3-g64", "--bits-per-weight", "3.5"], "--bits-per-weight 3.5: this model's decoder linears "
                                                               "store 3.667 bits per weight as int3-g64"),
        (["--format", "int3-g64", "--bits-per-weight", "4.9"], "ask for a value between them"),
        (["--format", "int3-g64", "--upgrade-format", "int4-g64"], "give --bits-per-weight too"),
        (["--format", "int3-g64", "--bits-per-weight", "4", "--upgrade-format", "int2"], "no more than --format"),
        (["--format", "int3-g64", "--bits-per-weight", "4", "--upgrade-format", "dense"], "not a low-bit format"),
        (["--format", "int2-g64", "--bits-per-weight", "3", "--upgrade-format", "ternary-g16", "--method", "gptq"],
         "--method gptq cannot produce ternary-g16"),
    ):
        assert main(["quantize", "--model", str(salient_dir), "--out", str(tmp_path / "x"), *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("bitfold: error: ") and needle in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "x").exists()


# ---- config.json: overrides refused, or absent ------------------------------------------------

@pytest.fixture
def mixed_copy(mixed_gptq, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(mixed_gptq[0], dst)
    return dst


def _set_overrides(folder, change) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    change(cfg["quantization_config"])
    (folder / "config.json").write_text(json.dumps(cfg))


G = "model.layers.1.mlp.gate_proj"


@pytest.mark.parametrize("change,needle", [
    (lambda qc: qc.update(overrides=["int4"]), "quantization_config.overrides must be an object mapping linear "
                                               "names to formats"),
    (lambda qc: qc["overrides"].update({"model.layers.7.mlp.down_proj": "int4-g64"}),
     "key 'model.layers.7.mlp.down_proj' names layer 7, but the model has 3 layers"),
    (lambda qc: qc["overrides"].update({"model.layers.0.mlp.mystery": "int4-g64"}),
     "key 'model.layers.0.mlp.mystery' is not a decoder linear"),
    (lambda qc: qc["overrides"].update({"model.layers.01.mlp.down_proj": "int4-g64"}),
     "key 'model.layers.01.mlp.down_proj' is not a decoder linear"),  # the files never spell it so
    (lambda qc: qc["overrides"].update({"lm_head": "int8"}), "'lm_head' cannot be overridden"),
    (lambda qc: qc["overrides"].update({G: "int9-g64"}), f"overrides['{G}'] is 'int9-g64', not a bitfold low-bit"),
    (lambda qc: qc["overrides"].update({G: "dense"}), "not a bitfold low-bit format"),
    (lambda qc: qc["overrides"].update({G: "int3-g64"}), f"'{G}' is int3-g64 but 'model.layers.1.mlp.up_proj' "
                                                         "is int4-g64; gate_proj / up_proj run as one matmul"),
    (lambda qc: qc["overrides"].pop("model.layers.1.mlp.up_proj"),
     "'model.layers.1.mlp.up_proj' is not listed (so int3-g64)"),
    (lambda qc: qc.update(bits_per_weight="lots"), "bits_per_weight is 'lots'"),
])
def test_bad_overrides_are_refused_in_one_line(mixed_copy, change, needle):
    _set_overrides(mixed_copy, change)
    with pytest.raises(ModelLoadError) as e:
        open_model(str(mixed_copy))
    msg = str(e.value)
    assert msg.startswith(str(mixed_copy / "config.json") + ": quantization_config") and needle in msg, msg
    assert "\n" not in msg


def test_overrides_that_do_not_match_the_stored_planes_name_the_tensor(mixed_copy):
    _set_overrides(mixed_copy, lambda qc: qc["overrides"].update({G: "int2-g64", "model.layers.1.mlp.up_proj":
                                                                  "int2-g64"}))
    with pytest.raises(ModelLoadError) as e:
        runner(mixed_copy)
    msg = str(e.value)
    assert "model.safetensors" in msg and "model.layers.1.mlp." in msg and "stores 4 bit planes, but the " \
        "checkpoint's format int2-g64 has 2 bits (quantization_config.overrides)" in msg, msg


def test_a_checkpoint_without_overrides_loads_as_before(mixed_copy, salient_dir):
    """Uniform checkpoints carry no overrides (an empty object means the same) and load with one
    format name, exactly the model `--weights int3-g64` rounds at load."""
    from tests.test_quantize import assert_same_model

    out = mixed_copy.parent / "uniform"
    quantize(str(salient_dir), "int3-g64", str(out))
    qc = _qc(out)
    assert "overrides" not in qc and "allocation" not in qc and qc["bits_per_weight"] == 3.6667
    src = open_model(str(out))
    assert src.format_overrides == {} and src.stored_formats == ("int3-g64",)
    assert_same_model(runner(out), runner(salient_dir, "int3-g64"), IDS)
    _set_overrides(out, lambda qc: qc.update(overrides={}))
    assert open_model(str(out)).format_overrides == {}
    assert_same_model(runner(out), runner(salient_dir, "int3-g64"), IDS)
    # a mixed checkpoint asked for dense dequantizes every linear, whatever its format
    dense = linears(runner(mixed_copy, "dense"))
    assert {type(m.fmt).__name__ for m in dense.values()} == {"DenseFormat"}
