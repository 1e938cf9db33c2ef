"""Every error the server answers, with its status code and OpenAI-shaped body: 400 for bad
JSON and bad values (and prompt + max_tokens beyond the context), 404 unknown model or route,
401 without the API key, 429 when the waiting queue is full, 503 while the model loads (or after
it failed to). None of them queues anything or holds a KV block."""
from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from bitfold.errors import ModelLoadError
from bitfold.server.app import create_app
from tests.server.conftest import LiveServer, SlowEngine, error_of, tiny_config

pytestmark = pytest.mark.usefixtures("single_thread")

OK = {"model": "tiny", "prompt": "1 2 3", "max_tokens": 2, "temperature": 0}
CHAT_OK = {"model": "tiny", "messages": [{"role": "user", "content": "1"}], "max_tokens": 2}


def post(server, path, body=None, content=None, headers=None):
    """POST a dict as JSON, or raw bytes declared as JSON."""
    if isinstance(body, bytes):
        body, content = None, body
    if content is not None:
        headers = {"content-type": "application/json", **(headers or {})}
    return httpx.post(server.url + path, json=body, content=content, headers=headers, timeout=30)


BAD_BODIES = [  # (path, raw body or dict, param the error must name, code)
    ("/v1/completions", b"{bad json", None, "invalid_json"),
    ("/v1/completions", b"", None, "invalid_json"),
    ("/v1/completions", b"[1, 2]", None, "invalid_json"),
    ("/v1/completions", b'"text"', None, "invalid_json"),
    ("/v1/completions", b'{"model": "tiny", "prompt": "1", "temperature": NaN}', "temperature", "invalid_value"),
    ("/v1/completions", {**OK, "temperature": -0.5}, "temperature", "invalid_value"),
    ("/v1/completions", {**OK, "temperature": 2.5}, "temperature", "invalid_value"),
    ("/v1/completions", {**OK, "top_p": 0}, "top_p", "invalid_value"),
    ("/v1/completions", {**OK, "max_tokens": 0}, "max_tokens", "invalid_value"),
    ("/v1/completions", {**OK, "max_tokens": "5"}, "max_tokens", "invalid_value"),
    ("/v1/completions", {**OK, "max_tokens": 5.0}, "max_tokens", "invalid_value"),
    ("/v1/completions", {**OK, "presence_penalty": 2.5}, "presence_penalty", "invalid_value"),
    ("/v1/completions", {**OK, "frequency_penalty": -3}, "frequency_penalty", "invalid_value"),
    ("/v1/completions", {**OK, "logprobs": 21}, "logprobs", "invalid_value"),
    ("/v1/completions", {**OK, "n": 2}, "n", "invalid_value"),
    ("/v1/completions", {**OK, "best_of": 3}, "best_of", "invalid_value"),
    ("/v1/completions", {**OK, "echo": True}, "echo", "invalid_value"),
    ("/v1/completions", {**OK, "logit_bias": {"5": 10}}, "logit_bias", "invalid_value"),
    ("/v1/completions", {**OK, "stop": ""}, "stop", "invalid_value"),
    ("/v1/completions", {**OK, "stop": [1]}, "stop", "invalid_value"),
    ("/v1/completions", {**OK, "seed": 2**70}, None, "invalid_value"),
    ("/v1/completions", {**OK, "stream": "yes"}, "stream", "invalid_value"),
    ("/v1/completions", {**OK, "stream_options": {"include_usage": True}}, "stream_options", "invalid_value"),
    ("/v1/completions", {**OK, "frobnicate": 1}, "frobnicate", "unrecognized_argument"),
    ("/v1/completions", {"prompt": "1"}, "model", "invalid_value"),
    ("/v1/completions", {"model": "tiny"}, "prompt", "invalid_value"),
    ("/v1/completions", {**OK, "prompt": ["1", "2"]}, "prompt", "invalid_value"),
    ("/v1/completions", {**OK, "prompt": []}, "prompt", "invalid_value"),
    ("/v1/completions", {**OK, "prompt": ""}, "prompt", "invalid_value"),
    ("/v1/completions", {**OK, "prompt": [1, -2]}, "prompt", "invalid_value"),
    ("/v1/completions", {**OK, "prompt": [5, 999]}, None, "invalid_value"),  # outside the model's vocabulary
    ("/v1/completions", {**OK, "prompt": "hello"}, None, "invalid_value"),  # encodes to ids the tiny model lacks
    ("/v1/completions", {**OK, "max_tokens": 600}, "prompt", "context_length_exceeded"),
    ("/v1/completions", {**OK, "prompt": [5] * 512}, "prompt", "context_length_exceeded"),
    ("/v1/chat/completions", {**CHAT_OK, "messages": []}, "messages", "invalid_value"),
    ("/v1/chat/completions", {**CHAT_OK, "messages": [{"role": "wizard", "content": "1"}]}, "messages.0.role",
     "invalid_value"),
    ("/v1/chat/completions", {**CHAT_OK, "messages": [{"content": "1"}]}, "messages.0.role", "invalid_value"),
    ("/v1/chat/completions", {**CHAT_OK, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages.0.content", "invalid_value"),
    ("/v1/chat/completions", {**CHAT_OK, "top_logprobs": 2}, "top_logprobs", "invalid_value"),
    ("/v1/chat/completions", {**CHAT_OK, "logprobs": True, "top_logprobs": 21}, "top_logprobs", "invalid_value"),
    ("/v1/chat/completions", {**CHAT_OK, "response_format": {"type": "json_object"}}, "response_format.type",
     "invalid_value"),
    ("/v1/chat/completions", {**CHAT_OK, "tools": []}, "tools", "unrecognized_argument"),
    ("/v1/chat/completions", {**CHAT_OK, "max_completion_tokens": 10**9}, "messages", "context_length_exceeded"),
    ("/v1/chat/completions", CHAT_OK, None, "invalid_value"),  # the chat template's tokens are beyond vocab 320
]


@pytest.mark.parametrize("path,body,param,code", BAD_BODIES)
def test_bad_requests_are_400(tiny_server, path, body, param, code):
    r = post(tiny_server, path, body)
    assert r.status_code == 400, r.text
    err = error_of(r)
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["code"] == code, err
    assert r.headers["content-type"] == "application/json"


def test_bad_requests_leave_nothing_behind(tiny_server):
    m = tiny_server.wait_idle()
    assert m["bitfold_kv_blocks_used"] == 0
    assert not any("500" in k for k in m), "a request failed with 500"
    r = post(tiny_server, "/v1/completions", OK)  # and the server still serves
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_body_without_json_content_type_is_400(tiny_server):
    r = httpx.post(tiny_server.url + "/v1/completions", content=json.dumps(OK).encode(),
                   headers={"content-type": "text/plain"})
    assert r.status_code == 400 and error_of(r)["code"] == "invalid_json"


def test_kv_capacity_exceeded_is_400(tiny_model_dir):
    """A request that fits the context but not the whole KV cache (8 blocks x 16 tokens)."""
    with LiveServer(create_app(tiny_config(tiny_model_dir, num_kv_blocks=8), model_name="tiny")) as s:
        r = post(s, "/v1/completions", {**OK, "max_tokens": 200})
        assert r.status_code == 400 and error_of(r)["code"] == "context_length_exceeded"
        assert "KV blocks" in error_of(r)["message"]


def test_unknown_model_and_route_are_404(tiny_server):
    for path, body in [("/v1/completions", {**OK, "model": "gpt-4"}),
                       ("/v1/chat/completions", {**CHAT_OK, "model": ""})]:
        r = post(tiny_server, path, body)
        assert r.status_code == 404 and error_of(r)["code"] == "model_not_found" and error_of(r)["param"] == "model"
    r = httpx.get(tiny_server.url + "/v1/models/gpt-4")
    assert r.status_code == 404 and error_of(r)["code"] == "model_not_found"
    r = httpx.get(tiny_server.url + "/v1/engines")
    assert r.status_code == 404 and error_of(r)["code"] == "not_found"
    r = httpx.get(tiny_server.url + "/v1/completions")
    assert r.status_code == 405 and error_of(r)["code"] == "method_not_allowed"


def test_api_key(tiny_model_dir):
    app = create_app(tiny_config(tiny_model_dir), model_name="tiny", api_key="s3cret")
    with LiveServer(app) as s:
        for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"},
                        {"Authorization": "Basic s3cret"}]:
            for path in ["/v1/completions", "/v1/chat/completions"]:
                r = post(s, path, OK, headers=headers)
                assert r.status_code == 401 and error_of(r)["code"] == "invalid_api_key", (headers, r.text)
            r = httpx.get(s.url + "/v1/models", headers=headers)
            assert r.status_code == 401
        auth = {"Authorization": "Bearer s3cret"}
        assert post(s, "/v1/completions", OK, headers=auth).status_code == 200
        assert httpx.get(s.url + "/v1/models", headers=auth).json()["data"][0]["id"] == "tiny"
        r = post(s, "/v1/completions", b"{bad", headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401  # the key is checked before the body
        assert httpx.get(s.url + "/health").status_code == 200  # probes need no key
        assert httpx.get(s.url + "/metrics").status_code == 200


def test_503_while_loading_then_ready(tiny_model_dir):
    go = threading.Event()
    cfg = tiny_config(tiny_model_dir)

    def load():
        from bitfold.engine import LLMEngine

        go.wait(30)
        return LLMEngine(cfg)

    with LiveServer(create_app(load, model_name="tiny"), wait_ready=False) as s:
        for r in [httpx.get(s.url + "/health"), httpx.get(s.url + "/v1/models"), post(s, "/v1/completions", OK),
                  post(s, "/v1/chat/completions", CHAT_OK)]:
            assert r.status_code == 503 and error_of(r)["code"] == "model_not_ready" and "loading" in r.text
            assert r.headers["retry-after"]
        assert s.metrics()["bitfold_model_ready"] == 0
        go.set()
        deadline = time.monotonic() + 30
        while httpx.get(s.url + "/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert post(s, "/v1/completions", OK).status_code == 200 and s.metrics()["bitfold_model_ready"] == 1


def test_503_after_a_failed_load(tmp_path):
    def load():
        raise ModelLoadError(f"{tmp_path}/nope.gguf: no such file")

    with LiveServer(create_app(load, model_name="x"), wait_ready=False) as s:
        assert s.engine.loaded.wait(30)
        for r in [httpx.get(s.url + "/health"), post(s, "/v1/completions", OK)]:
            assert r.status_code == 503 and "failed to load" in error_of(r)["message"] and "ModelLoadError" in r.text
            assert str(tmp_path) not in r.text  # the reason is in the server's log; clients see no server paths


def test_429_when_the_queue_is_full(tiny_model_dir):
    """One request runs (max_num_seqs 1), one waits (max_queue 1): the next is refused, and
    admitted again once there is room."""
    app = create_app(lambda: SlowEngine(tiny_config(tiny_model_dir, max_num_seqs=1)), model_name="tiny", max_queue=1)
    long = {**OK, "max_tokens": 400, "ignore_eos": True, "stream": True}
    with LiveServer(app) as s, httpx.Client(timeout=30) as c1, httpx.Client(timeout=30) as c2:
        with c1.stream("POST", s.url + "/v1/completions", json=long) as running:
            lines = running.iter_lines()  # (a dropped iterator would close the response)
            next(lines)  # admitted and generating
            with c2.stream("POST", s.url + "/v1/completions", json=long) as waiting:
                assert waiting.status_code == 200
                deadline = time.monotonic() + 10
                while s.metrics()["bitfold_requests_waiting"] != 1:
                    assert time.monotonic() < deadline
                    time.sleep(0.01)
                for path, body in [("/v1/completions", OK), ("/v1/completions", {**long}),
                                   ("/v1/chat/completions", CHAT_OK)]:
                    r = post(s, path, body)
                    assert r.status_code == 429, r.text
                    err = error_of(r)
                    assert err["type"] == "rate_limit_error" and err["code"] == "rate_limit_exceeded"
                    assert "queue is full" in err["message"] and r.headers["retry-after"] == "1"
        s.wait_idle()  # both clients left: both requests aborted, their blocks freed
        assert post(s, "/v1/completions", OK).status_code == 200
        m = s.metrics()
        assert m['bitfold_requests_finished_total{finish_reason="abort"}'] == 2
        assert m['bitfold_http_requests_total{code="429",endpoint="/v1/completions"}'] == 2


SURROGATE_BODIES = [  # JSON that parses, with a lone surrogate escape where text is expected: (path, body, param)
    ("/v1/completions", '{"model": "tiny", "prompt": "1 \\ud800", "max_tokens": 2}', "prompt"),
    ("/v1/completions", '{"model": "tiny", "prompt": ["\\udfff"], "max_tokens": 2}', "prompt.0"),
    ("/v1/completions", '{"model": "tiny", "prompt": "1", "stop": ["\\ud83d"], "max_tokens": 2}', "stop.0"),
    ("/v1/completions", '{"model": "\\ud800", "prompt": "1", "max_tokens": 2}', "model"),
    ("/v1/chat/completions", '{"model": "tiny", "messages": [{"role": "user", "content": "1\\ud800"}]}',
     "messages.0.content"),
    ("/v1/chat/completions",
     '{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\udc00"}]}]}',
     "messages.0.content.0.text"),
]


@pytest.mark.parametrize("path,body,param", SURROGATE_BODIES)
def test_lone_surrogates_are_400(tiny_server, path, body, param):
    """Lone surrogates are valid JSON escapes but not Unicode text: 400 naming the parameter, not a 500."""
    r = post(tiny_server, path, body.encode())
    assert r.status_code == 400, r.text
    err = error_of(r)
    assert err["param"] == param and err["code"] == "invalid_value" and "surrogate" in err["message"], err


def test_error_bodies_always_encode(tiny_server):
    """A 404 that names a model the client sent (or a path) is valid UTF-8 JSON whatever the name holds."""
    r = httpx.get(tiny_server.url + "/v1/models/%ED%A0%80x%FF")
    assert r.status_code == 404 and error_of(r)["code"] == "model_not_found"
    r = post(tiny_server, "/v1/completions", {**OK, "model": "caf\u00e9 \U0001f999"})
    assert r.status_code == 404 and "caf\u00e9 \U0001f999" in error_of(r)["message"]


def test_nan_and_infinite_floats_are_reported_as_such(tiny_server):
    for value in ("NaN", "Infinity", "-Infinity"):
        for name in ("temperature", "top_p", "presence_penalty"):
            r = post(tiny_server, "/v1/completions", f'{{"model": "tiny", "prompt": "1", "{name}": {value}}}'.encode())
            err = error_of(r)
            assert r.status_code == 400 and err["param"] == name and "finite number" in err["message"], err


def test_405_names_the_allowed_methods(tiny_server):
    r = httpx.get(tiny_server.url + "/v1/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    r = httpx.post(tiny_server.url + "/health")
    assert r.status_code == 405 and r.headers["allow"] == "GET"


def test_models_show_names_not_server_paths(tiny_model_dir, tiny_server):
    for r in (httpx.get(tiny_server.url + "/v1/models"), httpx.get(tiny_server.url + "/v1/models/tiny")):
        assert r.status_code == 200
        assert str(tiny_model_dir) not in r.text and "/" not in json.dumps(r.json()), r.text


def test_openapi_declares_the_errors_bitfold_sends():
    """Every /v1 POST declares 400/401/404/413/429/503 in OpenAI's error shape, and no 422
    (bitfold never sends one: validation errors are 400)."""
    schema = create_app(lambda: None).openapi()
    for path in ("/v1/completions", "/v1/chat/completions"):
        responses = schema["paths"][path]["post"]["responses"]
        assert {"200", "400", "401", "404", "413", "429", "503"} <= set(responses), responses
        assert "422" not in responses
        ref = responses["400"]["content"]["application/json"]["schema"]["$ref"]
        shape = schema["components"]["schemas"][ref.rsplit("/", 1)[1]]
        assert set(shape["properties"]) == {"error"}
    assert "422" not in json.dumps(schema)
