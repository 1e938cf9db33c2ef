"""Bad input through the Python API: every mistake a user can make raises a typed exception
whose one-line message names what was wrong and where (file, field, parameter), and an error
on a live engine leaves its KV block pool whole."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from bitfold import LLM, SamplingParams
from bitfold.errors import (BitfoldError, InvalidRequestError, InvalidSamplingParamsError, ModelLoadError,
                            PromptTooLongError, UnsupportedArchitectureError, UnsupportedFormatError)
from bitfold.loader import open_model
from tests.helpers import fail_after


def check_message(err: BaseException, *needles: str) -> str:
    msg = str(err)
    assert "\n" not in msg, f"error message is not one line: {msg!r}"
    for n in needles:
        assert str(n) in msg, f"{n!r} not in {msg!r}"
    return msg


def load_fully(path) -> None:
    """Open a model and read every weight, as LLM() would (without building an engine)."""
    src = open_model(str(path))
    for _ in src.weights():
        pass


def assert_pool_whole(llm: LLM) -> None:
    eng = llm.engine
    assert eng.pool.num_free == eng.pool.num_blocks, "KV blocks leaked"
    assert not eng.scheduler.has_unfinished and not eng._states and not eng.runner.generators


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path):
    """A writable copy of the tiny HF model folder."""
    dst = tmp_path / "model"
    shutil.copytree(tiny_model_dir, dst)
    return dst


def _edit_config(folder, **changes):
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    for k, v in changes.items():
        if v is _DELETE:
            cfg.pop(k)
        else:
            cfg[k] = v
    cfg_path.write_text(json.dumps(cfg))
    return cfg_path


_DELETE = object()


# ---- files and folders -----------------------------------------------------------------------


def test_missing_model_path(tmp_path):
    for path in [tmp_path / "nope.gguf", tmp_path / "no" / "such" / "folder"]:
        with pytest.raises(ModelLoadError) as e:
            LLM(str(path), device="cpu")
        check_message(e.value, str(path), "no such file")


def test_folder_without_config_json(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError) as e:
        LLM(str(tmp_path), device="cpu")
    check_message(e.value, str(tmp_path), "config.json")


def test_config_json_invalid(model_copy):
    cfg = model_copy / "config.json"
    cfg.write_text('{"architectures": ["LlamaForCausalLM"], "hidden_size": 64,')  # cut short
    with pytest.raises(ModelLoadError) as e:
        LLM(str(model_copy), device="cpu")
    check_message(e.value, str(cfg), "JSON")
    cfg.write_text("[1, 2, 3]")  # valid JSON, not an object
    with pytest.raises(ModelLoadError) as e:
        LLM(str(model_copy), device="cpu")
    check_message(e.value, str(cfg), "object")
    cfg.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ModelLoadError) as e:
        open_model(str(model_copy))
    check_message(e.value, str(cfg))


@pytest.mark.parametrize("field", ["hidden_size", "num_attention_heads", "vocab_size", "intermediate_size",
                                   "num_hidden_layers", "architectures"])
def test_config_json_missing_field(model_copy, field):
    cfg = _edit_config(model_copy, **{field: _DELETE})
    with pytest.raises(ModelLoadError) as e:
        LLM(str(model_copy), device="cpu")
    check_message(e.value, str(cfg), field)


@pytest.mark.parametrize("field,value", [
    ("hidden_size", "64"), ("hidden_size", 0), ("num_attention_heads", 0), ("num_attention_heads", 4.0),
    ("num_hidden_layers", -1), ("vocab_size", None), ("intermediate_size", True), ("num_key_value_heads", 3),
    ("head_dim", "16"), ("architectures", "LlamaForCausalLM"), ("architectures", []),
])
def test_config_json_bad_field_value(model_copy, field, value):
    cfg = _edit_config(model_copy, **{field: value})
    with pytest.raises(ModelLoadError) as e:
        open_model(str(model_copy))
    check_message(e.value, str(cfg), field)


def test_unknown_architecture_in_config_json(model_copy):
    cfg = _edit_config(model_copy, architectures=["FooForCausalLM"])
    for make in (lambda: open_model(str(model_copy)), lambda: LLM(str(model_copy), device="cpu")):
        with pytest.raises(UnsupportedArchitectureError) as e:
            make()
        check_message(e.value, str(cfg), "FooForCausalLM", "LlamaForCausalLM", "Qwen2ForCausalLM")
    assert isinstance(e.value, ModelLoadError)


def test_folder_without_safetensors(model_copy):
    (model_copy / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError) as e:
        LLM(str(model_copy), device="cpu")
    check_message(e.value, str(model_copy), "safetensors")


@pytest.fixture(scope="module")
def sharded_dir(tiny_model_dir, tmp_path_factory):
    from tests.helpers import write_tiny_hf_model

    folder = tmp_path_factory.mktemp("sharded")
    write_tiny_hf_model("llama", folder, seed=3, shard=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, folder / name)
    return folder


def test_index_naming_a_missing_shard(sharded_dir, tmp_path):
    folder = tmp_path / "sharded"
    shutil.copytree(sharded_dir, folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    (folder / shards[1]).unlink()
    with pytest.raises(ModelLoadError) as e:
        LLM(str(folder), device="cpu")
    check_message(e.value, shards[1], "missing")


def test_index_without_weight_map(sharded_dir, tmp_path):
    folder = tmp_path / "sharded"
    shutil.copytree(sharded_dir, folder)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(ModelLoadError) as e:
        LLM(str(folder), device="cpu")
    check_message(e.value, "model.safetensors.index.json", "weight_map")


@pytest.mark.parametrize("damage", ["truncated", "header_only", "random", "empty"])
def test_corrupt_safetensors(model_copy, damage):
    st = model_copy / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes({"truncated": data[: len(data) // 2], "header_only": data[:100],
                    "random": np.random.default_rng(0).bytes(5000), "empty": b""}[damage])
    with pytest.raises(ModelLoadError) as e:
        LLM(str(model_copy), device="cpu")
    check_message(e.value, str(st))


def _resave(folder, edit):
    from safetensors.torch import load_file, save_file

    st = folder / "model.safetensors"
    tensors = load_file(str(st))
    edit(tensors)
    save_file(tensors, str(st), metadata={"format": "pt"})


@pytest.mark.parametrize("name,shape", [
    ("model.layers.1.mlp.down_proj.weight", (64, 100)),
    ("model.layers.0.self_attn.k_proj.weight", (16, 64)),
    ("model.layers.2.input_layernorm.weight", (65,)),
    ("model.embed_tokens.weight", (320, 32)),
    ("lm_head.weight", (300, 64)),
])
def test_weight_with_the_wrong_shape(model_copy, name, shape):
    import torch

    def edit(t):
        assert tuple(t[name].shape) != shape
        t[name] = torch.zeros(shape)

    _resave(model_copy, edit)
    with pytest.raises(ModelLoadError) as e:
        LLM(str(model_copy), device="cpu")
    check_message(e.value, str(model_copy), name)


def test_missing_and_unexpected_weights(model_copy):
    import torch

    _resave(model_copy, lambda t: t.pop("model.layers.2.mlp.up_proj.weight"))
    with pytest.raises(ModelLoadError) as e:
        LLM(str(model_copy), device="cpu")
    check_message(e.value, str(model_copy), "missing", "model.layers.2.mlp.up_proj.weight")
    _resave(model_copy, lambda t: t.update({"model.layers.2.mlp.up_proj.weight": torch.zeros(160, 64),
                                            "model.layers.0.mystery.weight": torch.zeros(3)}))
    with pytest.raises(ModelLoadError) as e:
        LLM(str(model_copy), device="cpu")
    check_message(e.value, "model.layers.0.mystery.weight")


# ---- GGUF ------------------------------------------------------------------------------------


def test_not_a_gguf_file(tmp_path):
    for name, data in [("model.gguf", np.random.default_rng(1).bytes(4096)), ("model.bin", b"PK\x03\x04zip"),
                       ("empty.gguf", b"")]:
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ModelLoadError) as e:
            LLM(str(path), device="cpu")
        check_message(e.value, str(path), "GGUF")


@pytest.fixture(scope="module")
def smollm2_bytes(smollm2_path):
    with open(smollm2_path, "rb") as f:
        return f.read()


@pytest.mark.parametrize("cut", ["magic", "header", "metadata", "tensor_infos", "tensor_data", "last_byte"])
def test_truncated_gguf(smollm2_bytes, tmp_path, cut):
    """The first N bytes of the real file: a ModelLoadError naming the file, at open or at load."""
    n = {"magic": 4, "header": 20, "metadata": 1000, "tensor_infos": 1_780_000,
         "tensor_data": 40_000_000, "last_byte": len(smollm2_bytes) - 1}[cut]
    path = tmp_path / f"cut-{n}.gguf"
    path.write_bytes(smollm2_bytes[:n])
    with pytest.raises(ModelLoadError) as e:
        load_fully(path)
    check_message(e.value, str(path))


def _write_gguf(path, arch: str = "llama", tensors=(), metadata: bool = True, head_count: int = 4) -> str:
    """A small GGUF written by the gguf package: llama hyper-parameters plus the given tensors,
    each (name, numpy array, raw GGML type or None)."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    if metadata:
        w.add_block_count(1)
        w.add_context_length(128)
        w.add_embedding_length(64)
        w.add_feed_forward_length(128)
        w.add_head_count(head_count)
        w.add_head_count_kv(2)
        w.add_layer_norm_rms_eps(1e-5)
    for name, arr, raw in tensors:
        w.add_tensor(name, arr, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def test_gguf_with_unknown_architecture(tmp_path):
    path = _write_gguf(tmp_path / "foo.gguf", "foo", [("token_embd.weight", np.zeros((8, 64), np.float32), None)])
    with pytest.raises(UnsupportedArchitectureError) as e:
        load_fully(path)
    check_message(e.value, path, "'foo'", "general.architecture", "llama")


def test_gguf_with_an_unsupported_tensor_type(tmp_path):
    import gguf

    iq2_rows = np.random.default_rng(0).integers(0, 256, (64, 66), dtype=np.uint8)  # 64 x 256 IQ2_XXS weights
    path = _write_gguf(tmp_path / "iq2.gguf", "llama", [
        ("token_embd.weight", np.zeros((8, 64), np.float32), None),
        ("blk.0.attn_q.weight", iq2_rows, gguf.GGMLQuantizationType.IQ2_XXS),
    ])
    with pytest.raises(UnsupportedFormatError) as e:
        load_fully(path)
    check_message(e.value, path, "blk.0.attn_q.weight", "IQ2_XXS")
    with pytest.raises(UnsupportedFormatError):
        LLM(path, device="cpu")


def test_gguf_with_zero_heads(tmp_path):
    path = _write_gguf(tmp_path / "h0.gguf", "llama", [("token_embd.weight", np.zeros((8, 64), np.float32), None)],
                       head_count=0)
    with pytest.raises(ModelLoadError) as e:  # not a ZeroDivisionError
        load_fully(path)
    check_message(e.value, path, "llama.attention.head_count")


def test_gguf_missing_metadata(tmp_path):
    path = _write_gguf(tmp_path / "nometa.gguf", "llama", [("token_embd.weight", np.zeros((8, 64), np.float32), None)],
                       metadata=False)
    with pytest.raises(ModelLoadError) as e:
        load_fully(path)
    check_message(e.value, path, "llama.")


# ---- requests on a live engine ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llm(tiny_model_dir):
    return LLM(str(tiny_model_dir), device="cpu", num_kv_blocks=64, block_size=4, max_model_len=32)


INVALID_PARAMS = [
    ("temperature", -1), ("temperature", float("nan")), ("temperature", float("inf")), ("temperature", "0.5"),
    ("top_p", 0), ("top_p", 1.5), ("top_p", float("nan")), ("top_p", -0.1),
    ("top_k", -2), ("top_k", 2.5), ("max_tokens", 0), ("max_tokens", -3), ("max_tokens", 1.0),
    ("seed", "x"), ("seed", 1.5), ("seed", 2**64), ("stop", [""]), ("stop", ["ok", ""]), ("stop", 5),
    ("stop", [3]), ("stop_token_ids", [-1]), ("stop_token_ids", None), ("stop_token_ids", ["a"]),
]


@pytest.mark.parametrize("name,value", INVALID_PARAMS, ids=[f"{n}={v!r}" for n, v in INVALID_PARAMS])
def test_invalid_sampling_params(name, value):
    with pytest.raises(InvalidSamplingParamsError) as e:
        SamplingParams(**{name: value})
    assert isinstance(e.value, ValueError) and isinstance(e.value, BitfoldError)
    check_message(e.value, name)


def test_valid_sampling_edges_are_accepted(tiny_llm):
    """Each edge value is kept as given (stop strings normalized to a list) and a request with it runs."""
    for kw in [dict(temperature=0), dict(temperature=1e-6), dict(top_p=1.0), dict(top_p=1e-9), dict(top_k=-1),
               dict(top_k=0), dict(max_tokens=1), dict(seed=0), dict(seed=-1), dict(seed=2**64 - 1),
               dict(stop="x"), dict(stop=("a", "b")), dict(stop=None), dict(stop_token_ids=[0, 5])]:
        sp = SamplingParams(**kw)
        (name, value), = kw.items()
        want = {"x": ["x"], ("a", "b"): ["a", "b"], None: []}.get(value, value) if name == "stop" else value
        assert getattr(sp, name) == want and type(getattr(sp, name)) is type(want), (kw, getattr(sp, name))
        sp.max_tokens, sp.ignore_eos = 2, True
        out = tiny_llm.generate([[5, 6, 7]], sp)[0]
        assert out.finished and 1 <= len(out.token_ids) <= 2 and all(0 <= t < 320 for t in out.token_ids), kw
    assert_pool_whole(tiny_llm)


def test_params_made_invalid_after_construction_are_caught(tiny_llm):
    sp = SamplingParams(temperature=0.5, max_tokens=4)
    sp.top_p = 2.0
    with pytest.raises(InvalidSamplingParamsError) as e:
        tiny_llm.generate([[5, 6, 7]], sp)
    check_message(e.value, "top_p")
    assert_pool_whole(tiny_llm)
    good = SamplingParams(temperature=0, max_tokens=3)
    with pytest.raises(InvalidSamplingParamsError):  # one bad request in a batch: nothing stays queued
        tiny_llm.generate([[5, 6], [7, 8]], [good, sp])
    assert_pool_whole(tiny_llm)
    with pytest.raises(InvalidSamplingParamsError):
        next(tiny_llm.stream([5, 6], sp))
    assert_pool_whole(tiny_llm)


def test_prompt_longer_than_the_context(tiny_llm):
    ctx = tiny_llm.engine.max_model_len
    assert ctx == 32
    for prompt in ([5] * 40, [5] * ctx, "1 2 3 " * 10):
        with pytest.raises(PromptTooLongError) as e:
            tiny_llm.generate(prompt, SamplingParams(max_tokens=1))
        check_message(e.value, "context", str(ctx))
        assert isinstance(e.value, InvalidRequestError) and isinstance(e.value, ValueError)
        assert_pool_whole(tiny_llm)
    with pytest.raises(PromptTooLongError):
        next(tiny_llm.stream([5] * 40, SamplingParams(max_tokens=1)))
    assert_pool_whole(tiny_llm)
    # one token shorter fits: prompt + one generated token
    out = tiny_llm.generate([5] * (ctx - 1), SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 1
    assert_pool_whole(tiny_llm)


def test_too_long_prompt_among_good_ones_frees_everything(tiny_llm):
    sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    with pytest.raises(PromptTooLongError):
        tiny_llm.generate([[5, 6, 7], [8] * 12, [9] * 50], sp)
    assert_pool_whole(tiny_llm)
    assert [len(o.token_ids) for o in tiny_llm.generate([[5, 6, 7], [8] * 12], sp)] == [4, 4]
    assert_pool_whole(tiny_llm)


def test_unknown_llm_keyword(tiny_model_dir):
    with pytest.raises(InvalidRequestError) as e:
        LLM(str(tiny_model_dir), device="cpu", max_model_length=64)
    check_message(e.value, "max_model_length", "max_model_len")


@pytest.mark.parametrize("kw,name", [
    (dict(block_size=3), "block_size"), (dict(max_num_seqs=0), "max_num_seqs"),
    (dict(max_model_len=1), "max_model_len"), (dict(max_model_len=10**6), "max_model_len"),
    (dict(kv_cache_memory_gb=-1.0), "kv_cache_memory_gb"), (dict(num_kv_blocks=0), "num_kv_blocks"),
    (dict(kv_cache="int3"), "int3"),
])
def test_invalid_engine_settings(tiny_model_dir, kw, name):
    with pytest.raises(BitfoldError) as e:
        LLM(str(tiny_model_dir), device="cpu", **kw)
    check_message(e.value, name)


def test_cuda_without_a_gpu(tiny_model_dir):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(BitfoldError) as e:
        LLM(str(tiny_model_dir), device="cuda")
    check_message(e.value, "cuda")


def test_engine_still_serves_after_errors(tiny_llm):
    out = tiny_llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))[0]
    assert len(out.token_ids) == 3 and all(0 <= t < 320 for t in out.token_ids)
    assert_pool_whole(tiny_llm)


