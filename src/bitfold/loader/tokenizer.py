"""Text <-> token ids, built from a GGUF file's metadata or a Hugging Face tokenizer folder.

The Rust `tokenizers` library does the work; this module assembles its pipeline. A GGUF carries
no tokenizer.json, only llama.cpp's `tokenizer.ggml.*` keys, so for GGUF we rebuild the pipeline
llama.cpp runs for those keys: ids must match what the model saw in training, or it degrades
silently.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable
from typing import Any

import gguf
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from bitfold.errors import BitfoldError, InvalidRequestError, ModelLoadError, PromptTooLongError, UnsupportedFormatError
from bitfold.loader.chat_template import render_chat_template
from bitfold.loader.gguf_reader import GGUFFile

logger = logging.getLogger(__name__)

_TYPE = gguf.TokenType

# Texts of control tokens that end a turn. Many conversions declare a single eos id while the chat
# template closes turns with another token, so llama.cpp stops on all of these; so do we.
_EOG_TEXTS = frozenset({"<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
                        "<|end_of_text|>", "<EOT>", "</s>", "<|return|>"})

# Pre-tokenizer split regexes, as llama.cpp (src/llama-vocab.cpp) applies them per tokenizer.ggml.pre.
# A BPE vocabulary only reproduces training ids when text is cut into the same words first.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_DEEPSEEK_LLM = (
    r"[\r\n]",
    # Letters with case; escaped because editors NFC-normalize several of these code points.
    r"\s?[A-Za-z"
    "\u00B5\u00C0-\u00D6\u00D8-\u00F6\u00F8-\u01BA\u01BC-\u01BF\u01C4-\u0293\u0295-\u02AF\u0370-"
    "\u0373\u0376\u0377\u037B-\u037D\u037F\u0386\u0388-\u038A\u038C\u038E-\u03A1\u03A3-\u03F5"
    "\u03F7-\u0481\u048A-\u052F\u0531-\u0556\u10A0-\u10C5\u13A0-\u13F5\u13F8-\u13FD\u1C90-\u1CBA"
    "\u1CBD-\u1CBF\u1D00-\u1D2B\u1D6B-\u1D77\u1D79-\u1D9A\u1E00-\u1F15\u1F18-\u1F1D\u1F20-\u1F45"
    "\u1F48-\u1F4D\u1F50-\u1F57\u1F59\u1F5B\u1F5D\u1F5F-\u1F7D\u1F80-\u1FB4\u1FB6-\u1FBC\u1FBE"
    "\u1FC2-\u1FC4\u1FC6-\u1FCC\u1FD0-\u1FD3\u1FD6-\u1FDB\u1FE0-\u1FEC\u1FF2-\u1FF4\u1FF6-\u1FFC"
    "\u2102\u2107\u210A-\u2113\u2115\u2119-\u211D\u2124\u2126\u2128\u212A-\u212D\u212F-\u2134"
    "\u2139\u213C-\u213F\u2145-\u2149\u214E\u2183\u2184\u2C00-\u2C7B\u2C7E-\u2CE4\u2CEB-\u2CEE"
    "\u2CF2\u2CF3\uA640-\uA66D\uA680-\uA69B\uA722-\uA76F\uA771-\uA787\uA78B-\uA78E\uAB70-\uABBF"
    "\uFB00-\uFB06\uFB13-\uFB17\uFF21-\uFF3A\uFF41-\uFF5A\U00010400-\U0001044F\U000104B0-"
    "\U000104D3\U000104D8-\U000104FB\U00010C80-\U00010CB2\U00010CC0-\U00010CF2\U000118A0-"
    "\U000118DF\U0001E900-\U0001E943"
    "]+",
    r"\s?[!-/:-~！-／：-～‘-‟　-。]+",
    r"\s+$",
    r"[一-龥ࠀ-一가-퟿]+",
    r"\p{N}+",
)
_PRE_SPLITS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("default", "gpt2", "gpt-2", "mpt", "olmo"), (_GPT2,)),
    **dict.fromkeys(("llama-bpe", "llama3", "llama-v3", "dbrx", "smaug-bpe"), (_LLAMA3,)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2"), (_QWEN2,)),
    # Digits one by one, then the GPT-2 regex.
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone"), (r"\p{N}", _GPT2)),
    "deepseek-llm": _DEEPSEEK_LLM,
}
# llama.cpp takes a pre-split word that is itself in the vocabulary whole for these (Llama 3),
# and adds BOS when the file does not say.
_LLAMA3_PRES = frozenset({"llama-bpe", "llama3", "llama-v3"})
_SUPPORTED_MODELS = "'gpt2' (byte-level BPE) or 'llama' (SentencePiece BPE)"

_SURROGATE = re.compile("[\ud800-\udfff]")
_CUT_SLACK = 4  # tokens one cut between two pieces of a text can add to their count (Tokenizer.encode_within)


def check_text(text: str, what: str = "the text") -> None:
    """Raise InvalidRequestError when `text` holds a lone surrogate (U+D800-U+DFFF).

    A Python str (or a JSON "\\ud800" escape) can hold one, but it is not Unicode text: UTF-8
    cannot encode it and the tokenizer library refuses it. bitfold rejects it rather than
    replacing it, so a client learns its text was damaged instead of the model seeing U+FFFD.
    """
    m = _SURROGATE.search(text)
    if m is not None:
        raise InvalidRequestError(f"{what} contains a lone surrogate (U+{ord(m.group()):04X} at character "
                                  f"{m.start()}), which is not valid Unicode text; send UTF-8 text")


class Tokenizer:
    """A model's tokenizer: encode/decode, its special ids, end-of-generation set and chat template."""

    # Why this pipeline may not be the one the model was trained with (a GGUF pre-tokenizer we
    # do not know, replaced by GPT-2's); None when it is.
    guess: str | None = None

    def __init__(self, backend: tokenizers.Tokenizer, *, source: str, vocab_size: int, bos_token_id: int | None,
                 eos_token_id: int | None, extra_eos_ids: Iterable[int] = (), add_bos: bool, add_eos: bool,
                 chat_template: str | None) -> None:
        if add_bos and bos_token_id is None:
            raise ModelLoadError(f"{source}: the tokenizer asks to add a BOS token but declares no bos token id")
        self._backend = backend
        self._source = source
        self.vocab_size = vocab_size
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.bos_token = None if bos_token_id is None else backend.id_to_token(bos_token_id)
        self.eos_token = None if eos_token_id is None else backend.id_to_token(eos_token_id)
        self.add_bos = add_bos
        self.add_eos = add_eos
        self.chat_template = chat_template
        added = backend.get_added_tokens_decoder()
        self.special_token_ids = frozenset(i for i, tok in added.items() if tok.special)
        eog = {i for i in self.special_token_ids if added[i].content in _EOG_TEXTS}
        eog.update(extra_eos_ids)
        if eos_token_id is not None:
            eog.add(eos_token_id)
        self.eos_token_ids = frozenset(eog)

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, reader: GGUFFile | gguf.GGUFReader, path: str) -> Tokenizer:
        """Build the tokenizer llama.cpp would use for this GGUF file, from its metadata alone."""
        def get(key: str, default: Any = None) -> Any:
            field = reader.fields.get(key)  # GGUFFile: the value itself; gguf.GGUFReader: a ReaderField
            return default if field is None else field.contents() if isinstance(field, gguf.ReaderField) else field

        model = get("tokenizer.ggml.model")
        if model not in ("gpt2", "llama"):
            found = "missing" if model is None else repr(model)
            raise ModelLoadError(f"{path}: tokenizer.ggml.model is {found}; supported values are {_SUPPORTED_MODELS}")
        tokens = get("tokenizer.ggml.tokens")
        if not isinstance(tokens, list) or not tokens or not isinstance(tokens[0], str):
            raise ModelLoadError(f"{path}: tokenizer.ggml.tokens is missing or not a list of strings")
        n = len(tokens)
        types = get("tokenizer.ggml.token_type", [_TYPE.NORMAL] * n)
        if len(types) != n:
            raise ModelLoadError(f"{path}: tokenizer.ggml.token_type has {len(types)} entries, expected {n} "
                                 "(one per entry of tokenizer.ggml.tokens)")

        def token_id(key: str, default: int | None) -> int | None:
            value = get(key, default)
            if value is not None and not 0 <= value < n:
                raise ModelLoadError(f"{path}: {key} is {value}, outside the vocabulary of {n} tokens")
            return value

        # Defaults are llama.cpp's for files that predate these keys.
        sentencepiece = model == "llama"
        unk_id = token_id("tokenizer.ggml.unknown_token_id", 0 if sentencepiece else None)
        if sentencepiece:
            scores = get("tokenizer.ggml.scores", [0.0] * n)
            if len(scores) != n:
                raise ModelLoadError(f"{path}: tokenizer.ggml.scores has {len(scores)} entries, expected {n}")
            backend = _sentencepiece_bpe(tokens, scores, types, unk_id, get("tokenizer.ggml.add_space_prefix", True))
            default_add_bos = True
        else:
            merges = get("tokenizer.ggml.merges")
            if not isinstance(merges, list):
                raise ModelLoadError(
                    f"{path}: tokenizer.ggml.merges is missing; a 'gpt2' tokenizer needs its BPE merges")
            pre = get("tokenizer.ggml.pre")
            backend = _byte_level_bpe(tokens, merges, pre, path)
            default_add_bos = pre in _LLAMA3_PRES
        # CONTROL and UNKNOWN tokens are special: matched whole in text, dropped by decode. USER_DEFINED
        # ones (e.g. `<think>`) are matched whole but kept in decoded text, as llama.cpp does.
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                    for t, ty in zip(tokens, types) if ty in (_TYPE.CONTROL, _TYPE.UNKNOWN)])
        backend.add_tokens([AddedToken(t, special=False, normalized=False)
                            for t, ty in zip(tokens, types) if ty == _TYPE.USER_DEFINED])
        tok = cls(backend, source=path, vocab_size=n,
                  bos_token_id=token_id("tokenizer.ggml.bos_token_id", 1 if sentencepiece else None),
                  eos_token_id=token_id("tokenizer.ggml.eos_token_id", 2 if sentencepiece else None),
                  add_bos=bool(get("tokenizer.ggml.add_bos_token", default_add_bos)),
                  add_eos=bool(get("tokenizer.ggml.add_eos_token", False)),
                  chat_template=get("tokenizer.chat_template"))
        if not sentencepiece and get("tokenizer.ggml.pre") not in _PRE_SPLITS:
            tok.guess = (f"tokenizer.ggml.pre is {get('tokenizer.ggml.pre')!r}, a pre-tokenizer bitfold does not "
                         "know (text is split with the GPT-2 regex instead)")
        return tok

    @classmethod
    def from_hf_folder(cls, folder: str) -> Tokenizer:
        """Load tokenizer.json plus the settings transformers keeps in tokenizer_config.json,
        chat_template.jinja and generation_config.json."""
        path = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(path):
            raise ModelLoadError(f"{folder}: no tokenizer.json; expected a Hugging Face tokenizer folder "
                                 "(tokenizer.json, optionally tokenizer_config.json)")
        try:
            backend = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # the Rust library raises plain Exception on malformed files
            raise ModelLoadError(f"{path}: not a valid tokenizer.json ({e})") from e
        config = _read_json(os.path.join(folder, "tokenizer_config.json"))
        generation = _read_json(os.path.join(folder, "generation_config.json"))

        def special_id(key: str) -> int | None:
            value = config.get(key)
            text = value.get("content") if isinstance(value, dict) else value
            if text is None:
                return None
            token = backend.token_to_id(text)
            if token is None:
                raise ModelLoadError(
                    f"{folder}/tokenizer_config.json: {key} {text!r} is not in tokenizer.json's vocabulary")
            return token

        bos_id, eos_id = special_id("bos_token"), special_id("eos_token")
        extra_eos = generation.get("eos_token_id")
        extra_eos = [] if extra_eos is None else [extra_eos] if isinstance(extra_eos, int) else extra_eos
        if not isinstance(extra_eos, list) or not all(isinstance(i, int) for i in extra_eos):
            raise ModelLoadError(f"{folder}/generation_config.json: eos_token_id must be an int or a list of ints")
        if eos_id is None and extra_eos:
            eos_id = extra_eos[0]
        # Without an explicit flag, the tokenizer.json post-processor tells whether BOS/EOS get added.
        probe = backend.encode("a", add_special_tokens=True).ids
        return cls(backend, source=folder, vocab_size=backend.get_vocab_size(with_added_tokens=True),
                   bos_token_id=bos_id, eos_token_id=eos_id, extra_eos_ids=extra_eos,
                   add_bos=bool(config.get("add_bos_token", bos_id is not None and probe[:1] == [bos_id])),
                   add_eos=bool(config.get("add_eos_token", eos_id is not None and probe[-1:] == [eos_id])),
                   chat_template=_hf_chat_template(folder, config))

    # ---- export -----------------------------------------------------------------------------------

    def save_hf(self, folder: str) -> None:
        """Write tokenizer.json, tokenizer_config.json (specials, BOS/EOS flags, chat template) and
        generation_config.json (end-of-generation ids) so that `from_hf_folder(folder)` rebuilds
        this tokenizer; read back and compared, UnsupportedFormatError when it would differ."""
        if self.guess:
            raise UnsupportedFormatError(f"{self._source}: cannot write a faithful tokenizer.json: {self.guess}")
        self._backend.save(os.path.join(folder, "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                  "add_bos_token": self.add_bos, "add_eos_token": self.add_eos}
        for key, token in (("bos_token", self.bos_token), ("eos_token", self.eos_token)):
            if token is not None:
                config[key] = token
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        _write_json(os.path.join(folder, "tokenizer_config.json"), config)
        if self.eos_token_id is not None:  # without one, the reader takes the first of this list as EOS
            eos = [self.eos_token_id] + sorted(self.eos_token_ids - {self.eos_token_id})
            generation = {"eos_token_id": eos, **({"bos_token_id": self.bos_token_id} if self.bos_token_id is not None
                                                 else {})}
            _write_json(os.path.join(folder, "generation_config.json"), generation)
        diff = self.differences(Tokenizer.from_hf_folder(folder))
        if diff:
            raise UnsupportedFormatError(f"{self._source}: cannot write a faithful tokenizer.json: read back, "
                                         f"its {diff}")

    def differences(self, other: Tokenizer) -> str | None:
        """What `other` does differently (first difference found), or None: the special ids and
        flags, the chat template, every id's token and decoding, and the encoding of a sample of
        text that includes every special token."""
        for attr in ("bos_token_id", "eos_token_id", "eos_token_ids", "add_bos", "add_eos", "special_token_ids",
                     "chat_template"):
            if getattr(self, attr) != getattr(other, attr):
                return f"{attr} is {getattr(other, attr)!r}, expected {getattr(self, attr)!r}"
        ids = list(range(self.vocab_size))
        if self.convert_ids_to_tokens(ids) != other.convert_ids_to_tokens(ids):
            return "vocabulary differs"
        if self._backend.decode_batch([[i] for i in ids], skip_special_tokens=False) != \
                other._backend.decode_batch([[i] for i in ids], skip_special_tokens=False):
            return "decoding of single tokens differs"
        added = self._backend.get_added_tokens_decoder()
        samples = list(_EXPORT_SAMPLES) + [" ".join(t.content for t in added.values())]
        if self.chat_template is not None:
            samples.append(self.apply_chat_template([{"role": "system", "content": "Be brief."},
                                                     {"role": "user", "content": _EXPORT_SAMPLES[0]}]))
        for text in samples:
            for special in (False, True):
                a, b = self.encode(text, special), other.encode(text, special)
                if a != b:
                    return f"encoding of {text[:40]!r} differs ({b[:8]}... vs {a[:8]}...)"
            if self.decode(a, False) != other.decode(a, False) or self.decode(a) != other.decode(a):
                return f"decoding of {text[:40]!r} differs"
        return None

    # ---- use ------------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. Special-token text in it (e.g. `<|im_start|>`) becomes its single id,
        which rendered chat templates rely on. BOS is added once: a template that already wrote it
        does not get a second one."""
        if not isinstance(text, str):
            raise InvalidRequestError(f"the text to encode must be a str, got {type(text).__name__}")
        check_text(text)
        ids = self._backend.encode(text, add_special_tokens=False).ids
        return self._add_special(ids) if add_special_tokens else ids

    def _add_special(self, ids: list[int]) -> list[int]:
        if self.add_bos and ids[:1] != [self.bos_token_id]:
            ids.insert(0, self.bos_token_id)
        if self.add_eos and self.eos_token_id is not None and ids[-1:] != [self.eos_token_id]:
            ids.append(self.eos_token_id)
        return ids

    def encode_within(self, text: str, limit: int, add_special_tokens: bool = True, piece_chars: int = 1 << 16,
                      ) -> list[int]:
        """`encode(text)`, or PromptTooLongError as soon as `text` certainly has more than `limit`
        tokens. A long text (over two pieces of `piece_chars`) is first counted piece by piece
        (each cut after a space), stopping once the count passes the limit, so an oversized prompt
        costs about `limit` tokens of work, not its whole length (a text that fits is tokenized
        twice, at most its own length again). A cut changes the count by a few tokens at most
        (a word split, a prefix space), so `_CUT_SLACK` per cut is taken off before comparing.

        For the server's worker threads: this calls the tokenizer's batch API, which releases the
        GIL (the plain call does not, and would stall every other thread for a long text)."""
        if not isinstance(text, str):
            raise InvalidRequestError(f"the text to encode must be a str, got {type(text).__name__}")
        check_text(text)
        if len(text) > 2 * piece_chars:
            count, start, cuts = 0, 0, 0
            while start < len(text):
                end = min(len(text), start + piece_chars)
                if end < len(text):
                    space = text.rfind(" ", start + piece_chars // 2, end)
                    end = space + 1 if space >= 0 else end
                count += len(self._encode_nogil(text[start:end]))
                if count - _CUT_SLACK * cuts > limit:
                    raise PromptTooLongError(f"the text has more than {count - _CUT_SLACK * cuts} tokens (counted "
                                             f"in its first {end} of {len(text)} characters); at most {limit} fit")
                start, cuts = end, cuts + 1
        ids = self._encode_nogil(text)
        return self._add_special(ids) if add_special_tokens else ids

    def _encode_nogil(self, text: str) -> list[int]:
        batch = getattr(self._backend, "encode_batch_fast", self._backend.encode_batch)  # fast: tokenizers >= 0.21
        return batch([text], add_special_tokens=False)[0].ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str | None]:
        """Raw vocabulary strings (byte-level or `▁`-spelled), for incremental detokenization."""
        return [self._backend.id_to_token(i) for i in ids]

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        if self.chat_template is None:
            raise BitfoldError(f"{self._source} has no chat template; format the prompt yourself and use "
                               "`generate` instead of chat")
        for i, message in enumerate(messages if isinstance(messages, list) else ()):
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, str):
                check_text(content, f"messages[{i}]['content']")
        return render_chat_template(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                                    bos_token=self.bos_token or "", eos_token=self.eos_token or "")


# Text for `differences`: words, digits, code, whitespace runs, accents, CJK, emoji, byte fallback.
_EXPORT_SAMPLES = (
    "Hello world! The capital of France is Paris; 3.14159 * 2 = 6.28318 and 1234567 + 89 = 1234656.",
    "def quicksort(xs):\n    if len(xs) <= 1:\n\t\treturn xs  # base case\n\n\n   trailing   spaces   ",
    "Ünïcödé naïve café — «quotes» ‘single’ “double” 日本語のテキスト 中文 한국어 Привет мир 🦙🚀 \u200b\x00\x7f",
    "I'm you're we'll they'd it's DON'T   \r\n  ALLCAPS mixedCase snake_case kebab-case https://x.org/a?b=c",
)


def _write_json(path: str, data: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=2)
        f.write("\n")


def _byte_level_bpe(tokens: list[str], merges: list[str], pre: str | None, path: str) -> tokenizers.Tokenizer:
    """GPT-2 style BPE over bytes spelled as printable characters, with llama.cpp's split regexes."""
    splits = _PRE_SPLITS.get(pre)
    if splits is None:
        logger.warning("%s: tokenizer.ggml.pre is %r, not a known pre-tokenizer; splitting text with the "
                       "GPT-2 regex, so token ids may differ from the model's training", path, pre)
        splits = (_GPT2,)
    vocab = _first_ids(tokens)
    # llama.cpp splits a merge at its first space after position 0.
    pairs = [(m[:cut], m[cut + 1:]) for m in merges if (cut := m.find(" ", 1)) > 0]
    try:
        model = models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre in _LLAMA3_PRES)
    except Exception as e:  # the Rust library raises plain Exception for a merge naming an unknown token
        raise ModelLoadError(f"{path}: tokenizer.ggml.merges does not fit tokenizer.ggml.tokens ({e})") from e
    backend = tokenizers.Tokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_bpe(tokens: list[str], scores: list[float], types: list[int], unk_id: int | None,
                       add_space_prefix: bool) -> tokenizers.Tokenizer:
    """SentencePiece BPE (Llama 2, Gemma): spaces spelled `▁`, unknown characters as `<0xNN>` bytes.

    GGUF keeps piece scores, not merges. SentencePiece merges the adjacent pair whose joined piece
    scores highest; ranking every two-piece split of each piece by that piece's score gives BPE
    merges that pick the same pair (the method of transformers' SentencePiece extractor).
    """
    normal = {t for t, ty in zip(tokens, types) if ty == _TYPE.NORMAL}
    ranked = sorted((-scores[i], i, piece[:k], piece[k:])
                    for i, (piece, ty) in enumerate(zip(tokens, types)) if ty == _TYPE.NORMAL
                    for k in range(1, len(piece)) if piece[:k] in normal and piece[k:] in normal)
    model = models.BPE(vocab=_first_ids(tokens), merges=[(left, right) for _, _, left, right in ranked],
                       unk_token=None if unk_id is None else tokens[unk_id], byte_fallback=True, fuse_unk=True)
    backend = tokenizers.Tokenizer(model)
    # Normalizers run on each stretch of text between special tokens, so the `▁` prefix also follows
    # every special token, as llama.cpp does.
    steps = [normalizers.Prepend("▁")] if add_space_prefix else []
    backend.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
    undo = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(undo + ([decoders.Strip(" ", 1, 0)] if add_space_prefix else []))
    return backend


def _first_ids(tokens: list[str]) -> dict[str, int]:
    """Token -> id; a string listed twice keeps its first id (a few real vocabularies repeat one)."""
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)
    return vocab


def _read_json(path: str) -> dict[str, Any]:
    """The object in an optional JSON file; {} when the file does not exist."""
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: cannot be read as JSON ({e})") from e
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _hf_chat_template(folder: str, config: dict[str, Any]) -> str | None:
    """chat_template.jinja wins over tokenizer_config.json, as in transformers; a list of named
    templates yields the one named 'default', else the first."""
    jinja_path = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            return f.read()
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    if template is not None and not isinstance(template, str):
        raise ModelLoadError(f"{folder}/tokenizer_config.json: chat_template must be a string or a list of "
                             "{name, template} objects")
    return template
