"""OpenAI's response bodies and stream chunks, built from RequestOutputs.

Completions: `text_completion` objects (also each SSE chunk), logprobs in the legacy
{tokens, token_logprobs, top_logprobs, text_offset} form. Chat: `chat.completion` and
`chat.completion.chunk` objects (the first chunk carries the role, the last an empty delta and
the finish reason), logprobs as {content: [{token, logprob, bytes, top_logprobs}]}. With
`stream_options.include_usage` every chunk has `"usage": null` and one more chunk with no
choices carries the usage, as OpenAI sends it.
"""
from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Any

from bitfold.layers.sampler import TokenLogprob

DONE = "data: [DONE]\n\n"


def sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte <-> printable character table, inverted (byte-level BPE spells every byte
    as one of these characters)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = list(bs), 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_SP_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class TokenText:
    """A token's own text and UTF-8 bytes for logprobs. A token may hold part of a character
    (byte-level BPE, SentencePiece byte fallback): its bytes are then the raw ones and its text
    shows the replacement character, as OpenAI does."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            hit = self._cache[token_id] = self._compute(token_id)
        return hit

    def _compute(self, token_id: int) -> tuple[str, list[int]]:
        if self.tokenizer is None:
            return f"token_id:{token_id}", []
        raw = self.tokenizer.id_to_token(token_id) or ""
        if m := _SP_BYTE.match(raw):
            data = bytes([int(m.group(1), 16)])
        elif raw.startswith("▁"):  # SentencePiece spells a leading space this way; decode drops it
            data = raw.replace("▁", " ").encode()
        else:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            table = _byte_level_decoder()
            if "\ufffd" in text and raw and all(ch in table for ch in raw):
                data = bytes(table[ch] for ch in raw)
            else:
                data = text.encode()
        return data.decode("utf-8", errors="replace"), list(data)


def completion_logprobs(lps: list[TokenLogprob], token_text: TokenText, offset: int) -> dict[str, Any]:
    """Legacy completions logprobs for `lps`; `offset` is the text offset of the first token."""
    tokens, offsets = [], []
    for lp in lps:
        text = token_text(lp.token_id)[0]
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [{token_text(t)[0]: v for t, v in lp.top} for lp in lps], "text_offset": offsets}


def chat_logprobs(lps: list[TokenLogprob], token_text: TokenText) -> dict[str, Any]:
    def entry(tid: int, logprob: float) -> dict[str, Any]:
        text, data = token_text(tid)
        return {"token": text, "logprob": logprob, "bytes": data}

    return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                        for lp in lps], "refusal": None}


class Shape:
    """The envelope of one request's responses: id, creation time, model, endpoint kind."""

    def __init__(self, request_id: str, created: int, model: str, chat: bool, include_usage: bool = False):
        self.request_id, self.created, self.model, self.chat = request_id, created, model, chat
        self.include_usage = include_usage

    def response(self, text: str, finish_reason: str | None, logprobs: dict | None, usage_: dict) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                      "logprobs": logprobs, "finish_reason": finish_reason}
            kind = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
            kind = "text_completion"
        return {"id": self.request_id, "object": kind, "created": self.created, "model": self.model,
                "choices": [choice], "usage": usage_}

    def chunk(self, text: str | None, finish_reason: str | None = None, logprobs: dict | None = None,
              role: bool = False) -> dict:
        """A stream chunk with `text` new (chat: None = an empty delta, role=True opens the turn)."""
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
            kind = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
            kind = "text_completion"
        out = {"id": self.request_id, "object": kind, "created": self.created, "model": self.model,
               "choices": [choice]}
        if self.include_usage:
            out["usage"] = None
        return out

    def usage_chunk(self, usage_: dict) -> dict:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {"id": self.request_id, "object": kind, "created": self.created, "model": self.model,
                "choices": [], "usage": usage_}
