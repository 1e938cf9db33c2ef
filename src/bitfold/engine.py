"""The engine loop: requests -> scheduler -> model runner -> sampler -> detokenizer -> outputs.

Single-threaded: `step()` runs one batch. Everything but the runner is CPU bookkeeping.
Errors in user input raise typed exceptions before any state changes; an abort (or an
exception inside a step) frees the request's KV blocks at once.

With async scheduling (on by default on a GPU) `step()` launches step N, then reads back and
processes step N-1's tokens while the GPU computes step N, so the host's work (scheduling,
input preparation, detokenization) hides behind the device's (vLLM v1's async scheduling).
Every output then arrives one step later; a request that stops on EOS or a stop string has
one more token computed, which is discarded. Greedy outputs are the same either way.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
from dataclasses import dataclass, field

import torch

from bitfold.config import EngineConfig
from bitfold.core.block_pool import BlockPool
from bitfold.core.kv_manager import KVManager, blocks_for
from bitfold.core.request import Request
from bitfold.core.scheduler import Scheduler
from bitfold.detokenizer import IncrementalDetokenizer
from bitfold.errors import BitfoldError, InvalidRequestError, InvalidSamplingParamsError, PromptTooLongError
from bitfold.layers.sampler import TokenLogprob
from bitfold.loader import open_model
from bitfold.loader.tokenizer import check_text
from bitfold.loader.source import ModelSource
from bitfold.models.format_plan import describe_weights
from bitfold.runner.model_runner import ModelRunner, StepHandle
from bitfold.sampling import SamplingParams
from bitfold.threads import configure_threads

log = logging.getLogger("bitfold")

# Most top log-probabilities a request may ask for per token: OpenAI's top_logprobs limit and
# vLLM's default max_logprobs. Each costs a top-k over the vocabulary at every step.
MAX_LOGPROBS = 20

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class RequestOutput:
    """What a request has produced so far. `text` excludes stop strings; `token_ids` are the
    generated ids only; `delta` is the text new since the previous output of this request;
    `logprobs` (when the sampling params ask) has one entry per generated token."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None
    delta: str = ""
    logprobs: list[TokenLogprob] | None = None


@dataclass
class _State:
    req: Request
    prompt: str | None
    detok: IncrementalDetokenizer | None
    text: str = ""
    emitted: int = 0  # characters of `text` already handed out
    stop: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None


