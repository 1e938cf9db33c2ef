"""Long-context retrieval: a passkey hidden in real text (the passkey test of Mohtashami & Jaggi,
arXiv 2305.16300, with real-text haystacks as in "needle in a haystack").

For each (length, depth, seed) trial: documents of a corpus in a seeded order fill a haystack
of about `length` tokens of prompt in all; the sentence "The secret passkey is NNNNN." goes in
at the sentence boundary nearest to `depth` (0 = first, 1 = last); then a question, in the
model's chat template when it has one, and the start of the answer ("The secret passkey is").
The engine generates greedily through its normal path (scheduler, paged cache, sampler); a
trial is correct when the passkey appears as a number in the answer.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

from tqdm import tqdm

from bitfold.core.kv_manager import blocks_for
from bitfold.engine import LLMEngine
from bitfold.errors import BitfoldError
from bitfold.sampling import SamplingParams

INTRO = ("Below is a long text. Somewhere inside it is a secret passkey. Read the text carefully and "
         "remember the passkey.")
NEEDLE = "The secret passkey is {key}."
QUESTION = "What is the secret passkey mentioned in the text above? Answer with the number only."
ANSWER_PREFIX = "The secret passkey is"
_BOUNDARY = re.compile(r"(?<=[.!?])\s+")


@dataclass
class Trial:
    length: int  # asked-for prompt length in tokens
    depth: float  # asked-for needle position, 0..1 of the haystack
    seed: int
    key: str
    prompt_ids: list[int]
    needle_depth: float  # where the needle landed: tokens before it / haystack tokens


def parse_lengths(text: str) -> list[int]:
    """'1k,2k,512' -> [1024, 2048, 512] (k = 1024 tokens)."""
    out = []
    for item in filter(None, (s.strip().lower() for s in text.split(","))):
        m = re.fullmatch(r"(\d+(?:\.\d+)?)(k?)", item)
        if not m:
            raise BitfoldError(f"--lengths: {item!r} is not a token count like 512, 1k or 1.5k")
        n = int(float(m.group(1)) * (1024 if m.group(2) else 1))
        if n < 64:
            raise BitfoldError(f"--lengths: {item!r} is too short for a haystack (at least 64 tokens)")
        out.append(n)
    if not out:
        raise BitfoldError("--lengths: give at least one length, e.g. 1k,2k")
    return sorted(set(out))


def parse_depths(text: str) -> list[float]:
    try:
        out = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise BitfoldError(f"--depths {text!r}: expected fractions like 0,0.25,0.5") from None
    if not out or any(not 0.0 <= d <= 1.0 for d in out):
        raise BitfoldError(f"--depths {text!r}: expected fractions between 0 and 1, e.g. 0,0.5,1")
    return sorted(set(out))


def _insert(haystack: str, needle: str, depth: float) -> tuple[str, int]:
    """Put `needle` at the sentence boundary nearest to depth x len(haystack); returns the text
    and the needle's character offset."""
    cuts = [0] + [m.end() for m in _BOUNDARY.finditer(haystack)] + [len(haystack)]
    at = min(cuts, key=lambda c: (abs(c - depth * len(haystack)), c))
    left, right = haystack[:at].rstrip(), haystack[at:].lstrip()
    left = left + " " if left else ""
    return left + needle + (" " + right if right else ""), len(left)


class PromptBuilder:
    """Renders the trial prompt around a haystack, with the model's chat template or without."""

    def __init__(self, tokenizer, chat: bool):
        if chat and tokenizer.chat_template is None:
            chat = False  # a base model: plain text
        self.tok, self.chat = tokenizer, chat

    def text(self, haystack: str) -> str:
        content = f"{INTRO}\n\n{haystack}\n\n{QUESTION}"
        if self.chat:
            return self.tok.apply_chat_template([{"role": "user", "content": content}]) + ANSWER_PREFIX
        return f"{content}\n\nAnswer: {ANSWER_PREFIX}"

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=not self.chat)  # a chat template writes its own BOS


