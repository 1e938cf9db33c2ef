"""Per-request sampling parameters (shaped like vLLM's so users feel at home)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from bitfold.errors import InvalidSamplingParamsError


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop.

    temperature 0 means greedy. top_k 0 (or -1) disables top-k; top_p 1.0 disables nucleus
    sampling. `seed` makes a request's samples reproducible whatever else is in its batch.
    `stop` strings end the generation and are not included in the text. `ignore_eos` keeps
    generating past the end-of-sequence token (useful for benchmarks).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 16
    seed: int | None = None
    stop: list[str] | str | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif isinstance(self.stop, (list, tuple)):
            self.stop = list(self.stop)
        elif self.stop is None:
            self.stop = []
        if isinstance(self.stop_token_ids, tuple):
            self.stop_token_ids = list(self.stop_token_ids)
        self.validate()

    def validate(self) -> None:
        def bad(name: str, value, expected: str):
            raise InvalidSamplingParamsError(f"invalid sampling parameter {name}={value!r}: expected {expected}")

        def number(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        if not number(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            bad("temperature", self.temperature, "a finite number >= 0 (0 = greedy)")
        if not number(self.top_p) or not (0 < self.top_p <= 1):
            bad("top_p", self.top_p, "a number in (0, 1]")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < -1:
            bad("top_k", self.top_k, "an integer >= 0 (0 or -1 disables it)")
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            bad("max_tokens", self.max_tokens, "an integer >= 1")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)
                                      or not -(2**63) <= self.seed < 2**64):
            bad("seed", self.seed, "an integer in [-2**63, 2**64) or None")
        if not isinstance(self.stop, list):
            bad("stop", self.stop, "a string or a list of strings")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                bad("stop", s, "non-empty strings")
        if not isinstance(self.stop_token_ids, list):
            bad("stop_token_ids", self.stop_token_ids, "a list of token ids")
        for t in self.stop_token_ids:
            if not isinstance(t, int) or isinstance(t, bool) or t < 0:
                bad("stop_token_ids", t, "non-negative token ids")
        if not isinstance(self.ignore_eos, bool):
            bad("ignore_eos", self.ignore_eos, "True or False")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
