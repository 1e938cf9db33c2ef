"""Soak, bounded and on the loopback interface only: 240 requests, 32 at a time, on a KV cache
small enough that requests queue and get preempted; streamed and not; greedy, seeded, penalized,
with stop strings and logprobs; about a third of the streams disconnect at a random point.

Every request that completes must equal the same request run alone on a fresh engine (text,
token count, finish reason, logprobs); every disconnected stream must have received a prefix of
it. Afterwards the server is healthy, every request ended exactly once (stop, length or abort,
never error), nothing answered 500, and /metrics shows no KV block in use."""
from __future__ import annotations

import asyncio
import json
import random
from dataclasses import dataclass

import httpx
import pytest

from bitfold import LLM, SamplingParams
from bitfold.server.app import create_app
from tests.server.conftest import LiveServer, tiny_config

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.slow]

N_REQUESTS = 240
CONCURRENCY = 32


@dataclass
class Spec:
    body: dict
    disconnect_after: int | None  # SSE events to read before leaving; None = read to the end

    @property
    def key(self) -> str:
        return json.dumps({k: v for k, v in self.body.items() if k not in ("stream", "stream_options")}, sort_keys=True)


def make_specs(prompts: list[str], seed: int = 0, n_bodies: int = 32) -> list[Spec]:
    """N_REQUESTS requests drawn from `n_bodies` distinct bodies (so the references, computed
    one request at a time, stay cheap) plus one long greedy body per prompt for the streams
    that disconnect."""
    rng = random.Random(seed)
    bodies = []
    for _ in range(n_bodies):
        body = {"model": "tiny", "prompt": rng.choice(prompts), "max_tokens": rng.randint(1, 24), "temperature": 0}
        kind = rng.choice(["greedy", "greedy", "seeded", "penalized", "stop", "logprobs"])
        if kind == "seeded":
            body.update(temperature=0.8, top_p=0.9, seed=rng.randrange(1000))
        elif kind == "penalized":
            body.update(presence_penalty=0.8, frequency_penalty=0.5)
        elif kind == "stop":
            body.update(stop=[rng.choice("0123456789")])
        elif kind == "logprobs":
            body.update(logprobs=2)
        if rng.random() < 0.3:
            body["ignore_eos"] = True
        bodies.append(body)
    long = [{"model": "tiny", "prompt": p, "max_tokens": 40, "ignore_eos": True, "temperature": 0} for p in prompts]
    specs, n_streams = [], 0
    for _ in range(N_REQUESTS):
        stream = rng.random() < 0.6
        n_streams += stream
        disconnect = rng.randint(0, 6) if stream and n_streams % 3 == 0 else None  # every third stream
        body = dict(rng.choice(long if disconnect is not None else bodies))
        if stream:
            body["stream"] = True
            if rng.random() < 0.5:
                body["stream_options"] = {"include_usage": True}
        specs.append(Spec(body, disconnect))
    return specs


def reference(llm: LLM, body: dict):
    """The same request alone on its own engine: (text, completion tokens, finish reason, logprobs)."""
    sp = SamplingParams(temperature=body["temperature"], top_p=body.get("top_p", 1.0), seed=body.get("seed"),
                        max_tokens=body["max_tokens"], stop=body.get("stop"), ignore_eos=body.get("ignore_eos", False),
                        presence_penalty=body.get("presence_penalty", 0.0),
                        frequency_penalty=body.get("frequency_penalty", 0.0), logprobs=body.get("logprobs"))
    out = llm.generate(body["prompt"], sp)[0]
    lps = None if out.logprobs is None else [lp.logprob for lp in out.logprobs]
    return out.text, len(out.token_ids), out.finish_reason, lps


