"""Incremental detokenization that is safe for streaming.

Byte-level BPE splits multi-byte characters across tokens, and SentencePiece decodes a token's
leading space differently at the start of a string. So we decode a short window of tokens
before the new ones and emit only the text that extends it, holding back an incomplete
character at the end of the window (U+FFFD) until a later token completes it, as vLLM and HF's
TextStreamer do. Complete characters before it go out at once.
"""
from __future__ import annotations

CONTEXT_TOKENS = 5  # prompt tokens kept as decoding context for the first outputs


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int]):
        self.tokenizer = tokenizer
        self.tokens = list(prompt_token_ids[-CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.tokens)
        self.partial = 0  # characters already emitted past the prefix while its tail is incomplete

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_id: int) -> str:
        """Append a token; return the text it completes (possibly empty).

        Complete characters are emitted at once, also when the same token ends in the first
        bytes of an incomplete one (which is held back until a later token completes it)."""
        self.tokens.append(token_id)
        prefix = self._decode(self.tokens[self.prefix_offset : self.read_offset])
        full = self._decode(self.tokens[self.prefix_offset :])
        start = len(prefix) + self.partial
        if full.endswith("\ufffd"):
            stable = full.rstrip("\ufffd")
            new = stable[start:] if len(stable) > start and full.startswith(prefix) else ""
            self.partial += len(new)
            return new
        if len(full) > start:
            self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
            self.partial = 0
            return full[start:]
        return ""

    def flush(self) -> str:
        """Text still held back (an incomplete character at the very end), at finish."""
        prefix = self._decode(self.tokens[self.prefix_offset : self.read_offset])
        full = self._decode(self.tokens[self.prefix_offset :])
        start = len(prefix) + self.partial
        self.prefix_offset = self.read_offset = len(self.tokens)
        self.partial = 0
        return full[start:] if full.startswith(prefix) else ""
