"""A client that goes away cancels its request: its KV blocks are free within the engine's next
steps, whether it was streaming, waiting in the queue, or waiting for a non-streamed answer.
The engine here pauses 50 ms before each step, so a 400-token request is surely still running
when its client leaves. What is checked is counted in engine steps and tokens, not seconds: the
time limits below only keep a broken server from hanging the test."""
from __future__ import annotations

import time

import httpx
import pytest

from bitfold.server.app import create_app
from tests.server.conftest import LiveServer, SlowEngine, tiny_config

pytestmark = pytest.mark.usefixtures("single_thread")

LONG = {"model": "tiny", "prompt": "1 2 3", "max_tokens": 400, "ignore_eos": True, "temperature": 0}


@pytest.fixture(scope="module")
def slow_server(tiny_model_dir):
    app = create_app(lambda: SlowEngine(tiny_config(tiny_model_dir, max_num_seqs=1)), model_name="tiny")
    with LiveServer(app) as s:
        yield s


def _aborts(server) -> float:
    return server.metrics().get('bitfold_requests_finished_total{finish_reason="abort"}', 0.0)


def _steps_until_freed(server, steps_before: float) -> float:
    """Engine steps run between `steps_before` and the moment nothing holds a KV block."""
    m = server.wait_idle(timeout=60)
    assert m["bitfold_kv_blocks_used"] == 0
    return m["bitfold_engine_steps_total"] - steps_before


def test_stream_disconnect_mid_stream(slow_server):
    before = _aborts(slow_server)
    with httpx.Client(timeout=30) as c:
        with c.stream("POST", slow_server.url + "/v1/completions", json={**LONG, "stream": True}) as r:
            lines = r.iter_lines()
            events = 0
            while events < 3:
                events += next(lines).startswith("data:")
            m = slow_server.metrics()
            assert m["bitfold_requests_running"] == 1 and m["bitfold_kv_blocks_used"] > 0
    steps = _steps_until_freed(slow_server, m["bitfold_engine_steps_total"])
    assert steps <= 5, f"blocks freed only after {steps:.0f} more engine steps"  # the abort runs between steps
    assert _aborts(slow_server) == before + 1


def test_disconnect_while_waiting_in_the_queue(slow_server):
    """B waits behind A (max_num_seqs 1); B's client leaves: B leaves the queue, A goes on."""
    with httpx.Client(timeout=30) as ca, httpx.Client(timeout=30) as cb:
        with ca.stream("POST", slow_server.url + "/v1/completions", json={**LONG, "stream": True}) as a:
            a_lines = a.iter_lines()
            next(a_lines)
            with cb.stream("POST", slow_server.url + "/v1/completions", json={**LONG, "stream": True}) as b:
                assert b.status_code == 200
                deadline = time.monotonic() + 60
                while slow_server.metrics()["bitfold_requests_waiting"] != 1:
                    assert time.monotonic() < deadline
                    time.sleep(0.01)
            deadline = time.monotonic() + 60
            while slow_server.metrics()["bitfold_requests_waiting"] != 0:
                assert time.monotonic() < deadline, "the waiting request was not aborted"
                time.sleep(0.01)
            m = slow_server.metrics()
            assert m["bitfold_requests_running"] == 1
            assert m['bitfold_requests_finished_total{finish_reason="abort"}'] >= 1
            assert sum(line.startswith("data:") for line in [next(a_lines) for _ in range(6)]) >= 2  # A goes on
    _steps_until_freed(slow_server, 0)


def test_non_streaming_client_timeout_aborts(slow_server):
    """The handler notices the disconnect at its next poll (every 0.5 s) and aborts: the request
    ends as an abort long before its 400 tokens."""
    before = _aborts(slow_server)
    tokens = slow_server.metrics()["bitfold_generation_tokens_total"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(slow_server.url + "/v1/completions", json=LONG, timeout=0.5)
    _steps_until_freed(slow_server, 0)
    assert _aborts(slow_server) == before + 1
    assert slow_server.metrics()["bitfold_generation_tokens_total"] - tokens < LONG["max_tokens"]
    r = httpx.post(slow_server.url + "/v1/completions", json={**LONG, "max_tokens": 3}, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
