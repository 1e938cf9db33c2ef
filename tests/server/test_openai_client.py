"""The official `openai` client against `bitfold serve`'s app on the default model: completions
and chat, streamed and not; a greedy stream's text equals the non-streamed text; usage,
logprobs, stop strings, seeds and errors come back in OpenAI's shapes."""
from __future__ import annotations

import pytest

openai = pytest.importorskip("openai")

from tests.server.conftest import sse_events  # noqa: E402

PROMPT = "The capital of France is"
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three colors."}]


@pytest.fixture(scope="module")
def client(smol_server):
    return openai.OpenAI(base_url=smol_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


def test_models(client, model, smol_server):
    (card,) = client.models.list().data
    assert card.id == model == "SmolLM2-135M-Instruct.Q4_1" and card.object == "model" and card.owned_by == "bitfold"
    assert client.models.retrieve(model).id == model
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_completion_stream_equals_non_stream(client, model):
    full = client.completions.create(model=model, prompt=PROMPT, max_tokens=10, temperature=0)
    (choice,) = full.choices
    assert full.object == "text_completion" and full.id.startswith("cmpl-")
    assert choice.text.startswith(" Paris") and choice.finish_reason == "length"
    assert full.usage.prompt_tokens == 5 and full.usage.completion_tokens == 10 and full.usage.total_tokens == 15
    chunks = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert all(c.usage is None for c in chunks[:-1]) and len({c.id for c in chunks}) == 1


def test_chat_stream_equals_non_stream(client, model):
    full = client.chat.completions.create(model=model, messages=CHAT, max_tokens=12, temperature=0)
    msg = full.choices[0].message
    assert full.object == "chat.completion" and msg.role == "assistant" and msg.content
    assert full.choices[0].finish_reason in ("stop", "length") and full.usage.completion_tokens <= 12
    stream = client.chat.completions.create(model=model, messages=CHAT, max_tokens=12, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == msg.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert all(c.object == "chat.completion.chunk" for c in chunks)


def test_chat_max_completion_tokens_and_stop(client, model):
    r = client.chat.completions.create(model=model, messages=CHAT, max_completion_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"
    base = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text
    stop = base[3:6]
    cut = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0, stop=[stop])
    assert cut.choices[0].text == base[: base.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible_streamed_or_not(client, model):
    kw = dict(model=model, prompt="Once upon a time", max_tokens=8, temperature=0.9, top_p=0.95, seed=1234)
    a = client.completions.create(**kw).choices[0].text
    b = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw))
    assert a == b


def test_logprobs(client, model):
    r = client.chat.completions.create(model=model, messages=CHAT, max_tokens=5, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for lp in content:
        assert lp.logprob <= 0 and len(lp.top_logprobs) == 3 and lp.top_logprobs[0].token == lp.token
        assert lp.top_logprobs[0].logprob == lp.logprob and bytes(lp.bytes).decode("utf-8", "replace") == lp.token
    text = "".join(lp.token for lp in content)
    assert r.choices[0].message.content in text  # the last token may be <|im_end|>, not in the text
    streamed = [c for c in client.chat.completions.create(model=model, messages=CHAT, max_tokens=5, temperature=0,
                                                          logprobs=True, top_logprobs=3, stream=True)]
    s_content = [lp for c in streamed if c.choices and c.choices[0].logprobs for lp in c.choices[0].logprobs.content]
    assert [(x.token, x.logprob) for x in s_content] == [(x.token, x.logprob) for x in content]
    comp = client.completions.create(model=model, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2)
    lp = comp.choices[0].logprobs
    assert "".join(lp.tokens) == comp.choices[0].text and len(lp.token_logprobs) == 4
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(4)]
    assert all(len(d) == 2 and max(d.values()) == v for d, v in zip(lp.top_logprobs, lp.token_logprobs))


def test_penalties_change_the_greedy_text(client, model):
    kw = dict(model=model, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0)
    plain = client.completions.create(**kw).choices[0].text
    pen = client.completions.create(frequency_penalty=2.0, presence_penalty=2.0, **kw).choices[0].text
    assert plain != pen


def test_errors_through_the_client(client, model):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt=PROMPT, temperature=5)
    assert e.value.status_code == 400 and e.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=CHAT)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt=PROMPT, max_tokens=10**6)
    assert e.value.body["code"] == "context_length_exceeded"


def test_raw_sse_format(smol_server, model):
    """Exactly OpenAI's framing: `data: {json}` events separated by blank lines, then [DONE]."""
    import httpx

    r = httpx.post(smol_server.url + "/v1/completions", timeout=60, json={
        "model": model, "prompt": PROMPT, "max_tokens": 3, "temperature": 0, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.text.endswith("data: [DONE]\n\n")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]" and all(isinstance(e, dict) and "usage" not in e for e in events[:-1])
