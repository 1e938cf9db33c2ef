"""Prometheus metrics in the text exposition format, written by hand (no client library: the
format is a few lines per metric, and `bitfold serve` should not need another dependency).

https://prometheus.io/docs/instrumenting/exposition_formats/

Every update happens on the server's event-loop thread (the HTTP handlers and the delivery of
engine outputs both run there), so nothing here locks. Engine-side gauges (queue depth, KV
blocks) come from the `EngineStats` snapshot the engine thread publishes after every step.
"""
from __future__ import annotations

import bisect
import math
import time
from dataclasses import dataclass, field

# Latency buckets in seconds: TTFT spans a CPU prefill of a long prompt (seconds) down to a GPU
# decode step (milliseconds); inter-token latency is one decode step.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
               0.4, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)
QUEUE_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)


@dataclass(frozen=True)
class EngineStats:
    """What the engine thread publishes after each step (read by /metrics and the 429 check's
    message): request counts and the KV block pool."""

    running: int = 0
    waiting: int = 0
    queued: int = 0  # waiting beyond the batch slots still free: what --max-queue bounds
    oldest_waiting_since: float | None = None  # perf_counter() time the oldest waiting request was added
    positions: dict[str, int] = field(default_factory=dict, compare=False)  # request id -> place in line (1 = next)
    kv_blocks_total: int = 0
    kv_blocks_free: int = 0
    block_size: int = 0
    num_preemptions: int = 0
    steps: int = 0

    @property
    def kv_blocks_used(self) -> int:
        return self.kv_blocks_total - self.kv_blocks_free


def _fmt(v: float) -> str:
    if v == math.inf:
        return "+Inf"
    return repr(float(v)) if isinstance(v, float) and not v.is_integer() else str(int(v))


def _labels(pairs: tuple[tuple[str, str], ...]) -> str:
    if not pairs:
        return ""
    esc = [(k, str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")) for k, v in pairs]
    return "{" + ",".join(f'{k}="{v}"' for k, v in esc) + "}"


@dataclass
class Counter:
    name: str
    help: str
    values: dict[tuple[tuple[str, str], ...], float] = field(default_factory=dict)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        self.values[key] = self.values.get(key, 0.0) + amount

    def get(self, **labels: str) -> float:
        return self.values.get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        if not self.values:
            out.append(f"{self.name} 0")
        out += [f"{self.name}{_labels(k)} {_fmt(v)}" for k, v in sorted(self.values.items())]
        return out


@dataclass
class Histogram:
    """Cumulative buckets, as Prometheus wants them: `le` counts every observation <= bound."""

    name: str
    help: str
    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    sum: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, v)] += 1
        self.sum += v
        self.count += 1

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        acc = 0
        for bound, n in zip(self.bounds + (math.inf,), self.counts):
            acc += n
            out.append(f'{self.name}_bucket{{le="{_fmt(bound)}"}} {acc}')
        out += [f"{self.name}_sum {_fmt(self.sum)}", f"{self.name}_count {self.count}"]
        return out


def _gauge(name: str, help: str, value: float) -> list[str]:
    return [f"# HELP {name} {help}", f"# TYPE {name} gauge", f"{name} {_fmt(value)}"]


class Metrics:
    """The server's metrics; `render(stats, ready)` is the /metrics body."""

    def __init__(self) -> None:
        self.http_requests = Counter("bitfold_http_requests_total", "HTTP requests by endpoint and status code.")
        self.requests_finished = Counter("bitfold_requests_finished_total",
                                         "Generation requests ended, by finish reason (stop, length, abort, error).")
        self.prompt_tokens = Counter("bitfold_prompt_tokens_total", "Prompt tokens of admitted requests.")
        self.generation_tokens = Counter("bitfold_generation_tokens_total", "Tokens generated.")
        self.ttft = Histogram("bitfold_time_to_first_token_seconds",
                              "Time from a request's arrival to its first generated token.", TTFT_BUCKETS)
        self.itl = Histogram("bitfold_inter_token_latency_seconds",
                             "Time between consecutive generated tokens of a request.", ITL_BUCKETS)
        self.e2e = Histogram("bitfold_request_latency_seconds",
                             "Time from a request's arrival to its end (finished or aborted).", E2E_BUCKETS)
        self.queue_time = Histogram("bitfold_queue_time_seconds",
                                    "Time a request waited before it joined the running batch.", QUEUE_BUCKETS)

    def render(self, stats: EngineStats, ready: bool, now: float | None = None) -> str:
        now = time.perf_counter() if now is None else now
        oldest = 0.0 if stats.oldest_waiting_since is None else max(0.0, now - stats.oldest_waiting_since)
        lines: list[str] = []
        lines += _gauge("bitfold_model_ready", "1 once the model is loaded and requests are served.", int(ready))
        lines += _gauge("bitfold_requests_running", "Requests being generated (in the running batch).", stats.running)
        lines += _gauge("bitfold_requests_waiting", "Requests not yet in the running batch (incl. those joining "
                        "at the next step).", stats.waiting)
        lines += _gauge("bitfold_requests_queued", "Requests waiting beyond the free batch slots (--max-queue "
                        "bounds this).", stats.queued)
        lines += _gauge("bitfold_queue_oldest_wait_seconds", "How long the oldest waiting request has waited.",
                        oldest)
        lines += _gauge("bitfold_kv_blocks_total", "KV-cache blocks in the pool.", stats.kv_blocks_total)
        lines += _gauge("bitfold_kv_blocks_used", "KV-cache blocks held by requests.", stats.kv_blocks_used)
        lines += _gauge("bitfold_kv_blocks_free", "KV-cache blocks free.", stats.kv_blocks_free)
        lines += _gauge("bitfold_kv_block_size_tokens", "Tokens per KV-cache block.", stats.block_size)
        lines += ["# HELP bitfold_preemptions_total Requests preempted (blocks freed, recomputed later).",
                  "# TYPE bitfold_preemptions_total counter", f"bitfold_preemptions_total {stats.num_preemptions}",
                  "# HELP bitfold_engine_steps_total Engine steps run.", "# TYPE bitfold_engine_steps_total counter",
                  f"bitfold_engine_steps_total {stats.steps}"]
        for m in (self.http_requests, self.requests_finished, self.prompt_tokens, self.generation_tokens,
                  self.ttft, self.itl, self.e2e, self.queue_time):
            lines += m.render()
        return "\n".join(lines) + "\n"


def parse_metrics(text: str) -> dict[str, float]:
    """`name{labels}` -> value for every sample line (for tests and the benchmark)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out
