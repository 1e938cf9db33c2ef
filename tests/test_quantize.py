"""`bitfold quantize` and loading its checkpoints: a quantized folder loads to exactly the model
that quantizing at load (`LLM(path, weights=fmt)`) builds (same codes, same logits), with the
same tokenizer; its quantization_config is what the loader goes by; every malformed file fails
with a ModelLoadError naming the file and tensor."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from bitfold import LLM
from bitfold.cli import main
from bitfold.config import EngineConfig
from bitfold.core.request import Request
from bitfold.core.scheduler import ScheduledChunk
from bitfold.errors import BitfoldError, ModelLoadError, UnsupportedFormatError
from bitfold.layers.linear import Linear
from bitfold.loader import open_model
from bitfold.quantize import parse_size, quantize
from bitfold.runner.model_runner import ModelRunner
from bitfold.sampling import SamplingParams
from bitfold.weights.lowbit import dequantize, lowbit_spec
from bitfold.weights.packed import pack_bitplanes, unpack_bitplanes
from tests.helpers import rel_err

TEXTS = ("Hello world! 1 2 3", "def f(x):\n    return x * 2  # 日本語 🦙", "<|im_start|>user\nhi<|im_end|>")


def runner(path, weights: str = "auto", max_len: int = 64, device: str = "cpu") -> ModelRunner:
    src = open_model(str(path))
    cfg = EngineConfig(model=str(path), device=device, block_size=4, num_kv_blocks=max_len // 4, weights=weights,
                       enforce_eager=True)
    return ModelRunner(src, cfg, torch.device(device), torch.float32, max_model_len=max_len)


def logits(r: ModelRunner, ids: list[int]) -> torch.Tensor:
    req = Request("q", list(ids), SamplingParams(max_tokens=1))
    table = list(range(-(-len(ids) // r.cfg.block_size)))
    return r.forward_logits([ScheduledChunk(req, 0, len(ids), table)], all_tokens=True).cpu()


def linears(r: ModelRunner) -> dict[str, Linear]:
    return {n: m for n, m in r.model.named_modules() if isinstance(m, Linear)}


def assert_same_model(a: ModelRunner, b: ModelRunner, ids: list[int]) -> None:
    """Same format in every linear layer, the same packed codes, scales and mins (the layers'
    buffers) and dense tensors, identical logits."""
    la, lb = linears(a), linears(b)
    assert la.keys() == lb.keys()
    for name in la:
        assert type(la[name].fmt) is type(lb[name].fmt), name
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys() and any(k.endswith("lut_packed") for k in sa)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert torch.equal(logits(a, ids), logits(b, ids))


# ---- bit planes ------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_bitplanes_match_numpy_packbits(bits):
    q = torch.randint(0, 2**bits, (5, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(bits))
    planes = pack_bitplanes(q, bits)
    assert planes.shape == (bits, 5, 6) and planes.dtype == torch.uint8
    for p in range(bits):  # numpy as the independent reference of "bit k % 8 of byte k // 8"
        want = np.packbits(((q.numpy() >> p) & 1).astype(np.uint8), axis=1, bitorder="little")
        assert np.array_equal(planes[p].numpy(), want)
    assert torch.equal(unpack_bitplanes(planes), q)


def test_parse_size():
    assert parse_size("4GB") == 4 * 10**9 and parse_size("500MB") == 5 * 10**8 and parse_size("12") == 12
    assert parse_size("1.5kb") == 1500
    with pytest.raises(BitfoldError, match="max-shard-size"):
        parse_size("lots")


# ---- the tiny HF model -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_int2(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "tiny-int2"
    summary = quantize(str(tiny_model_dir), "int2", str(out))
    return out, summary


@pytest.mark.parametrize("fmt", ["int2-g64", "ternary-g32", "int3-g128", "int4-g16", "int1-g32"])
def test_quantized_folder_is_the_model_quantized_at_load(fmt, tiny_model_dir, tmp_path):
    """int3-g128 pads the tiny model's 64 and 160 inputs to whole groups of 128."""
    out = tmp_path / fmt
    s = quantize(str(tiny_model_dir), fmt, str(out))
    src = open_model(str(out))
    assert src.weight_format == fmt
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    spec = lowbit_spec(fmt)
    assert qc["quant_method"] == "bitfold" and qc["format"] == fmt
    assert (qc["bits"], qc["group_size"], qc["ternary"]) == (spec.bits, spec.group, spec.ternary)
    assert qc["lm_head_format"] == (fmt if spec.bits == 4 and not spec.ternary else f"int4-g{spec.group}")
    assert s.linear_tensors == 3 * 7 + 1 and s.converted == 0 and s.files == 1
    assert s.linear_params == 3 * (64 * 64 * 2 + 64 * 32 * 2 + 64 * 160 * 3) + 320 * 64
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        q = f.get_slice("model.layers.0.mlp.down_proj.qweight")
        padded = -(-160 // spec.group) * spec.group
        assert q.get_dtype() == "U8" and q.get_shape() == [spec.bits, 64, padded // 8]
        assert f.get_slice("model.layers.0.mlp.down_proj.scales").get_shape() == [64, padded // spec.group]
        assert f.get_slice("model.layers.0.input_layernorm.weight").get_dtype() == "F32"
    assert_same_model(runner(out), runner(tiny_model_dir, fmt), list(range(1, 300, 23)))


def test_quantized_folder_runs_text_with_the_same_tokenizer(tiny_int2, tiny_model_dir):
    out, summary = tiny_int2
    assert summary.format == "int2-g64" and summary.head_format == "int4-g64"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (tiny_model_dir / name).read_bytes()
    sp = SamplingParams(temperature=0, max_tokens=6)
    a = LLM(str(out), device="cpu", num_kv_blocks=32, block_size=4)
    b = LLM(str(tiny_model_dir), device="cpu", num_kv_blocks=32, block_size=4, weights="int2")
    for t in TEXTS:
        assert a.tokenizer.encode(t) == b.tokenizer.encode(t)
    ra, rb = a.generate(["1 2 3"], sp)[0], b.generate(["1 2 3"], sp)[0]
    assert ra.token_ids == rb.token_ids and ra.text == rb.text
    msgs = [{"role": "user", "content": "1 2"}]  # the template's own ids lie outside the tiny vocabulary
    assert a.tokenizer.apply_chat_template(msgs) == b.tokenizer.apply_chat_template(msgs)
    assert a.tokenizer.eos_token_ids == b.tokenizer.eos_token_ids


def test_weights_flag_on_a_quantized_folder(tiny_int2):
    out, _ = tiny_int2
    ids = list(range(5, 300, 31))
    same = runner(out, "int2")  # the alias of the stored int2-g64: fine
    assert_same_model(same, runner(out), ids)
    with pytest.raises(BitfoldError, match="already quantized as int2-g64.*int4-g32"):
        runner(out, "int4-g32")
    # dense dequantizes: every linear weight is its codes in float
    dense = runner(out, "dense")
    lq, ld = linears(same), linears(dense)
    assert lq.keys() == ld.keys()
    for name, lin in lq.items():
        assert type(ld[name].fmt).__name__ == "DenseFormat"
        q, s, m = lin.fmt.codes(lin)
        assert torch.equal(ld[name].weight, dequantize(q, s, m, lin.fmt.spec.group)[:, :lin.in_features]), name
    assert torch.isfinite(logits(dense, ids)).all()


def test_dense_weights_on_a_tied_quantized_folder(tiny_model_dir, tmp_path):
    """A tied model's checkpoint stores the head's codes; dense ignores them (the embedding is
    the head), a low-bit load takes them instead of quantizing the embedding again."""
    from tests.helpers import write_tiny_hf_model

    src = tmp_path / "tied"
    write_tiny_hf_model("qwen2", src, seed=4, tie_word_embeddings=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, src / name)
    s = quantize(str(src), "int3-g32", str(tmp_path / "q"))
    assert s.head_format == "int4-g32"
    from safetensors import safe_open

    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        assert "lm_head.qweight" in f.keys() and "lm_head.weight" not in f.keys()
    ids = list(range(3, 300, 37))
    assert_same_model(runner(tmp_path / "q"), runner(src, "int3-g32"), ids)
    dense = runner(tmp_path / "q", "dense")
    assert dense.model.lm_head is None and torch.isfinite(logits(dense, ids)).all()


def test_sharded_output_loads_the_same(tiny_model_dir, tmp_path, tiny_int2):
    out = tmp_path / "sharded"
    s = quantize(str(tiny_model_dir), "int2-g64", str(out), max_shard_bytes=30_000)
    assert s.files > 2
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == sorted(p.name for p in out.glob("*.safetensors"))
    assert files[0] == f"model-00001-of-{s.files:05d}.safetensors"
    q = "model.layers.1.self_attn.q_proj"
    assert len({index["weight_map"][f"{q}.{k}"] for k in ("qweight", "scales", "mins")}) == 1  # never split
    assert_same_model(runner(out), runner(tiny_int2[0]), list(range(0, 320, 17)))


def test_dense_dtype_float16_halves_the_float32_tensors(tiny_model_dir, tmp_path, tiny_int2):
    s = quantize(str(tiny_model_dir), "int2-g64", str(tmp_path / "f16"), dense_dtype="float16")
    assert s.dense_dtypes == {"float16": 8} and s.dense_bytes * 2 == tiny_int2[1].dense_bytes
    # Dense compute isolates the fp16 rounding (the LUT kernel's int8 activation tables would
    # amplify it: a rounding flip there moves a logit by a table step).
    a, b = runner(tmp_path / "f16", "dense"), runner(tiny_int2[0], "dense")
    ids = list(range(1, 300, 29))
    assert rel_err(logits(a, ids), logits(b, ids)) < 2e-3


def test_cli_quantize(capsys, tiny_model_dir, tmp_path):
    out = tmp_path / "cli"
    assert main(["quantize", "--model", str(tiny_model_dir), "--format", "ternary", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "ternary-g64" in text and "22 tensors in 3 layers" in text and "bits/weight" in text
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    for argv, needle in (
        (["--format", "int7", "--out", str(tmp_path / "x")], "not a low-bit format"),
        (["--format", "dense", "--out", str(tmp_path / "x")], "not a low-bit format"),
        (["--format", "int2", "--out", str(out)], "not an empty folder"),
        (["--format", "int2", "--out", str(tmp_path / "x"), "--max-shard-size", "big"], "max-shard-size"),
    ):
        assert main(["quantize", "--model", str(tiny_model_dir), *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("bitfold: error: ") and needle in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "x").exists()
    assert main(["quantize", "--model", str(out), "--format", "int2", "--out", str(tmp_path / "y")]) == 2
    assert "already quantized as ternary-g64" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".bitfold")] == []  # no temp folder left


# ---- malformed checkpoints -------------------------------------------------------------------

@pytest.fixture
def q_copy(tiny_int2, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(tiny_int2[0], dst)
    return dst


def _resave(folder, edit):
    from safetensors.torch import load_file, save_file

    st = folder / "model.safetensors"
    tensors = load_file(str(st))
    edit(tensors)
    save_file({k: v.clone().contiguous() for k, v in tensors.items()}, str(st), metadata={"format": "pt"})


def _edit_qc(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"].update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def _load_error(folder) -> str:
    with pytest.raises(ModelLoadError) as e:
        runner(folder)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


Q = "model.layers.1.mlp.up_proj"


@pytest.mark.parametrize("edit,tensor,needle", [
    (lambda t: t.pop(f"{Q}.scales"), f"{Q}.qweight", f"no '{Q}.scales'"),
    (lambda t: t.pop(f"{Q}.qweight"), f"{Q}.scales", f"no '{Q}.qweight'"),
    (lambda t: t.update({f"{Q}.qweight": torch.cat([t[f"{Q}.qweight"]] * 2)}), f"{Q}.qweight", "4 bit planes"),
    (lambda t: t.update({f"{Q}.qweight": t[f"{Q}.qweight"][0]}), f"{Q}.qweight", "bit planes [bits"),
    (lambda t: t.update({f"{Q}.scales": t[f"{Q}.scales"].float()}), f"{Q}.scales", "float16"),
    (lambda t: t.update({f"{Q}.mins": t[f"{Q}.mins"][:, :0]}), f"{Q}.mins", "expected float16 (160, 1)"),
    (lambda t: t.update({f"{Q}.qweight": t[f"{Q}.qweight"][:, :, :4]}), f"{Q}.qweight", "not whole groups"),
    (lambda t: t.update({f"{Q}.qweight": t[f"{Q}.qweight"][:, :100], f"{Q}.scales": t[f"{Q}.scales"][:100],
                         f"{Q}.mins": t[f"{Q}.mins"][:100]}), f"{Q}.qweight", "expects 160 rows"),
    (lambda t: t.update({f"lm_head.{k}": t[f"{Q}.{k}"] for k in ("qweight", "scales", "mins")}),
     "lm_head.qweight", "stores 2 bit planes, but the checkpoint's format int4-g64 has 4 bits"),
    (lambda t: t.update({"model.layers.0.mystery.qweight": t[f"{Q}.qweight"], "model.layers.0.mystery.scales":
                         t[f"{Q}.scales"], "model.layers.0.mystery.mins": t[f"{Q}.mins"]}),
     "model.layers.0.mystery.weight", "unexpected tensor"),
])
def test_malformed_tensors_name_the_file_and_tensor(q_copy, edit, tensor, needle):
    _resave(q_copy, edit)
    msg = _load_error(q_copy)
    assert str(q_copy) in msg and tensor in msg and needle in msg, msg


def test_a_weight_stored_twice_is_refused(q_copy):
    """Codes and a float tensor for the same layer: which one wins would be an accident of order."""
    _resave(q_copy, lambda t: t.update({"model.layers.0.self_attn.o_proj.weight": torch.zeros(64, 64)}))
    msg = _load_error(q_copy)
    assert "model.layers.0.self_attn.o_proj.weight" in msg and "twice" in msg, msg


@pytest.mark.parametrize("changes,needle", [
    ({"bits": 4}, "quantization_config.bits is 4, but format 'int2-g64' has bits 2"),
    ({"group_size": 32}, "quantization_config.group_size is 32"),
    ({"ternary": True}, "quantization_config.ternary"),
    ({"format": "int9"}, "quantization_config.format is 'int9', not a bitfold low-bit format"),
    ({"format": "dense"}, "not a bitfold low-bit format"),
    ({"lm_head_format": "int2-g64"}, "lm_head_format is 'int2-g64', but bitfold builds the output layer of a "
                                     "int2-g64 model as int4-g64"),
])
def test_quantization_config_must_agree(q_copy, changes, needle):
    _edit_qc(q_copy, **changes)
    with pytest.raises(ModelLoadError) as e:
        open_model(str(q_copy))
    assert str(q_copy / "config.json") in str(e.value) and needle in str(e.value), str(e.value)


def test_other_quant_methods_are_unsupported(q_copy):
    cfg = json.loads((q_copy / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (q_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedFormatError, match="quant_method is 'gptq'"):
        open_model(str(q_copy))


# ---- the SmolLM2 GGUF ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_int4(smollm2_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2") / "int4-g32"
    return out, quantize(smollm2_path, "int4-g32", str(out))


@pytest.fixture(scope="module")
def smollm2_int4_at_load(smollm2_path):
    """SmolLM2 quantized at load as int4-g32 (loading takes seconds: one for the module)."""
    return LLM(smollm2_path, device="cpu", kv_cache_memory_gb=0.05, weights="int4-g32")


def test_smollm2_int4_g32_takes_the_q4_1_codes(smollm2_path, smollm2_int4_at_load, smollm2_llm):
    """Through the loader: the Q4_1 tensors arrive as GGUFBlocks whose floats are gguf's decoding;
    an int4-g32 model holds exactly those weights (no second rounding), and predicts like the
    dense model (a misplaced row, e.g. of the un-permuted Q/K, would not)."""
    import gguf

    from bitfold.weights.gguf_blocks import GGUFBlocks
    from bitfold.loader.gguf_reader import GGUFFile

    blocks = {n: w for n, w in open_model(smollm2_path).weights() if isinstance(w, GGUFBlocks)}
    assert len(blocks) == 211 and {w.qtype.name for w in blocks.values()} == {"Q4_1", "Q8_0"}  # + the embedding
    down = GGUFFile(smollm2_path).tensors[2]
    assert down.name == "blk.0.ffn_down.weight"
    ref = gguf.quants.dequantize(down.data.view(np.ndarray), down.tensor_type)
    assert torch.equal(blocks["model.layers.0.mlp.down_proj.weight"].dequantize(1536), torch.from_numpy(ref))
    r = smollm2_int4_at_load.engine.runner
    for i in (0, 17):
        lin = linears(r)[f"layers.{i}.attn.qkv"]
        want = torch.cat([blocks[f"model.layers.{i}.self_attn.{p}_proj.weight"].dequantize(576) for p in "qkv"])
        assert torch.equal(dequantize(*lin.fmt.codes(lin), 32), want)
    prompt = "The capital of France is Paris. The capital of Germany is"
    sp = SamplingParams(max_tokens=1, temperature=0, logprobs=5)
    dense, int4 = smollm2_llm.generate([prompt], sp)[0], smollm2_int4_at_load.generate([prompt], sp)[0]
    assert int4.token_ids == dense.token_ids
    assert [t for t, _ in int4.logprobs[0].top[:2]] == [t for t, _ in dense.logprobs[0].top[:2]]


def test_smollm2_gguf_quantized_folder(smollm2_path, smollm2_int4, smollm2_int4_at_load):
    """The GGUF's config and tokenizer as HF files, its weights as codes: loads to the model
    `LLM(gguf, weights="int4-g32")` builds (both take the Q4_1 blocks' codes as they are), with
    the tokenizer bitfold builds from the GGUF."""
    out, s = smollm2_int4
    assert s.linear_tensors == 30 * 7 + 1 and s.layers == 30 and s.head_format == "int4-g32"
    assert s.converted == 30 * 7  # Q4_1 blocks taken as int4-g32 codes; the head rounds the Q8_0 embedding
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["method"] == "rtn+gguf-blocks" and qc["rounding"] == "search"
    # the Q8_0 embedding decodes to float32; the F32 norms hold fp16 values, stored so exactly
    assert s.dense_tensors == 1 + 2 * 30 + 1 and s.dense_dtypes == {"float32": 1, "float16": 61}
    folder, gguf = open_model(str(out)), open_model(smollm2_path)
    assert folder.config == gguf.config and folder.max_context == gguf.max_context
    assert folder.weight_format == "int4-g32"
    ours, theirs = folder.load_tokenizer(), gguf.load_tokenizer()
    assert theirs.differences(ours) is None
    for t in TEXTS:
        assert ours.encode(t) == theirs.encode(t) and ours.decode(ours.encode(t)) == theirs.decode(theirs.encode(t))
    msgs = [{"role": "user", "content": "Name three colors."}]
    assert ours.apply_chat_template(msgs) == theirs.apply_chat_template(msgs)
    assert ours.eos_token_ids == theirs.eos_token_ids and (ours.bos_token_id, ours.add_bos) == (theirs.bos_token_id,
                                                                                               theirs.add_bos)
    ids = theirs.encode("The capital of France is Paris. The capital of Germany is")
    assert_same_model(runner(out), smollm2_int4_at_load.engine.runner, ids)


# ---- calibrated methods (--method awq|gptq) ----------------------------------------------------

@pytest.fixture
def tiny_calibration(monkeypatch):
    """The tiny model's 320 ids cannot embed SmolLM2's tokenizer's ids: calibrate on random ids."""
    import bitfold.calibration as calibration

    def tokens(tokenizer, docs, samples, length, seed):
        return torch.randint(0, 320, (samples, length), generator=torch.Generator().manual_seed(seed))

    monkeypatch.setattr(calibration, "calibration_tokens", tokens)


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_calibrated_checkpoint_loads_and_differs_from_rtn(method, tiny_model_dir, tmp_path, tiny_calibration):
    from bitfold.calibration import CalibConfig

    out = tmp_path / method
    s = quantize(str(tiny_model_dir), "int3-g32", str(out), calib=CalibConfig(method, samples=4, length=32))
    assert s.method == method and s.linear_tensors == 3 * 7 + 1
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["method"] == f"{method}+rtn" and qc["calibration"]["samples"] == 4  # the head stays rtn
    r, rtn = runner(out), runner(tiny_model_dir, weights="int3-g32")
    la, lb = linears(r), linears(rtn)
    assert any(not torch.equal(la[n].fmt.codes(la[n])[0], lb[n].fmt.codes(lb[n])[0]) for n in la)
    assert torch.isfinite(logits(r, [1, 5, 9, 200])).all()
    if method == "awq":  # the folded norms are stored
        assert s.dense_dtypes.get("float32", 0) > 0


def test_cli_calibration_errors(capsys, tiny_model_dir, tmp_path):
    for argv, needle in (
        (["--format", "int4", "--method", "sgd"], "--method 'sgd': expected one of rtn, awq, gptq"),
        (["--format", "int4", "--method", "gptq", "--calib-len", "0"], "--calib-len must be at least 2"),
        (["--format", "int4", "--method", "rtn", "--calib-len", "-3"], "--calib-len must be at least 2"),
        (["--format", "int4", "--method", "awq", "--calib-samples", "0"], "--calib-samples must be positive"),
        (["--format", "ternary", "--method", "gptq"], "cannot produce ternary-g64"),
        (["--format", "int1-g32", "--method", "awq"], "cannot produce int1-g32"),
    ):
        assert main(["quantize", "--model", str(tiny_model_dir), "--out", str(tmp_path / "x"), *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("bitfold: error: ") and needle in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_smollm2_gptq_checkpoint_generates(smollm2_path, tmp_path, capsys):
    """The default model by GPTQ on a little Wikipedia text: the folder `bitfold generate` loads
    runs on the CPU LUT path (which words it picks moves with the threads' float sums in
    calibration, so only that it generates is checked here; `bitfold eval` judges quality)."""
    out = tmp_path / "gptq-int4"
    assert main(["quantize", "--format", "int4-g128", "--method", "gptq", "--calib-samples", "2", "--calib-len", "64",
                 "--out", str(out)]) == 0
    text = capsys.readouterr()
    assert "decoder layers by gptq" in text.out and "layer 30/30" in text.err
    assert main(["generate", "The capital of France is", "--model", str(out), "--max-tokens", "8"]) == 0
    said = capsys.readouterr().out
    assert said.startswith("The capital of France is") and len(said.strip()) > len("The capital of France is")