def make_trials(tokenizer, docs: list[str], lengths: list[int], depths: list[float], seeds: list[int],
                chat: bool = True) -> list[Trial]:
    """Every (seed, length, depth) trial. A seed fixes the haystack's documents (longer lengths
    extend the shorter ones' text) and, with length and depth, the passkey."""
    build = PromptBuilder(tokenizer, chat)
    sep = tokenizer.encode("\n\n", add_special_tokens=False)
    trials = []
    for seed in seeds:
        order = list(range(len(docs)))
        random.Random(f"needle-haystack-{seed}").shuffle(order)
        stream: list[int] = []
        used = 0  # documents of `order` already in the stream
        for length in lengths:
            for depth in depths:
                key = str(random.Random(f"needle-key-{seed}-{length}-{depth}").randint(10000, 99999))
                needle = NEEDLE.format(key=key)
                budget = length - len(build.encode(build.text(needle)))
                if budget < 16:
                    raise BitfoldError(f"--lengths {length}: too short for the prompt around the haystack "
                                       f"({length - budget} tokens); use at least {length - budget + 64}")
                while len(stream) < budget and used < len(order):
                    stream += tokenizer.encode(docs[order[used]], add_special_tokens=False) + sep
                    used += 1
                if len(stream) < budget:
                    raise BitfoldError(f"the corpus has only {len(stream)} tokens; --lengths {length} needs {budget}")
                haystack = tokenizer.decode(stream[:budget]).strip()
                hay_text, at = _insert(haystack, needle, depth)
                text = build.text(hay_text)
                ids = build.encode(text)
                trials.append(Trial(length, depth, seed, key, ids, _needle_depth(build, text, hay_text, at, needle)))
    return trials


def _needle_depth(build: PromptBuilder, text: str, hay_text: str, at: int, needle: str) -> float:
    """Tokens of haystack before the needle over all haystack tokens (the needle excluded)."""
    start = text.index(hay_text)
    head = len(build.encode(text[:start]))
    before = len(build.encode(text[:start + at])) - head
    needle_tokens = len(build.tok.encode(needle, add_special_tokens=False))
    total = len(build.encode(text[:start + len(hay_text)])) - head - needle_tokens
    return min(1.0, max(0.0, before / max(1, total)))


def is_correct(answer: str, key: str) -> bool:
    return re.search(rf"(?<!\d){key}(?!\d)", answer) is not None


def run_trials(engine: LLMEngine, trials: list[Trial], max_tokens: int = 12, progress: bool = False,
               desc: str = "needle") -> list[str]:
    """Greedy answers to every trial, through the engine's scheduler. Requests are admitted while
    their prompt + answer fit the free KV cache, so none is ever preempted and recomputed."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    bs, capacity = engine.config.block_size, engine.pool.num_blocks
    answers: dict[int, str] = {}
    inflight: dict[str, tuple[int, int]] = {}  # request id -> (trial index, blocks reserved)
    reserved, nxt = 0, 0
    bar = tqdm(total=len(trials), desc=desc, unit="trial", disable=not progress)
    try:
        while len(answers) < len(trials):
            while nxt < len(trials) and len(inflight) < engine.config.max_num_seqs:
                need = blocks_for(len(trials[nxt].prompt_ids) + max_tokens, bs)
                if inflight and reserved + need > capacity:
                    break
                rid = engine.add_request(trials[nxt].prompt_ids, params, request_id=f"needle-{nxt}")
                inflight[rid] = (nxt, need)
                reserved += need
                nxt += 1
            for out in engine.step():
                if out.finished:
                    i, need = inflight.pop(out.request_id)
                    reserved -= need
                    answers[i] = out.text
                    bar.update(1)
    finally:
        bar.close()
        for rid in inflight:
            engine.abort_request(rid)
    return [answers[i] for i in range(len(trials))]


def accuracy_grid(trials: list[Trial], correct: list[bool], lengths: list[int],
                  depths: list[float]) -> list[list[float]]:
    """Mean accuracy over seeds: grid[i][j] for lengths[i], depths[j]."""
    grid = []
    for length in lengths:
        row = []
        for depth in depths:
            hits = [c for t, c in zip(trials, correct) if t.length == length and t.depth == depth]
            row.append(sum(hits) / len(hits) if hits else float("nan"))
        grid.append(row)
    return grid
