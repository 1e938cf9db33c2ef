"""The engine loop behind the HTTP server: one thread owns the `LLMEngine`, every request shares it.

`LLMEngine` is synchronous and not thread-safe, and its `step()` runs for milliseconds to
seconds; the HTTP side is asyncio. So one background thread loads the engine (the server
answers 503 meanwhile), then loops: apply the commands that arrived (add / abort / stop) between
steps, run `step()` while there is work, and hand each step's outputs to the event loop with one
`call_soon_threadsafe`. Each request reads its outputs from a `RequestStream` (an asyncio queue).

Adding a request is a round trip through the engine thread: the engine validates it (raising
the typed bitfold errors before any state changes) and checks the waiting queue's bound there,
so the HTTP handler learns "400" or "429" synchronously and nothing is queued. An abort reaches
the engine between two steps and frees the request's KV blocks at once.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from typing import Callable

from bitfold.engine import LLMEngine, RequestOutput
from bitfold.errors import BitfoldError
from bitfold.sampling import SamplingParams
from bitfold.server.metrics import EngineStats, Metrics

log = logging.getLogger("bitfold")


class QueueFullError(BitfoldError):
    """The waiting queue holds --max-queue requests already (HTTP 429)."""


class EngineUnavailableError(BitfoldError):
    """The model is still loading, failed to load, or the server is shutting down (HTTP 503)."""


class RequestStream:
    """One request's outputs, in order, on the event loop. Iterating yields RequestOutputs up to
    the finished one; an engine failure is raised from the iteration."""

    def __init__(self, request_id: str, num_prompt_tokens: int):
        self.request_id = request_id
        self.num_prompt_tokens = num_prompt_tokens
        self.arrival = time.perf_counter()
        self.last_token_time: float | None = None
        self.num_tokens = 0
        self.finished = False  # the engine is done with it (finished, failed or aborted)
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestOutput:
        if self._queue.empty() and self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def drain(self) -> list[RequestOutput]:
        """Outputs already queued, without waiting (lets a slow reader coalesce them)."""
        items = []
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if isinstance(item, BaseException):
                raise item
            items.append(item)
        return items

    async def final(self) -> RequestOutput:
        last = None
        async for out in self:
            last = out
        return last


class AsyncEngine:
    """`load` builds the engine (in the engine thread, so the server can listen meanwhile).
    `max_queue` bounds the requests that wait for a slot in the running batch (those a full
    batch keeps out, see `queued`); one more is refused with 429."""

    def __init__(self, load: Callable[[], LLMEngine], *, max_queue: int = 1024, metrics: Metrics | None = None):
        self._load = load
        self.max_queue = max_queue
        self.metrics = metrics or Metrics()
        self.engine: LLMEngine | None = None
        self.load_error: BaseException | None = None
        self.loaded = threading.Event()  # set when loading ended, well or not
        self.stats = EngineStats()
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}  # event-loop side
        self._active: set[str] = set()  # engine-thread side: requests the engine holds
        self._added: dict[str, float] = {}  # engine-thread side: not yet admitted -> when added (perf_counter)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False

    # -- life cycle (event loop) ------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="bitfold-engine", daemon=True)
        self._thread.start()

    @property
    def ready(self) -> bool:
        return self.engine is not None and not self._stopping

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Abort what is still running, stop the engine thread and wait for it."""
        self._stopping = True
        self._cmds.put(("stop",))
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, timeout)

    def cancel_all(self, reason: str) -> None:
        """End every request now: each stream raises EngineUnavailableError(reason) (an SSE
        response then closes properly with an error event and [DONE]) and the engine frees
        their blocks. For the end of a graceful shutdown's grace period."""
        self._cmds.put(("fail_all", EngineUnavailableError(reason)))

    def check_ready(self) -> LLMEngine:
        if self._stopping:
            raise EngineUnavailableError("the server is shutting down")
        if self.load_error is not None:  # why (file paths...) is for the server's log, not for clients
            raise EngineUnavailableError(f"the model failed to load ({type(self.load_error).__name__}; the server's "
                                         "log says why)")
        if self.engine is None:
            raise EngineUnavailableError("the model is still loading; retry in a moment")
        return self.engine

    # -- requests (event loop) --------------------------------------------------------------------
    async def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> RequestStream:
        """Queue a request; raises its validation error (InvalidRequestError, QueueFullError, ...)
        here, before anything is queued. Read the outputs from the returned stream, and call
        `abort` if you stop reading before it finished."""
        self.check_ready()
        stream = RequestStream(request_id, len(prompt_token_ids))
        self._streams[request_id] = stream
        accepted = self._loop.create_future()
        self._cmds.put(("add", request_id, prompt_token_ids, params, accepted))
        try:
            await accepted
        except BaseException:  # refused, or the handler was cancelled meanwhile
            self._streams.pop(request_id, None)
            refused = accepted.done() and not accepted.cancelled() and accepted.exception() is not None
            if not refused:  # it may be (or get) queued: take it back
                self._cmds.put(("abort", request_id))
            raise
        self.metrics.prompt_tokens.inc(len(prompt_token_ids))
        return stream

    def abort(self, request_id: str) -> None:
        """Cancel a request (a no-op when it already finished); its blocks are freed before the
        engine's next step."""
        stream = self._streams.pop(request_id, None)
        if stream is not None and not stream.finished:
            stream.finished = True
            self._cmds.put(("abort", request_id))
            self.metrics.requests_finished.inc(finish_reason="abort")
            self.metrics.e2e.observe(time.perf_counter() - stream.arrival)

    # -- the engine thread ------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            engine = self._load()
        except BaseException as e:  # reported through /health and 503s; the CLI exits with it
            log.error("model loading failed: %s", e)
            self.load_error = e
            self.loaded.set()
            return
        self._publish(engine, 0)
        self.engine = engine
        self.loaded.set()
        steps = 0
        while True:
            if not self._apply(engine, self._take_commands(block=not engine.has_unfinished_requests())):
                break
            if not engine.has_unfinished_requests():
                self._publish(engine, steps)
                continue
            try:
                outputs = engine.step()
            except Exception as e:  # a bug or the device failing: end every request, keep serving
                log.exception("engine step failed; aborting %d request(s)", len(self._active))
                self._fail_all(engine, e)
                continue
            steps += 1
            now = time.perf_counter()
            for out in outputs:
                if out.finished:
                    self._active.discard(out.request_id)
            self._publish(engine, steps)
            if outputs:
                self._call_soon(self._deliver, outputs, now)
        self._fail_all(engine, EngineUnavailableError("the server shut down before this request finished"))
        self._publish(engine, steps)

    def _call_soon(self, fn, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    def _take_commands(self, block: bool) -> list[tuple]:
        cmds = [self._cmds.get()] if block else []
        while True:
            try:
                cmds.append(self._cmds.get_nowait())
            except queue.Empty:
                return cmds

    def _apply(self, engine: LLMEngine, cmds: list[tuple]) -> bool:
        """Run add / abort commands in arrival order; False once asked to stop."""
        for cmd in cmds:
            if cmd[0] == "stop":
                return False
            if cmd[0] == "fail_all":
                self._fail_all(engine, cmd[1])
                continue
            if cmd[0] == "abort":
                if cmd[1] in self._active:
                    engine.abort_request(cmd[1])
                    self._active.discard(cmd[1])
                    self._added.pop(cmd[1], None)
                continue
            _, rid, ids, params, accepted = cmd
            error = None
            try:
                if queued(engine) >= self.max_queue:
                    raise QueueFullError(f"the server's waiting queue is full ({self.max_queue} requests wait for "
                                         f"a slot in the running batch of {engine.config.max_num_seqs}); retry later")
                engine.add_request(ids, params, request_id=rid)
                self._active.add(rid)
                self._added[rid] = time.perf_counter()
            except Exception as e:  # BitfoldError for bad input; anything else is reported the same way
                error = e
            self._call_soon(_resolve, accepted, error)
        return True

    def _fail_all(self, engine: LLMEngine, error: BaseException) -> None:
        for rid in list(self._active):
            engine.abort_request(rid)
        failed, self._active = list(self._active), set()
        self._added.clear()
        if failed:
            self._call_soon(self._deliver_error, failed, error)

    def _publish(self, engine: LLMEngine, steps: int) -> None:
        s = engine.scheduler
        positions = {r.request_id: i for i, r in enumerate(s.waiting, 1)} if s.waiting else {}
        if self._added:  # requests that joined the batch since the last step: their time in the queue
            now = time.perf_counter()
            admitted = [rid for rid in self._added if rid not in positions]
            waits = [now - self._added.pop(rid) for rid in admitted if rid in self._active]
            for rid in admitted:
                self._added.pop(rid, None)
            if waits:
                self._call_soon(self._observe_queue_times, waits)
        oldest = min(self._added.values(), default=None)
        self.stats = EngineStats(running=len(s.running), waiting=len(s.waiting), queued=queued(engine),
                                 oldest_waiting_since=oldest, positions=positions,
                                 kv_blocks_total=engine.pool.num_blocks, kv_blocks_free=engine.pool.num_free,
                                 block_size=engine.config.block_size, num_preemptions=s.num_preemptions, steps=steps)

    # -- back on the event loop -------------------------------------------------------------------
    def _observe_queue_times(self, waits: list[float]) -> None:
        for w in waits:
            self.metrics.queue_time.observe(w)

    def _deliver(self, outputs: list[RequestOutput], t: float) -> None:
        m = self.metrics
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None or stream.finished:  # aborted while the step ran
                continue
            new = len(out.token_ids) - stream.num_tokens
            if new > 0:
                if stream.last_token_time is None:
                    m.ttft.observe(t - stream.arrival)
                else:
                    m.itl.observe(t - stream.last_token_time)
                stream.last_token_time, stream.num_tokens = t, len(out.token_ids)
                m.generation_tokens.inc(new)
            if out.finished:
                stream.finished = True
                del self._streams[out.request_id]
                m.requests_finished.inc(finish_reason=out.finish_reason or "stop")
                m.e2e.observe(t - stream.arrival)
            stream._queue.put_nowait(out)

    def _deliver_error(self, request_ids: list[str], error: BaseException) -> None:
        for rid in request_ids:
            stream = self._streams.pop(rid, None)
            if stream is not None and not stream.finished:
                stream.finished = True
                self.metrics.requests_finished.inc(finish_reason="error")
                stream._queue.put_nowait(error)


def queued(engine: LLMEngine) -> int:
    """Requests that wait beyond the batch slots still free. A burst that arrives between two
    steps sits in the scheduler's waiting list until the next step admits it; only what cannot
    join the running batch (max_num_seqs) is really queued."""
    s = engine.scheduler
    return max(0, len(s.waiting) - max(0, engine.config.max_num_seqs - len(s.running)))


def _resolve(future: asyncio.Future, error: BaseException | None) -> None:
    if future.done():  # the waiting handler was cancelled
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
