"""What keeps one client from hurting the others: a bound on the request body (413 before it is
read), prompts tokenized off the event loop and refused as soon as they certainly exceed the
context, a queue bound that counts only requests a full batch keeps out (429), and streams that
hear from the server while they wait."""
from __future__ import annotations

import itertools
import json
import re
import threading

import httpx
import pytest

from bitfold.server.app import create_app
from tests.server.conftest import LiveServer, SlowEngine, error_of, tiny_config

pytestmark = pytest.mark.usefixtures("single_thread")

OK = {"model": "tiny", "prompt": "1 2 3", "max_tokens": 2, "temperature": 0}


@pytest.fixture(scope="module")
def small_limit_server(tiny_model_dir):
    with LiveServer(create_app(tiny_config(tiny_model_dir), model_name="tiny", max_request_bytes=64 * 1024)) as s:
        yield s


def test_request_larger_than_the_limit_is_413(small_limit_server):
    s = small_limit_server
    big = {**OK, "prompt": "1 " * 40_000}  # 80 KB
    big_chat = {"model": "tiny", "messages": [{"role": "user", "content": "1 " * 40_000}]}
    for path, body in [("/v1/completions", big), ("/v1/chat/completions", big_chat)]:
        r = httpx.post(s.url + path, json=body, timeout=30)
        assert r.status_code == 413, r.text
        err = error_of(r)
        assert err["code"] == "request_too_large" and "65536" in err["message"]

    def chunks():  # no Content-Length: the limit holds for a chunked body too
        data = json.dumps(big).encode()
        for i in range(0, len(data), 8192):
            yield data[i:i + 8192]

    r = httpx.post(s.url + "/v1/completions", content=chunks(), headers={"content-type": "application/json"},
                   timeout=30)
    assert r.status_code == 413 and error_of(r)["code"] == "request_too_large"
    small = json.dumps(OK).encode()  # under the limit, chunked or not: served
    r = httpx.post(s.url + "/v1/completions", content=iter([small[:5], small[5:]]),
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    m = s.wait_idle()
    assert m['bitfold_http_requests_total{code="413",endpoint="/v1/completions"}'] == 2


def test_the_default_limit_refuses_a_20mb_prompt(tiny_server):
    r = httpx.post(tiny_server.url + "/v1/completions", json={**OK, "prompt": "x" * 20_000_000}, timeout=60)
    assert r.status_code == 413 and error_of(r)["code"] == "request_too_large"


def test_an_oversized_prompt_is_refused_from_its_first_pieces(tiny_model_dir):
    """A prompt far beyond the context (3 MB of text, 512 tokens of context) is refused after
    tokenizing its first piece, not all of it; several at once leave the server serving."""
    app = create_app(tiny_config(tiny_model_dir), model_name="tiny")
    with LiveServer(app) as s:
        tok = s.engine.check_ready().tokenizer
        seen: list[int] = []
        real = tok._encode_nogil

        def spy(text):
            seen.append(len(text))
            return real(text)

        tok._encode_nogil = spy
        prompt = "1 2 3 " * 500_000
        results = []

        def post(body, path):
            results.append(httpx.post(s.url + path, json=body, timeout=60))

        bodies = [("/v1/completions", {**OK, "prompt": prompt}),
                  ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": prompt}]})] * 2
        threads = [threading.Thread(target=post, args=(b, p)) for p, b in bodies]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(results) == 4
        for r in results:
            assert r.status_code == 400, r.text
            err = error_of(r)
            assert err["code"] == "context_length_exceeded" and "512" in err["message"], err
        assert seen and max(seen) < len(prompt) // 10, "the whole prompt was tokenized"
        assert httpx.post(s.url + "/v1/completions", json=OK, timeout=30).status_code == 200


def test_tokenizing_does_not_block_the_event_loop(tiny_model_dir):
    """While a prompt is being tokenized (here: held on purpose), /health and other requests
    are answered."""
    app = create_app(tiny_config(tiny_model_dir), model_name="tiny")
    with LiveServer(app) as s:
        tok = s.engine.check_ready().tokenizer
        entered, release = threading.Event(), threading.Event()

        def held(real):
            def encode(text, *args, **kw):
                if "9 9 9" in text:
                    entered.set()
                    release.wait(30)
                return real(text, *args, **kw)
            return encode

        for name in ("encode", "encode_within"):
            if hasattr(tok, name):
                setattr(tok, name, held(getattr(tok, name)))
        slow = []
        t = threading.Thread(target=lambda: slow.append(httpx.post(s.url + "/v1/completions",
                                                                   json={**OK, "prompt": "9 9 9"}, timeout=60)))
        t.start()
        try:
            assert entered.wait(30)
            assert httpx.get(s.url + "/health", timeout=5).status_code == 200
            assert httpx.post(s.url + "/v1/completions", json=OK, timeout=10).status_code == 200
        finally:
            release.set()
            t.join(60)
        assert slow[0].status_code == 200


def test_a_burst_that_fits_the_batch_is_not_refused(tiny_model_dir):
    """--max-queue bounds the requests a full batch keeps out, not a burst: 12 requests that
    arrive while one step runs, with 16 batch slots and max_queue 2, are all served."""
    held, release = threading.Event(), threading.Event()

    class HeldEngine(SlowEngine):
        step_delay = 0.0

        def step(self):
            if not held.is_set():  # the first step waits until the whole burst is queued behind it
                held.set()
                release.wait(30)
            return super().step()

    app = create_app(lambda: HeldEngine(tiny_config(tiny_model_dir, max_num_seqs=16)), model_name="tiny", max_queue=2)
    with LiveServer(app) as s:
        results = []
        first = threading.Thread(target=lambda: results.append(httpx.post(s.url + "/v1/completions", json=OK,
                                                                          timeout=60)))
        first.start()
        assert held.wait(30)
        burst = [threading.Thread(target=lambda: results.append(httpx.post(s.url + "/v1/completions", json=OK,
                                                                           timeout=60))) for _ in range(11)]
        for t in burst:
            t.start()
        try:
            import time

            deadline = time.monotonic() + 30
            while s.engine._cmds.qsize() < 11:  # every add waits for the held step
                assert time.monotonic() < deadline, "the burst did not arrive"
                time.sleep(0.01)
        finally:
            release.set()
        for t in [first, *burst]:
            t.join(60)
        assert sorted(r.status_code for r in results) == [200] * 12, [r.text for r in results if r.status_code != 200]


def test_429_counts_requests_beyond_the_batch(tiny_model_dir):
    """With one batch slot and max_queue 2: one runs, two wait, the next is refused."""
    app = create_app(lambda: SlowEngine(tiny_config(tiny_model_dir, max_num_seqs=1)), model_name="tiny", max_queue=2)
    long = {**OK, "max_tokens": 400, "ignore_eos": True, "stream": True}
    with LiveServer(app) as s, httpx.Client(timeout=30) as c:
        with c.stream("POST", s.url + "/v1/completions", json=long) as a:
            a_lines = a.iter_lines()
            next(a_lines)  # generating: it holds the one slot
            with c.stream("POST", s.url + "/v1/completions", json=long) as b, \
                    c.stream("POST", s.url + "/v1/completions", json=long) as d:
                assert a.status_code == b.status_code == d.status_code == 200
                r = httpx.post(s.url + "/v1/completions", json=OK, timeout=30)
                assert r.status_code == 429 and error_of(r)["code"] == "rate_limit_exceeded"
                m = wait_metrics(s, bitfold_requests_queued=2)
                assert m["bitfold_requests_running"] == 1
        s.wait_idle()


def wait_metrics(server, timeout: float = 10.0, **want: float) -> dict[str, float]:
    """The metrics once each named one has its value (the engine publishes them after its steps)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        if all(m.get(k) == v for k, v in want.items()):
            return m
        assert time.monotonic() < deadline, f"metrics never reached {want}: {m}"
        time.sleep(0.01)


def test_a_queued_stream_hears_where_it_stands(tiny_model_dir):
    """Streams queued behind a full batch get SSE comments with their place in the queue while
    they wait (a client's read timeout no longer fires); /metrics shows the queue and how long
    its head has waited, and afterwards how long requests queued."""
    app = create_app(lambda: SlowEngine(tiny_config(tiny_model_dir, max_num_seqs=1)), model_name="tiny",
                     keepalive_s=0.2)
    long = {**OK, "max_tokens": 400, "ignore_eos": True, "stream": True}
    with LiveServer(app) as s, httpx.Client(timeout=5) as c:  # a 5 s read timeout: silence fails the test
        with c.stream("POST", s.url + "/v1/completions", json=long) as running:
            running_lines = running.iter_lines()  # (a dropped iterator would close the response)
            next(running_lines)
            with c.stream("POST", s.url + "/v1/completions", json={**long, "max_tokens": 3}) as first, \
                    c.stream("POST", s.url + "/v1/completions", json={**long, "max_tokens": 3}) as second:
                m = wait_metrics(s, bitfold_requests_queued=2)
                assert m["bitfold_queue_oldest_wait_seconds"] > 0
                for response, position in [(first, 1), (second, 2)]:
                    comments = list(itertools.islice((line for line in response.iter_lines() if line), 2))
                    for comment in comments:
                        assert re.fullmatch(rf": queued, position {position} of 2 waiting, \d+s so far", comment), \
                            comments
        m = s.wait_idle()
        assert m["bitfold_queue_time_seconds_count"] >= 1


def test_encode_within_is_encode_or_a_certain_refusal(smollm2_llm):
    """Counting a long text piece by piece never refuses a text that fits: on texts cut in many
    places (words, digits, whitespace runs, multi-byte characters), the ids are encode()'s, and
    a refusal comes only when encode() has more tokens than the limit."""
    import random

    from bitfold.errors import PromptTooLongError

    tok = smollm2_llm.tokenizer
    rng = random.Random(0)
    words = ["the", " ", "  ", "\n", "café", "日本語", "🦙", "12345", "x" * 30, "<|im_start|>", "don't", "\t"]
    for trial in range(6):
        text = "".join(rng.choice(words) for _ in range(rng.randrange(300, 3000)))
        n = len(tok.encode(text))
        assert tok.encode_within(text, n, piece_chars=256) == tok.encode(text)  # fits exactly: never refused
        with pytest.raises(PromptTooLongError):
            tok.encode_within(text, n // 3, piece_chars=256)
        assert tok.encode_within(text, n, add_special_tokens=False, piece_chars=97) == tok.encode(text, False)
