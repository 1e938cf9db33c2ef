"""Continuous batching with chunked prefill and recompute preemption (CPU only).

Each step spends a token budget: running requests first (one token each when decoding, the
next chunk of their prompt otherwise), then waiting requests join in arrival order. When the
block pool runs dry, the newest running request is preempted: its blocks are freed and it is
recomputed later from its prompt and the tokens it already produced (vLLM's recompute mode).
The step is described to the runner by an explicit `SchedulerOutput`.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from bitfold.core.kv_manager import KVManager
from bitfold.core.request import Request, RequestStatus


@dataclass
class ScheduledChunk:
    """Compute tokens [start, start + num_tokens) of `request`; `block_table` covers them.
    When the chunk reaches the request's last known token, the runner samples the next one."""

    request: Request
    start: int
    num_tokens: int
    block_table: list[int]

    @property
    def samples(self) -> bool:
        return self.start + self.num_tokens == self.request.num_tokens

    @property
    def token_ids(self) -> list[int]:
        return self.request.token_slice(self.start, self.start + self.num_tokens)


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


class Scheduler:
    def __init__(self, kv: KVManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, req: Request) -> None:
        req.status = RequestStatus.WAITING
        self.waiting.append(req)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)
        self.num_preemptions += 1

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        scheduled: set[str] = set()
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self.kv.allocate_slots(req, n):
                # Only requests not yet scheduled this step can give up their blocks.
                victim = max(self.running[i:], key=lambda r: r.arrival)
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            else:
                out.chunks.append(ScheduledChunk(req, req.num_computed_tokens, n, list(self.kv.block_table(req))))
                scheduled.add(req.request_id)
                budget -= n
                i += 1
                continue
            # `req` itself was the newest and went back to waiting; running[i] is the next one.
        # A step that had to preempt admits nobody new: the pool is the bottleneck.
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not out.preempted:
            req = self.waiting[0]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if not self.kv.allocate_slots(req, n):
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.chunks.append(ScheduledChunk(req, req.num_computed_tokens, n, list(self.kv.block_table(req))))
            budget -= n
        return out

    def update(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Advance the scheduled requests; append the sampled tokens; return those that finished."""
        finished = []
        for chunk in out.chunks:
            req = chunk.request
            if req.finished:  # aborted while the step ran
                continue
            req.num_computed_tokens += chunk.num_tokens
            if chunk.samples:
                reason = req.append_token(sampled[req.request_id])
                if reason is not None:
                    self.finish(req, reason)
                    finished.append(req)
        return finished

    def finish(self, req: Request, reason: str) -> None:
        """End a request (done, stopped by a stop string, or aborted) and free its blocks."""
        if req.finished:
            return
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.kv.free(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