def test_gguf_with_an_unknown_tensor_type_number(tmp_path):
    """A type id no ggml version defines (e.g. from a newer llama.cpp): typed error, tensor named."""
    import struct

    name = b"blk.0.attn_q.weight"
    path = _write_gguf(tmp_path / "t.gguf", "llama", [("token_embd.weight", np.zeros((8, 64), np.float32), None),
                                                      (name.decode(), np.zeros((64, 64), np.float32), None)])
    data = bytearray(open(path, "rb").read())
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    n_dims = struct.unpack_from("<I", data, at)[0]
    type_at = at + 4 + 8 * n_dims
    assert struct.unpack_from("<I", data, type_at)[0] == 0  # F32
    struct.pack_into("<I", data, type_at, 250)
    open(path, "wb").write(bytes(data))
    with pytest.raises(ModelLoadError) as e:
        load_fully(path)
    check_message(e.value, path, name.decode())


def test_cancelled_or_failing_consumers_leave_the_pool_whole(tiny_llm):
    sp = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    for piece in tiny_llm.stream([5, 6, 7], sp):  # leaving the loop drops (closes) the stream
        break
    assert_pool_whole(tiny_llm)
    with pytest.raises(ZeroDivisionError):
        for i, piece in enumerate(tiny_llm.stream([5, 6, 7], sp)):
            if i == 2:
                1 / 0  # the consumer's own bug, mid-stream
    assert_pool_whole(tiny_llm)
    a, b = tiny_llm.stream([5, 6], sp), tiny_llm.stream([7, 8], sp)
    next(a), next(b)  # two requests hold blocks at once
    assert tiny_llm.engine.pool.num_free < tiny_llm.engine.pool.num_blocks
    a.close()
    b.close()
    assert_pool_whole(tiny_llm)


