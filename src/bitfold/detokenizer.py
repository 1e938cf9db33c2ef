"""Incremental detokenization that is safe for streaming.

Byte-level BPE splits multi-byte characters across tokens, and SentencePiece decodes a token's
leading space differently at the start of a string. So we decode a short window of tokens
before the new ones and emit only the text that extends it, holding back while the window
ends in an incomplete character (U+FFFD), as vLLM and HF's TextStreamer do.
"""
from __future__ import annotations

CONTEXT_TOKENS = 5  # prompt tokens kept as decoding context for the first outputs


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int]):
        self.tokenizer = tokenizer
        self.tokens = list(prompt_token_ids[-CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.tokens)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_id: int) -> str:
        """Append a token; return the text it completes (possibly empty)."""
        self.tokens.append(token_id)
        prefix = self._decode(self.tokens[self.prefix_offset : self.read_offset])
        full = self._decode(self.tokens[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
            return full[len(prefix) :]
        return ""

    def flush(self) -> str:
        """Text still held back (an incomplete character at the very end), at finish."""
        prefix = self._decode(self.tokens[self.prefix_offset : self.read_offset])
        full = self._decode(self.tokens[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.tokens)
        return full[len(prefix) :] if full.startswith(prefix) else ""