def _holdback(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that could still grow into a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


def warn_if_rounding_breaks(weights: str, stored: str | None, flag: str = "--weights") -> None:
    """Warn before bitfold itself rounds weights to 2 bits or fewer: data-free round-to-nearest
    at those widths breaks ordinary models (Qwen2.5-Coder-1.5B int2-g64: perplexity 9.8 -> 419,
    README "CPU and low-bit"). A checkpoint already stored in the format is not rounded again."""
    from bitfold.weights.lowbit import lowbit_spec

    spec = lowbit_spec(weights)
    if spec is None or spec.bits > 2 or (stored is not None and lowbit_spec(stored) == spec):
        return
    log.warning("%s %s: bitfold rounds every linear layer to nearest at %s bits without calibration, "
                "which breaks most models (Qwen2.5-1.5B int2: perplexity 9.8 -> 419). Use int3 or int4 "
                "(int4: +2.6%% perplexity), or a checkpoint trained or calibrated for %s bits (quantization-"
                "aware training such as EfficientQAT / BitDistiller%s).", flag, weights,
                "1.58" if spec.ternary else spec.bits, "1.58" if spec.ternary else spec.bits,
                ", or BitNet b1.58 models for ternary" if spec.ternary else "")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise BitfoldError("--device cuda was asked for but no CUDA GPU is available")
    return torch.device(name)


class LLMEngine:
    def __init__(self, config: EngineConfig, source: ModelSource | None = None):
        """`source` overrides `config.model` (benchmarks build random-weight sources); a
        source without a tokenizer runs token ids in, token ids out (text stays empty)."""
        config.validate()
        if config.async_scheduling not in ("auto", "on", "off"):
            raise BitfoldError(f"invalid engine setting async_scheduling={config.async_scheduling!r}: "
                               "expected auto, on or off")
        config = dataclasses.replace(config, block_size=config.effective_block_size())
        self.config = config
        source = source or open_model(config.model)
        self.model_path = source.path
        self.tokenizer = source.load_tokenizer() if source.load_tokenizer else None
        self.device = resolve_device(config.device)
        if self.device.type == "cpu":  # before loading: quantizing at load is where busy cores hurt most
            configure_threads(config.num_threads)
        if config.weights != "auto":
            warn_if_rounding_breaks(config.weights, source.weight_format)
        self.dtype = _DTYPES.get(config.dtype) or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        if config.max_model_len is not None and config.max_model_len > source.max_context:
            raise BitfoldError(f"max_model_len={config.max_model_len} exceeds the model's context "
                               f"length {source.max_context} ({source.path})")
        self.max_model_len = config.max_model_len or source.max_context
        self.runner = ModelRunner(source, config, self.device, self.dtype, self.max_model_len)
        log.info("%s", describe_weights(self.runner.model))  # -v: which formats, mixed or not, bits per weight
        self.pool = BlockPool(self.runner.num_blocks)
        self.kv = KVManager(self.pool, config.block_size, self.runner.num_seq_slots)
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens)
        self.async_scheduling = config.async_scheduling == "on" or (config.async_scheduling == "auto"
                                                                     and self.device.type == "cuda")
        self._inflight: StepHandle | None = None  # launched, tokens not read yet (async only)
        self._states: dict[str, _State] = {}
        self._ids = itertools.count()

    # -- requests ---------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None,
                    add_special_tokens: bool = True) -> str:
        """Validate and queue a request; raises InvalidRequestError (nothing queued) when bad."""
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        params.validate()
        if params.logprobs is not None and params.logprobs > MAX_LOGPROBS:
            raise InvalidSamplingParamsError(f"invalid sampling parameter logprobs={params.logprobs!r}: expected "
                                             f"at most {MAX_LOGPROBS} top log-probabilities per token")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequestError("this model has no tokenizer: pass prompts as token ids")
            check_text(prompt, "the prompt")
            text, ids = prompt, self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        elif isinstance(prompt, (list, tuple)):
            text, ids = None, list(prompt)
        else:
            hint = " (decode bytes first, e.g. data.decode('utf-8'))" if isinstance(prompt, (bytes, bytearray)) else ""
            raise InvalidRequestError(f"a prompt must be a str or a list of token ids, got {type(prompt).__name__}"
                                      + hint)
        vocab = self.runner.model_config.vocab_size
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:  # for text, a tokenizer that does not match the model
            raise InvalidRequestError(f"prompt token id {bad[0]!r} is outside the model's vocabulary [0, {vocab})")
        if not ids:
            raise InvalidRequestError("the prompt is empty (it encodes to no tokens)")
        if len(ids) >= self.max_model_len:
            raise PromptTooLongError(f"the prompt has {len(ids)} tokens but the model's context is "
                                     f"{self.max_model_len} (prompt + at least one generated token must fit)")
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self._states:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        eos = frozenset() if params.ignore_eos or self.tokenizer is None else self.tokenizer.eos_token_ids
        req = Request(request_id, ids, params, eos, self.max_model_len)
        need = blocks_for(req.max_total_tokens, self.config.block_size)
        if need > self.pool.num_blocks:
            raise PromptTooLongError(
                f"the request needs {need} KV blocks (prompt {len(ids)} + max_tokens {params.max_tokens} tokens) "
                f"but the cache holds only {self.pool.num_blocks}; lower max_tokens or raise --kv-cache-memory-gb")
        detok = IncrementalDetokenizer(self.tokenizer, ids) if self.tokenizer is not None else None
        self._states[request_id] = _State(req, text, detok, stop=params.stop,
                                          logprobs=[] if params.logprobs is not None else None)
        self.scheduler.add(req)
        return request_id

    def abort_request(self, request_id: str) -> None:
        st = self._states.pop(request_id, None)
        if st is not None:
            self.scheduler.finish(st.req, "abort")
            self.runner.release(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished

    # -- the loop ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one batch; return an output for every request that produced text or finished
        (with async scheduling: the outputs of the batch launched by the previous call)."""
        sched = self.scheduler.schedule()
        launched = None if sched.is_empty else self.runner.launch(sched)
        done = launched
        if self.async_scheduling:
            done, self._inflight = self._inflight, launched
        if done is None:
            return []
        sampled, logprobs = done.result()  # waits for that step only; the next one is queued
        self.scheduler.update(done.sched, sampled)
        outputs = []
        for chunk in done.sched.chunks:
            rid = chunk.request.request_id
            st = self._states.get(rid)
            # `st.req is chunk.request`: an aborted request's id may be in use again already.
            if rid in sampled and st is not None and st.req is chunk.request:
                outputs.append(self._advance(st, sampled[rid], logprobs.get(rid)))
        return outputs

    def _advance(self, st: _State, token: int, logprob: TokenLogprob | None) -> RequestOutput:
        req = st.req
        before = len(st.text)
        if st.logprobs is not None:
            st.logprobs.append(logprob)
        if st.detok is not None:
            st.text += st.detok.add(token)
            if req.finished:
                st.text += st.detok.flush()
        if st.stop:
            start = max(0, before - max(len(s) for s in st.stop) + 1)
            hits = [(i, s) for s in st.stop if (i := st.text.find(s, start)) >= 0]
            if hits:
                st.text = st.text[: min(hits)[0]]
                self.scheduler.finish(req, "stop")
        visible = len(st.text) if req.finished else len(st.text) - _holdback(st.text, st.stop)
        delta, st.emitted = st.text[st.emitted : visible], max(st.emitted, visible)
        if req.finished:
            del self._states[req.request_id]
            self.runner.release(req.request_id)
        return RequestOutput(req.request_id, st.prompt, req.prompt_token_ids, st.text[: st.emitted],
                             list(req.output_token_ids), req.finished, req.finish_reason, delta,
                             None if st.logprobs is None else list(st.logprobs))