# ---- prompts that are not text -----------------------------------------------------------------


def test_prompt_of_bytes_or_lone_surrogates_is_a_typed_error(tiny_llm):
    """Python strings may hold lone surrogates, which are not Unicode text (UTF-8 cannot encode
    them); bytes are not a prompt at all. Both are InvalidRequestError naming what and where,
    through generate, stream and chat, and nothing is queued."""
    sp = SamplingParams(temperature=0, max_tokens=2)
    for prompt, needles in [(b"\xff", ["bytes", "decode"]), ("1 \ud800 2", ["U+D800", "character 2"]),
                            ("1 2 \udcff", ["U+DCFF", "character 4"]), ([5, "6"], ["'6'"]), (3.5, ["float"])]:
        with pytest.raises(InvalidRequestError) as e:
            tiny_llm.generate(prompt, sp)
        check_message(e.value, *needles)
        with pytest.raises(InvalidRequestError):
            tiny_llm.generate([[5, 6, 7], prompt], sp)  # a bad prompt among good ones: nothing stays queued
        assert_pool_whole(tiny_llm)
        with pytest.raises(InvalidRequestError):
            next(tiny_llm.stream(prompt, sp))
        assert_pool_whole(tiny_llm)
    with pytest.raises(InvalidRequestError) as e:
        tiny_llm.chat([{"role": "system", "content": "1"}, {"role": "user", "content": "2\ud83d"}], sp)
    check_message(e.value, "messages[1]", "U+D83D")
    assert_pool_whole(tiny_llm)
    with pytest.raises(InvalidRequestError) as e:
        tiny_llm.tokenizer.encode("\udc80")
    check_message(e.value, "U+DC80")


