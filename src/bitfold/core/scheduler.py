"""Continuous batching with chunked prefill and recompute preemption (CPU only).

Each step spends a token budget: running requests first (one token each when decoding, the
next chunk of their prompt otherwise), then waiting requests join in arrival order. When the
block pool runs dry, the newest running request is preempted: its blocks are freed and it is
recomputed later from its prompt and the tokens it already produced (vLLM's recompute mode).
The step is described to the runner by an explicit `SchedulerOutput`.

Scheduling a chunk advances the request's `num_computed_tokens` at once, and a chunk that
samples leaves one pending token until `update` appends it. That lets the engine schedule
step N+1 before it has read step N's tokens (async scheduling, as in vLLM v1): a decoding
request's next input is then its pending token, which the runner takes from the device. A
request whose pending token is certainly its last (max_tokens, context) is not scheduled
again; one that stops on EOS or a stop string computes one more token, which is discarded.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from bitfold.core.kv_manager import KVManager
from bitfold.core.request import Request, RequestStatus


@dataclass
class ScheduledChunk:
    """Compute tokens [start, start + num_tokens) of `request`; `block_table` covers them.
    `samples`: the chunk reaches the request's last token, so the runner samples the next one
    (left None, it is worked out from the request as it stands). `pending`: the chunk's one
    token is the request's pending sample (async scheduling), whose id lives on the device.
    `seq_slot`: the request's slot of per-sequence KV storage (-1: the codec keeps none)."""

    request: Request
    start: int
    num_tokens: int
    block_table: list[int]
    samples: bool | None = None
    pending: bool = False
    seq_slot: int = -1

    def __post_init__(self) -> None:
        if self.samples is None:
            self.samples = self.start + self.num_tokens == self.request.num_tokens

    @property
    def token_ids(self) -> list[int]:
        """The chunk's token ids known on the host (a pending chunk's id is on the device)."""
        if self.pending:
            return [0]
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

    def _chunk(self, req: Request, n: int) -> ScheduledChunk:
        """Describe [num_computed, num_computed + n) of `req` and account for it as scheduled."""
        start, known = req.num_computed_tokens, req.num_tokens + req.num_pending_tokens
        chunk = ScheduledChunk(req, start, n, list(self.kv.block_table(req)), samples=start + n == known,
                               pending=req.num_pending_tokens > 0, seq_slot=self.kv.seq_slot(req))
        req.num_computed_tokens += n
        req.num_pending_tokens += chunk.samples
        return chunk

    @staticmethod
    def _to_compute(req: Request) -> int:
        """Tokens `req` could compute now. A pending token can only be the one input of a
        decode chunk (a preempted request waits until its pending token is read back)."""
        if req.num_pending_tokens and (req.ends_when_pending_resolves or req.num_computed_tokens < req.num_tokens):
            return 0
        return req.num_tokens + req.num_pending_tokens - req.num_computed_tokens

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(self._to_compute(req), budget)
            if n == 0:  # waits for its last token (async scheduling)
                i += 1
                continue
            while not self.kv.allocate_slots(req, n):
                # Only requests not yet scheduled this step can give up their blocks.
                victim = max(self.running[i:], key=lambda r: r.arrival)
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            else:
                out.chunks.append(self._chunk(req, n))
                budget -= n
                i += 1
                continue
            # `req` itself was the newest and went back to waiting; running[i] is the next one.
        # A step that had to preempt admits nobody new: the pool is the bottleneck (and a
        # preempted request may still have a pending token, resolved before the next step).
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not out.preempted:
            req = self.waiting[0]
            n = min(self._to_compute(req), budget)
            if n == 0 or not self.kv.allocate_slots(req, n):
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.chunks.append(self._chunk(req, n))
            budget -= n
        return out

    def update(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Append the tokens a step sampled (`out` as `schedule` returned it); return the
        requests that finished."""
        finished = []
        for chunk in out.chunks:
            req = chunk.request
            if req.finished or not chunk.samples:  # finished (or aborted) while the step ran
                continue
            req.num_pending_tokens -= 1
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
