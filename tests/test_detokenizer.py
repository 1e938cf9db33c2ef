"""Streaming-safe incremental detokenization and stop strings, on SmolLM2's real tokenizer.

The reference for "what may be shown after token i" is computed independently of the
tokenizer's decode: each byte-level token is mapped back to its bytes with GPT-2's own
bytes<->unicode table (written out here), and the text after token i is the longest prefix of
the output bytes that is complete UTF-8.
"""
from __future__ import annotations

import random

import pytest

from bitfold import SamplingParams
from bitfold.detokenizer import IncrementalDetokenizer
from tests.helpers import gpt2_bytes_to_unicode

TEXTS = [
    "Hello, world!",
    "Café crème brûlée, naïve façade — déjà vu.",
    "日本の首都は東京です。\n中文：你好，世界！",
    "emoji 😀 family 👨\u200d👩\u200d👧 flags 🇫🇷🇯🇵 and ✨ sparkles ✨",
    "mixed ASCII\nthen Ünïcödé\n\tand 한국어 text 🚀 done.\n",
    "Ελληνικά και русский текст, עברית, العربية",
    "€100 ≈ ¥15000 ± 5% → ∞ … ©®™",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕄𝕒𝕥𝕙 𐍈 ancient",
]


BYTE_TO_CHAR = gpt2_bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


@pytest.fixture(scope="module")
def tok(smollm2_llm):
    return smollm2_llm.tokenizer


def token_bytes(tok, token_id: int) -> bytes:
    return bytes(CHAR_TO_BYTE[c] for c in tok.id_to_token(token_id))


def complete_prefix(data: bytes) -> str:
    """The longest prefix of `data` that is complete UTF-8 (data is a prefix of valid UTF-8)."""
    for cut in range(len(data), max(-1, len(data) - 4), -1):
        try:
            return data[:cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
    raise AssertionError("not a prefix of valid UTF-8")


def run_detok(tok, prompt_ids: list[int], out_ids: list[int]) -> tuple[list[str], str]:
    d = IncrementalDetokenizer(tok, prompt_ids)
    pieces = [d.add(t) for t in out_ids]
    return pieces, d.flush()


def check_stream(tok, prompt_ids: list[int], out_ids: list[int], text: str) -> None:
    pieces, tail = run_detok(tok, prompt_ids, out_ids)
    assert "".join(pieces) + tail == tok.decode(out_ids) == text
    assert tail == "", "text was still held back at the end of a complete text"
    # Nothing shown is ever a replacement character, and each character appears with the
    # token that completes it: after token i exactly the complete-UTF-8 prefix is out.
    data = b""
    shown = ""
    for i, (t, piece) in enumerate(zip(out_ids, pieces)):
        assert "\ufffd" not in piece, (i, piece)
        data += token_bytes(tok, t)
        shown += piece
        assert shown == complete_prefix(data), (i, shown)


def byte_ids(tok, text: str) -> list[int]:
    """One single-byte token per UTF-8 byte: every multi-byte character is split."""
    ids = [tok._backend.token_to_id(BYTE_TO_CHAR[b]) for b in text.encode("utf-8")]
    assert None not in ids
    return ids


def test_byte_table_matches_the_vocabulary(tok):
    ids = tok.encode("é😀 ok", add_special_tokens=False)
    assert b"".join(token_bytes(tok, t) for t in ids) == "é😀 ok".encode()


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_ids_stream_exactly(tok, text):
    prompt = tok.encode("Some prompt: «ça va?» ", add_special_tokens=False)
    ids = tok.encode(text, add_special_tokens=False)
    check_stream(tok, prompt, ids, text)


@pytest.mark.parametrize("text", TEXTS)
def test_byte_by_byte_ids_stream_exactly(tok, text):
    check_stream(tok, tok.encode("Q: ", add_special_tokens=False), byte_ids(tok, text), text)


def test_real_splits_happen(tok):
    """The texts do split characters across tokens with the real tokenizer (else the tests
    above would not exercise the hold-back)."""
    split = 0
    for text in TEXTS:
        for t in tok.encode(text, add_special_tokens=False):
            try:
                token_bytes(tok, t).decode("utf-8")
            except UnicodeDecodeError:
                split += 1
    assert split >= 10


def test_random_regroupings_of_the_bytes(tok):
    """Any tokenization of the bytes into vocabulary tokens streams the same text."""
    rng = random.Random(0)
    text = "".join(TEXTS)
    for _ in range(5):
        ids, pos = [], 0
        raw = text.encode()
        while pos < len(raw):  # greedily take a random-length known token at pos
            for n in sorted(range(1, 7), key=lambda _: rng.random()):
                piece = "".join(BYTE_TO_CHAR[b] for b in raw[pos : pos + n])
                tid = tok._backend.token_to_id(piece)
                if tid is not None and len(piece) == n:
                    ids.append(tid)
                    pos += n
                    break
        check_stream(tok, [], ids, text)


def test_prompt_context_cut_inside_a_character(tok):
    """The detokenizer keeps the last prompt tokens as context; when that window starts in the
    middle of a character the output must still be exact."""
    out = "输出 ok 😀"
    for k in range(4):  # shifts where the context window starts inside the 3-byte characters
        prompt = byte_ids(tok, "前缀：中文字符" + "x" * k)
        check_stream(tok, prompt, tok.encode(out, add_special_tokens=False), out)
        check_stream(tok, prompt, byte_ids(tok, out), out)


def test_special_tokens_are_skipped(tok):
    a = tok.encode("Bonjour ", add_special_tokens=False)
    b = byte_ids(tok, "中")
    end = tok.encode("<|im_end|>", add_special_tokens=False)
    assert len(end) == 1 and end[0] in tok.special_token_ids
    ids = a + b[:2] + end + b[2:] + end  # a special token inside a split character
    pieces, tail = run_detok(tok, [], ids)
    assert "".join(pieces) + tail == tok.decode(ids, skip_special_tokens=True) == "Bonjour 中"
    assert all("\ufffd" not in p for p in pieces)


def test_incomplete_character_at_the_end_is_flushed_like_decode(tok):
    ids = byte_ids(tok, "ab😀")[:-2]  # the emoji's last two bytes never come
    pieces, tail = run_detok(tok, [], ids)
    assert "".join(pieces) == "ab"
    assert "".join(pieces) + tail == tok.decode(ids)
    assert tail.startswith("\ufffd")


def test_literal_replacement_character_is_not_lost(tok):
    for text in ["a\ufffdb", "end \ufffd", "\ufffd\ufffd"]:
        ids = tok.encode(text, add_special_tokens=False)
        pieces, tail = run_detok(tok, [], ids)
        assert "".join(pieces) + tail == text


# ---- the engine: streaming, multi-byte text and stop strings -----------------------------------


MAX_TOKENS = 16


@pytest.fixture(scope="module")
def greedy_runs(smollm2_llm):
    sp = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    return {p: smollm2_llm.generate(p, sp)[0] for p in ["日本の首都は", "The capital of France is"]}


def test_streamed_multibyte_text_matches_generate(smollm2_llm, greedy_runs):
    full = greedy_runs["日本の首都は"]
    assert any(ord(c) > 0x3000 for c in full.text), full.text  # the greedy output is CJK
    pieces = list(smollm2_llm.stream("日本の首都は", SamplingParams(temperature=0, max_tokens=MAX_TOKENS)))
    assert "".join(pieces) == full.text == smollm2_llm.tokenizer.decode(full.token_ids)
    if "\ufffd" not in full.text:
        assert all("\ufffd" not in p for p in pieces)
    assert smollm2_llm.engine.pool.num_free == smollm2_llm.engine.pool.num_blocks


def _stop_case(smollm2_llm, prompt: str, stops: list[str]):
    sp = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, stop=stops)
    cut = smollm2_llm.generate(prompt, sp)[0]
    pieces = list(smollm2_llm.stream(prompt, sp))
    eng = smollm2_llm.engine
    assert eng.pool.num_free == eng.pool.num_blocks
    return cut, pieces