def test_logprobs_beyond_the_limit_is_refused(tiny_llm):
    from bitfold.engine import MAX_LOGPROBS

    with pytest.raises(InvalidSamplingParamsError) as e:
        tiny_llm.generate([[5, 6]], SamplingParams(max_tokens=1, logprobs=MAX_LOGPROBS + 1))
    check_message(e.value, "logprobs", str(MAX_LOGPROBS))
    assert_pool_whole(tiny_llm)
    out = tiny_llm.generate([[5, 6]], SamplingParams(max_tokens=1, logprobs=MAX_LOGPROBS))[0]
    assert len(out.logprobs[0].top) == MAX_LOGPROBS


def test_a_stream_left_open_is_cancelled_by_the_next_generate(tiny_llm):
    """A named stream abandoned after `break` would keep decoding inside later generate() calls:
    generate() cancels it (freeing its blocks), and reading it again says so."""
    sp = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    it = tiny_llm.stream([5, 6, 7], sp)
    for _ in it:
        break
    out = tiny_llm.generate([[8, 9]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))[0]
    assert len(out.token_ids) == 3
    assert_pool_whole(tiny_llm)
    with pytest.raises(InvalidRequestError) as e:
        next(it)
    check_message(e.value, "cancelled", "close()")
    assert_pool_whole(tiny_llm)


def test_interleaved_streams_lose_no_text(tiny_llm):
    """Two streams read in turns each get all their text (the engine steps both in one batch)."""
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = [[5, 6, 7], [40, 41]]
    want = [o.text for o in tiny_llm.generate(prompts, sp)]
    streams, got = [tiny_llm.stream(p, sp) for p in prompts], [[], []]
    live = [0, 1]
    with fail_after(60):  # a stream whose last output went to the other one would wait forever
        while live:
            for i in list(live):
                piece = next(streams[i], None)
                if piece is None:
                    live.remove(i)
                else:
                    got[i].append(piece)
    assert ["".join(g) for g in got] == want and all(want)
    assert_pool_whole(tiny_llm)
