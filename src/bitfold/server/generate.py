"""One completion or chat completion: prompt -> engine -> JSON response or an SSE stream.

A request that ends early on the client's side is aborted on the server's: a streaming client
that disconnects cancels the response task (Starlette watches for the disconnect), and the
stream's close hook aborts the request, which frees its KV blocks before the engine's next
step; a non-streaming request polls for the disconnect while it waits.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from typing import TYPE_CHECKING, AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from bitfold.errors import PromptTooLongError
from bitfold.server.async_engine import AsyncEngine, RequestStream
from bitfold.server.http_errors import APIError, api_error
from bitfold.server.protocol import ChatCompletionRequest, CompletionRequest
from bitfold.server.responses import DONE, Shape, TokenText, chat_logprobs, completion_logprobs, sse, usage

if TYPE_CHECKING:
    from bitfold.server.app import ServerState

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context
DISCONNECT_POLL_S = 0.5


class ClientClosedResponse(Response):
    """What a non-streaming request whose client left answers (nobody reads it: nginx's 499)."""

    def __init__(self):
        super().__init__(status_code=499)


class SSEResponse(StreamingResponse):
    """Server-sent events whose `on_close` runs however the response ends: completed, client
    gone (the stream task is cancelled), or cancelled by a server shutdown."""

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def _prompt_ids(tok, body, chat: bool, limit: int) -> list[int]:
    """The prompt's token ids, or PromptTooLongError once it certainly has more than `limit`.
    Runs in a worker thread: rendering and tokenizing a long prompt takes seconds."""
    if chat:
        text = tok.apply_chat_template([m.as_template_message() for m in body.messages], add_generation_prompt=True)
        return tok.encode_within(text, limit, add_special_tokens=False)  # the template wrote the special tokens
    return tok.encode_within(body.prompt, limit) if isinstance(body.prompt, str) else list(body.prompt)


async def generate(state: ServerState, body: CompletionRequest | ChatCompletionRequest, request: Request,
                   chat: bool) -> Response:
    eng = state.engine.check_ready()
    body.check()
    state.check_model(body.model)
    param = "messages" if chat else "prompt"
    max_tokens = body.requested_max_tokens if chat else body.max_tokens
    if (chat or isinstance(body.prompt, str)) and eng.tokenizer is None:
        raise APIError(400, "this model has no tokenizer: send the prompt as token ids", param="prompt")
    try:
        ids = await asyncio.get_running_loop().run_in_executor(
            state.tokenize_pool, _prompt_ids, eng.tokenizer, body, chat, max(0, eng.max_model_len - (max_tokens or 1)))
    except PromptTooLongError as e:
        raise APIError(400, f"This model's maximum context length is {eng.max_model_len} tokens and {max_tokens or 1} "
                            f"are asked for the completion; the {param} is longer than the rest ({e}). Please reduce "
                            f"the length of the {param} or completion.", param=param,
                       code="context_length_exceeded") from None
    if not ids:
        raise APIError(400, f"the {param} is empty (it encodes to no tokens)", param=param)
    limit = min(eng.max_model_len, eng.pool.num_blocks * eng.config.block_size)  # context, and what the KV cache holds
    if max_tokens is None:
        max_tokens = max(limit - len(ids), 1) if chat else DEFAULT_COMPLETION_MAX_TOKENS
    if len(ids) + max_tokens > eng.max_model_len:
        raise APIError(400, f"This model's maximum context length is {eng.max_model_len} tokens. However, you "
                            f"requested {len(ids) + max_tokens} tokens ({len(ids)} in the {param}, {max_tokens} in "
                            f"the completion). Please reduce the length of the {param} or completion.",
                       param=param, code="context_length_exceeded")
    logprobs = body.num_logprobs if chat else body.logprobs
    params = body.sampling_params(max_tokens, logprobs)
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    stream = await state.engine.add_request(rid, ids, params)
    shape = Shape(rid, int(time.time()), body.model, chat, body.include_usage)
    token_text = TokenText(eng.tokenizer) if logprobs is not None else None
    if body.stream:
        return SSEResponse(_events(stream, shape, token_text, state.keepalive_s, state.engine),
                           on_close=lambda: state.engine.abort(rid))
    try:
        final = await _final_or_disconnect(stream, request)
    finally:
        state.engine.abort(rid)  # a no-op once it finished
    if final is None:
        return ClientClosedResponse()
    lps = None
    if token_text is not None:
        lps = chat_logprobs(final.logprobs, token_text) if chat else completion_logprobs(final.logprobs, token_text, 0)
    return JSONResponse(shape.response(final.text, final.finish_reason, lps,
                                       usage(stream.num_prompt_tokens, len(final.token_ids))))


async def _final_or_disconnect(stream: RequestStream, request: Request):
    """The finished output, or None when the client disconnected first."""
    task = asyncio.ensure_future(stream.final())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                return None
    finally:
        task.cancel()


def _keepalive(engine: AsyncEngine, request_id: str, since: float) -> str:
    """An SSE comment (clients ignore it; it keeps proxies and read timeouts from closing the
    stream) that says where the request stands."""
    stats = engine.stats
    position = stats.positions.get(request_id)
    waited = time.perf_counter() - since
    if position is not None:
        return f": queued, position {position} of {stats.waiting} waiting, {waited:.0f}s so far\n\n"
    return f": running, no new text for {waited:.0f}s\n\n"


async def _outputs(stream: RequestStream, keepalive_s: float, engine: AsyncEngine) -> AsyncIterator[object]:
    """The stream's outputs, and a keep-alive comment (a str) whenever `keepalive_s` pass without one."""
    since = time.perf_counter()
    nxt = asyncio.ensure_future(stream.__anext__())
    try:
        while True:
            done, _ = await asyncio.wait({nxt}, timeout=keepalive_s)
            if not done:
                yield _keepalive(engine, stream.request_id, since)
                continue
            try:
                out = nxt.result()
            except StopAsyncIteration:
                return
            yield out
            since = time.perf_counter()
            nxt = asyncio.ensure_future(stream.__anext__())
    finally:
        nxt.cancel()


async def _events(stream: RequestStream, shape: Shape, token_text: TokenText | None, keepalive_s: float,
                  engine: AsyncEngine) -> AsyncIterator[str]:
    """The SSE body: outputs that queued up while the client read are sent as one chunk; while
    nothing comes (queued behind a full batch, a long prefill), a comment every `keepalive_s`."""
    sent_logprobs, offset = 0, 0
    if shape.chat:
        yield sse(shape.chunk(None, role=True))
    try:
        async for first in _outputs(stream, keepalive_s, engine):
            if isinstance(first, str):
                yield first
                continue
            outs = [first, *stream.drain()]
            last = outs[-1]
            text = "".join(o.delta for o in outs)
            lps = None
            if token_text is not None and len(last.logprobs) > sent_logprobs:
                new = last.logprobs[sent_logprobs:]
                sent_logprobs = len(last.logprobs)
                lps = chat_logprobs(new, token_text) if shape.chat else completion_logprobs(new, token_text, offset)
                offset += sum(len(t) for t in lps.get("tokens", ()))
            finish = last.finish_reason if last.finished else None
            if shape.chat:
                if text or lps:
                    yield sse(shape.chunk(text, logprobs=lps))
                if finish:
                    yield sse(shape.chunk(None, finish_reason=finish))
            elif text or lps or finish:
                yield sse(shape.chunk(text, finish_reason=finish, logprobs=lps))
            if last.finished:
                if shape.include_usage:
                    yield sse(shape.usage_chunk(usage(stream.num_prompt_tokens, len(last.token_ids))))
                break
    except Exception as e:  # the engine failed or shut down mid-stream: tell the client in-band
        yield sse(api_error(e).body())
    yield DONE