async def run_one(client: httpx.AsyncClient, url: str, spec: Spec) -> dict:
    if not spec.body.get("stream"):
        r = await client.post(url, json=spec.body)
        assert r.status_code == 200, r.text
        body = r.json()
        choice = body["choices"][0]
        lps = choice["logprobs"]["token_logprobs"] if choice["logprobs"] else None
        return {"text": choice["text"], "n": body["usage"]["completion_tokens"], "finish": choice["finish_reason"],
                "lps": lps, "done": True}
    text, finish, n, lps, events, done = "", None, None, [], 0, False
    async with client.stream("POST", url, json=spec.body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line:
                continue
            if spec.disconnect_after is not None and events >= spec.disconnect_after:
                break  # leaving the block closes the connection mid-stream
            assert line.startswith("data: "), line
            events += 1
            if line == "data: [DONE]":
                done = True
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            if chunk["choices"]:
                c = chunk["choices"][0]
                text += c["text"]
                finish = c["finish_reason"] or finish
                if c["logprobs"]:
                    lps += c["logprobs"]["token_logprobs"]
            if chunk.get("usage"):
                n = chunk["usage"]["completion_tokens"]
    return {"text": text, "n": n, "finish": finish, "lps": lps if spec.body.get("logprobs") is not None else None,
            "done": done}


async def soak(url: str, specs: list[Spec]) -> list[dict]:
    sem = asyncio.Semaphore(CONCURRENCY)
    limits = httpx.Limits(max_connections=CONCURRENCY * 2, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        async def bounded(spec):
            async with sem:
                return await run_one(client, url, spec)

        return await asyncio.gather(*(bounded(s) for s in specs))


def test_soak(tiny_model_dir, digit_prompts):
    specs = make_specs(digit_prompts)
    alone = LLM(str(tiny_model_dir), device="cpu", num_kv_blocks=256, block_size=16)
    refs = {s.key: reference(alone, s.body) for s in specs}
    # 48 blocks x 4 tokens: 32 concurrent requests of up to ~75 tokens do not fit together.
    app = create_app(tiny_config(tiny_model_dir, num_kv_blocks=48, block_size=4, max_num_batched_tokens=256),
                     model_name="tiny")
    with LiveServer(app) as s:
        before = s.metrics()  # (/health answered 503 while the model loaded)
        results = asyncio.run(soak(s.url + "/v1/completions", specs))
        completed = cut = 0
        for spec, got in zip(specs, results):
            text, n, finish, lps = refs[spec.key]
            if got["done"]:
                completed += 1
                assert got["text"] == text and got["finish"] == finish, (spec.body, got, refs[spec.key])
                if got["n"] is not None:
                    assert got["n"] == n
                if lps is not None:
                    assert got["lps"] == pytest.approx(lps, abs=1e-4)
            else:
                cut += 1
                assert text.startswith(got["text"]), (spec.body, got["text"], text)
        n_streams = sum(1 for spec in specs if spec.body.get("stream"))
        leaving = sum(1 for spec in specs if spec.disconnect_after is not None)
        assert leaving == n_streams // 3 and completed + cut == N_REQUESTS
        assert cut >= leaving * 2 // 3, (cut, leaving)  # a short enough stream can end before its client leaves

        m = s.wait_idle(timeout=10)
        assert httpx.get(s.url + "/health").status_code == 200
        ended = {k: v for k, v in m.items() if k.startswith("bitfold_requests_finished_total")}
        assert sum(ended.values()) == N_REQUESTS and not any("error" in k for k in ended), ended
        assert m.get('bitfold_requests_finished_total{finish_reason="abort"}', 0) >= 1
        assert not [k for k in m if k.startswith("bitfold_http_requests_total") and 'code="5' in k
                    and m[k] != before.get(k)]
        assert m["bitfold_preemptions_total"] > 0, "the KV budget was meant to force preemption"
        assert m["bitfold_time_to_first_token_seconds_count"] >= completed
        assert m["bitfold_kv_blocks_used"] == 0 and m["bitfold_kv_blocks_free"] == 48
        # and it still answers correctly
        body = {k: v for k, v in specs[0].body.items() if k not in ("stream", "stream_options")}
        r = httpx.post(s.url + "/v1/completions", json=body, timeout=30)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == refs[specs[0].key][0]
