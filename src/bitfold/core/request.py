"""A request's life on the CPU: its tokens, how many of them sit in the KV cache, its status."""
from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

from bitfold.sampling import SamplingParams

_arrival = itertools.count()


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """One generation request.

    `num_computed_tokens` counts the leading tokens whose K/V are in the cache or being
    written by a scheduled step (the scheduler advances it when it schedules a chunk). A
    request is "decoding" when exactly one token (the last sampled) is missing from the cache;
    after preemption it drops to 0 and prompt + output are recomputed.

    `num_pending_tokens` counts tokens sampled by launched steps whose results the host has not
    read yet (async scheduling reads tokens one step late; at most 2, between scheduling a
    step and reading the one before). The next step may already compute such a token: its id
    then comes from the device, not from `output_token_ids`.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    max_model_len: int = 1 << 30
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    num_preemptions: int = 0
    num_pending_tokens: int = 0
    arrival: int = field(default_factory=lambda: next(_arrival))

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """all_token_ids[start:end] without building the concatenation (decode reads one token
        of a possibly 32K-token prompt every step)."""
        p = len(self.prompt_token_ids)
        if start >= p:
            return self.output_token_ids[start - p : end - p]
        if end <= p:
            return self.prompt_token_ids[start:end]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - p]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def max_total_tokens(self) -> int:
        """The most tokens this request can ever hold in the cache."""
        return min(len(self.prompt_token_ids) + self.sampling.max_tokens, self.max_model_len)

    @property
    def ends_when_pending_resolves(self) -> bool:
        """True when the pending token is certain to be the last (max_tokens or the context is
        reached whatever it is), so no further step needs to compute it."""
        n_out = len(self.output_token_ids) + self.num_pending_tokens
        return self.num_pending_tokens > 0 and (n_out >= self.sampling.max_tokens
                                                or self.num_tokens + self.num_pending_tokens >= self.max_model_len)

    def append_token(self, token_id: int) -> str | None:
        """Record a sampled token; return the finish reason if it ends the request."""
        self.output_token_ids.append(token_id)
        sp = self.sampling
        if not sp.ignore_eos and token_id in self.eos_token_ids:
            return "stop"
        if token_id in sp.stop_token_ids:
            return "stop"
        if len(self.output_token_ids) >= sp.max_tokens or self.num_tokens >= self.max_model_len:
            return "length"
        return None
