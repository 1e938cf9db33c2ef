"""The Python API, shaped like vLLM's: `LLM(model).generate(prompts, SamplingParams(...))`.

Streams share the engine: every step's outputs go to the stream that owns each request, so
streams read in turns each get all their text. A stream decodes only while the program holds
it open; `generate()` and `chat()` first cancel the streams still open (a named iterator left
after `break` would otherwise keep decoding inside them), and reading a cancelled stream raises
InvalidRequestError. Close a stream you stop reading (`it.close()`, or iterate it in a `for`
that ends) to free its KV blocks at once.
"""
from __future__ import annotations

import dataclasses
from collections import deque
from typing import Iterator, Sequence

from tqdm import tqdm

from bitfold.config import EngineConfig
from bitfold.engine import LLMEngine, RequestOutput
from bitfold.errors import InvalidRequestError
from bitfold.sampling import SamplingParams

Prompt = str | list[int]


class LLM:
    """A model plus its engine. `model` is an HF folder, a .gguf file, or None for the embedded
    SmolLM2-135M-Instruct; keyword arguments are EngineConfig fields (device, dtype,
    max_model_len, kv_cache_memory_gb, ...)."""

    def __init__(self, model: str | None = None, **engine_args):
        names = {f.name for f in dataclasses.fields(EngineConfig)}
        unknown = sorted(set(engine_args) - names)
        if unknown:
            raise InvalidRequestError(f"unknown LLM argument(s) {', '.join(unknown)}; expected some of {', '.join(sorted(names))}")
        self.engine = LLMEngine(EngineConfig(model=model, **engine_args))
        self.tokenizer = self.engine.tokenizer
        self.last_output: RequestOutput | None = None  # the final output of the last `stream`
        # Open streams: request id -> outputs not read yet, or None once cancelled.
        self._streams: dict[str, deque[RequestOutput] | None] = {}

    def generate(self, prompts: Prompt | Sequence[Prompt], sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """One finished RequestOutput per prompt, in order. A list of ints is one tokenized prompt."""
        if not isinstance(prompts, (list, tuple)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # one prompt: text, token ids, or something add_request refuses by name
        return self._run(list(prompts), sampling_params, add_special_tokens=True, use_tqdm=use_tqdm)

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params=None, use_tqdm: bool = False) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of {role, content}) or several."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=True) for c in convs]
        return self._run(prompts, sampling_params, add_special_tokens=False, use_tqdm=use_tqdm)

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None, *,
               add_special_tokens: bool = True) -> Iterator[str]:
        """Yield text increments as they are generated; closing the iterator cancels the request."""
        eng = self.engine
        rid = eng.add_request(prompt, sampling_params or SamplingParams(), add_special_tokens=add_special_tokens)
        pending = self._streams[rid] = deque()
        try:
            while True:
                while not pending:
                    if self._streams.get(rid) is None:
                        raise InvalidRequestError(
                            "this stream was cancelled: generate() or chat() ran while it was open; read a stream "
                            "to its end or close() it before calling them")
                    for out in eng.step():
                        if (queue := self._streams.get(out.request_id)) is not None:
                            queue.append(out)
                out = pending.popleft()
                self.last_output = out
                if out.delta:
                    yield out.delta
                if out.finished:
                    return
        finally:
            self._streams.pop(rid, None)
            eng.abort_request(rid)  # no-op when it finished; frees its blocks otherwise

    def chat_stream(self, messages: list[dict], sampling_params: SamplingParams | None = None) -> Iterator[str]:
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.stream(prompt, sampling_params, add_special_tokens=False)

    def _run(self, prompts: list[Prompt], params, add_special_tokens: bool, use_tqdm: bool) -> list[RequestOutput]:
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise InvalidRequestError(f"got {len(params)} sampling params for {len(prompts)} prompts")
        eng = self.engine
        for rid, pending in self._streams.items():  # streams left open: cancel them (see the module doc)
            if pending is not None:
                eng.abort_request(rid)
                self._streams[rid] = None
        ids: list[str] = []
        results: dict[str, RequestOutput] = {}
        try:
            for p, sp in zip(prompts, params):
                ids.append(eng.add_request(p, sp, add_special_tokens=add_special_tokens))
            with tqdm(total=len(ids), desc="generating", disable=not use_tqdm) as bar:
                while len(results) < len(ids):
                    for out in eng.step():
                        if out.finished:
                            results[out.request_id] = out
                            bar.update(1)
        finally:
            for rid in ids:  # after an error or Ctrl-C, nothing stays queued or holds blocks
                if rid not in results:
                    eng.abort_request(rid)
        return [results[r] for r in ids]