def test_stop_string_never_streams_and_matches_generate(smollm2_llm, greedy_runs):
    for prompt, full in greedy_runs.items():
        text = full.text
        assert len(text) >= 8, text
        # a stop string in the middle of the output, spanning several characters
        start = len(text) // 2
        stop = text[start : start + 4]
        first = text.find(stop)
        cut, pieces = _stop_case(smollm2_llm, prompt, [stop])
        assert cut.finish_reason == "stop"
        assert cut.text == text[:first]
        assert "".join(pieces) == cut.text
        for p in pieces:
            assert stop not in p


def test_earliest_of_several_stop_strings_wins(smollm2_llm, greedy_runs):
    prompt = "The capital of France is"
    text = greedy_runs[prompt].text
    early, late = text[3:6], text[-5:-2]
    assert text.find(early) < text.find(late)
    cut, pieces = _stop_case(smollm2_llm, prompt, [late, early])
    assert cut.text == text[: text.find(early)] == "".join(pieces)


def test_false_alarm_hold_back_is_released(smollm2_llm, greedy_runs):
    """A stop string whose beginning ends the text but which never completes: the held-back
    characters must come out at the finish, so the stream equals the full text."""
    prompt = "The capital of France is"
    full = greedy_runs[prompt]
    text = full.text
    assert text[-3:].isascii()  # ends in complete characters: the hold-back is what is tested
    for stop in [text[-3:] + "\u2603\u2603", text[-1:] + "\u2603"]:  # snowmen are not in the output
        cut, pieces = _stop_case(smollm2_llm, prompt, [stop])
        assert cut.finish_reason == full.finish_reason and cut.text == text
        assert "".join(pieces) == text
