"""Live servers for the server tests: the real app under a real uvicorn, in a background thread,
on 127.0.0.1 and a port the OS picks; nothing leaves the loopback interface."""
from __future__ import annotations

import re
import threading
import time

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from bitfold.config import EngineConfig  # noqa: E402
from bitfold.engine import LLMEngine  # noqa: E402
from bitfold.server.app import create_app  # noqa: E402


class LiveServer:
    """`with LiveServer(app) as s:` serves `app` at `s.url` until the block ends (uvicorn's
    graceful shutdown, lifespan included)."""

    def __init__(self, app, wait_ready: bool = True):
        self.app = app
        self.wait_ready = wait_ready
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                                    lifespan="on", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, name="test-uvicorn", daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        if self.wait_ready:
            while httpx.get(self.url + "/health").status_code != 200:
                assert self.engine.load_error is None, f"the model did not load: {self.engine.load_error}"
                assert time.monotonic() < deadline, "the model did not load"
                time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive(), "the server did not shut down"

    @property
    def engine(self):
        return self.app.state.server.engine

    def metrics(self) -> dict[str, float]:
        from bitfold.server.metrics import parse_metrics

        return parse_metrics(httpx.get(self.url + "/metrics").text)

    def wait_idle(self, timeout: float = 10.0) -> dict[str, float]:
        """Metrics once nothing runs, waits or holds a KV block (fails after `timeout`)."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if m["bitfold_kv_blocks_used"] == 0 and m["bitfold_requests_running"] == 0 \
                    and m["bitfold_requests_waiting"] == 0:
                return m
            assert time.monotonic() < deadline, f"server not idle: {m}"
            time.sleep(0.02)


class SlowEngine(LLMEngine):
    """The engine with a pause before every step: long requests that stay in flight for as long
    as a test needs them, whatever the machine's speed."""

    step_delay = 0.05

    def step(self):
        time.sleep(self.step_delay)
        return super().step()


def tiny_config(path, **kw) -> EngineConfig:
    return EngineConfig(model=str(path), device="cpu", **{"num_kv_blocks": 256, "block_size": 16, **kw})


def error_of(r) -> dict:
    """The OpenAI-shaped error of a response (asserting the shape)."""
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"] and "\n" not in err["message"]
    return err


def sse_events(text: str) -> list:
    """The JSON payloads of an SSE body, and "[DONE]" (comments, e.g. keep-alives, skipped)."""
    import json

    out = []
    for block in text.split("\n\n"):
        if block.strip() and not block.startswith(":"):
            m = re.fullmatch(r"data: (.*)", block.strip(), re.S)
            assert m, f"not an SSE data line: {block!r}"
            out.append(m.group(1) if m.group(1) == "[DONE]" else json.loads(m.group(1)))
    return out


@pytest.fixture(scope="module")
def single_thread():
    """One torch thread for the tiny model's modules: its matmuls gain nothing from a second
    one, and on a busy 2-core machine two threads spin against each other (8x slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def digit_prompts():
    """Prompts the tiny model (vocab 320) can take: SmolLM2's tokenizer spells digits,
    spaces and most punctuation with ids below 320."""
    return ["1 2 3", "0, 1, 2, 3", "7.5-3=?", "[1,2]", "42!", "9 8 7 6", "$%^&", "x", "5, 5, 5", "1-2-3-4"]


@pytest.fixture(scope="module")
def tiny_server(tiny_model_dir, single_thread):
    """The tiny model served as `tiny`, room for 256 x 16 tokens, context 512."""
    app = create_app(tiny_config(tiny_model_dir), model_name="tiny")
    with LiveServer(app) as s:
        yield s


@pytest.fixture(scope="module")
def smol_server(smollm2_path):
    """The default model (SmolLM2-135M-Instruct) served under its default name."""
    app = create_app(EngineConfig(model=smollm2_path, device="cpu", kv_cache_memory_gb=0.25))
    with LiveServer(app) as s:
        yield s
