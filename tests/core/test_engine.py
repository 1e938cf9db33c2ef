"""The engine end to end on a tiny random llama: continuous batching under a small KV budget
gives the same greedy tokens as running each request alone, with preemption exercised and
no block leaked; cancellation and errors leave the pool whole. Async scheduling (tokens read
one step late) gives exactly the outputs of the synchronous engine."""
import random

import pytest

from bitfold import LLM, InvalidRequestError, PromptTooLongError, SamplingParams


def _assert_whole(llm):
    eng = llm.engine
    assert eng.pool.num_free == eng.pool.num_blocks, "KV blocks leaked"
    assert eng.kv.num_tables == 0 and not eng.scheduler.has_unfinished and not eng._states
    assert not eng.runner.generators


@pytest.fixture(scope="module")
def alone_llm(tiny_model_dir):
    return LLM(str(tiny_model_dir), device="cpu", num_kv_blocks=256, block_size=4)


def _workload(seed=0, n=24):
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, 320) for _ in range(rng.randint(1, 40))] for _ in range(n)]
    params = [SamplingParams(temperature=0, max_tokens=rng.randint(1, 24), ignore_eos=True) for _ in range(n)]
    return prompts, params


def test_concurrent_under_small_budget_matches_alone(tiny_model_dir, alone_llm):
    prompts, params = _workload()
    alone = [alone_llm.generate([p], sp)[0].token_ids for p, sp in zip(prompts, params)]
    # 20 blocks x 4 tokens: the biggest request (40 + 24 tokens) fits alone, few fit together.
    small = LLM(str(tiny_model_dir), device="cpu", num_kv_blocks=20, block_size=4, max_num_batched_tokens=16)
    outs = small.generate(prompts, params)
    assert [o.token_ids for o in outs] == alone
    assert all(o.finish_reason == "length" for o in outs)
    assert small.engine.scheduler.num_preemptions > 0, "the budget was meant to force preemption"
    _assert_whole(small)
    _assert_whole(alone_llm)


def test_seeded_sampling_is_independent_of_the_batch(alone_llm):
    prompts, _ = _workload(seed=1, n=6)
    sp = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, max_tokens=12, seed=1234, ignore_eos=True)
    alone = alone_llm.generate([prompts[0]], sp)[0].token_ids
    others = [SamplingParams(temperature=1.0, max_tokens=8, seed=i) for i in range(5)]
    mixed = alone_llm.generate(prompts, [sp] + others)[0].token_ids
    assert mixed == alone
    unseeded = alone_llm.generate([prompts[0]] * 2, SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True))
    assert unseeded[0].token_ids != unseeded[1].token_ids  # 12 draws from a near-flat 320-way distribution
    _assert_whole(alone_llm)


def test_stop_strings_and_streaming_agree(alone_llm):
    prompt = [5, 6, 7]
    full = alone_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0]
    assert len(full.text) > 6
    stop = full.text[3:6]
    cut = alone_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[stop]))[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.find(stop)]
    pieces = list(alone_llm.stream(prompt, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[stop])))
    assert "".join(pieces) == cut.text
    pieces = list(alone_llm.stream(prompt, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)))
    assert "".join(pieces) == full.text
    _assert_whole(alone_llm)


def test_closing_a_stream_cancels_and_frees(alone_llm):
    it = alone_llm.stream([9, 10, 11], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    for _, _ in zip(range(3), it):
        pass
    assert alone_llm.engine.pool.num_free < alone_llm.engine.pool.num_blocks
    it.close()
    _assert_whole(alone_llm)


@pytest.mark.parametrize("which", ["alone_llm", "async_llm"])  # async_llm is defined below
def test_error_inside_a_step_frees_everything(which, request, monkeypatch):
    llm = request.getfixturevalue(which)
    prompts, params = _workload(seed=2, n=4)
    calls = {"n": 0}
    real = llm.engine.runner.launch

    def flaky(out):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # what Ctrl-C looks like mid-step
        return real(out)

    monkeypatch.setattr(llm.engine.runner, "launch", flaky)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(prompts, params)
    _assert_whole(llm)
    monkeypatch.undo()
    assert llm.generate([prompts[0]], params[0])[0].finish_reason == "length"  # still usable


def test_bad_requests_raise_typed_errors_and_leave_no_trace(alone_llm):
    eng = alone_llm.engine
    with pytest.raises(PromptTooLongError, match="context"):
        alone_llm.generate([[5] * eng.max_model_len], SamplingParams(max_tokens=1))
    with pytest.raises(InvalidRequestError, match="vocabulary"):
        alone_llm.generate([[5, 10**6]], SamplingParams())
    with pytest.raises(InvalidRequestError, match="vocabulary"):
        alone_llm.generate(["hello world"], SamplingParams())  # tokenizer ids beyond this tiny model
    with pytest.raises(InvalidRequestError, match="empty"):
        alone_llm.generate([""], SamplingParams())
    with pytest.raises(InvalidRequestError, match="sampling params"):
        alone_llm.generate(["a", "b"], [SamplingParams()])
    # A bad request among good ones: nothing from the batch stays queued.
    with pytest.raises(InvalidRequestError):
        alone_llm.generate([[5, 6], [5, 10**6]], SamplingParams(max_tokens=4))
    _assert_whole(alone_llm)


def test_max_model_len_ends_with_length(tiny_model_dir):
    llm = LLM(str(tiny_model_dir), device="cpu", num_kv_blocks=64, block_size=4, max_model_len=16)
    out = llm.generate([[5] * 10], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 6
    small = LLM(str(tiny_model_dir), device="cpu", num_kv_blocks=8, block_size=4)  # 32 tokens in all
    with pytest.raises(PromptTooLongError, match="needs 10 KV blocks"):
        small.generate([[5] * 20], SamplingParams(max_tokens=20))
    assert small.generate([[5] * 20], SamplingParams(max_tokens=12))[0].finish_reason in ("length", "stop")
    _assert_whole(llm)
    _assert_whole(small)


def test_chat_uses_the_template(smollm2_llm):
    out = smollm2_llm.chat([{"role": "user", "content": "hi"}], SamplingParams(temperature=0, max_tokens=3))[0]
    expected = smollm2_llm.tokenizer.encode(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    assert out.prompt_token_ids == expected


# -- async scheduling: launch step N+1 before reading step N's tokens ------------------------------
@pytest.fixture(scope="module")
def async_llm(tiny_model_dir):
    llm = LLM(str(tiny_model_dir), device="cpu", num_kv_blocks=256, block_size=4, async_scheduling="on")
    assert llm.engine.async_scheduling
    return llm


def _mixed_workload(seed: int, n: int):
    """Every way a request can end (length, EOS-like stop ids, stop strings, max_model_len is
    elsewhere) and every sampling feature whose state could notice a late token."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, 320) for _ in range(rng.randint(1, 30))] for _ in range(n)]
    params = []
    for i in range(n):
        kw = dict(temperature=0, max_tokens=rng.randint(1, 20), ignore_eos=True)
        if i % 3 == 0:
            kw["stop_token_ids"] = [rng.randrange(3, 320) for _ in range(40)]  # often hit early
        if i % 4 == 1:
            kw.update(temperature=0.8, top_k=40, seed=i)
        if i % 5 == 2:
            kw.update(presence_penalty=0.7, frequency_penalty=0.4)
        if i % 6 == 3:
            kw["logprobs"] = 2
        params.append(SamplingParams(**kw))
    return prompts, params


def _key(o):
    lps = None if o.logprobs is None else [(lp.token_id, [t for t, _ in lp.top]) for lp in o.logprobs]
    return o.token_ids, o.text, o.finish_reason, lps


def test_async_equals_sync_under_preemption(tiny_model_dir, alone_llm):
    prompts, params = _mixed_workload(seed=5, n=24)
    alone = [alone_llm.generate([p], sp)[0] for p, sp in zip(prompts, params)]
    small = LLM(str(tiny_model_dir), device="cpu", num_kv_blocks=16, block_size=4, max_num_batched_tokens=16,
                async_scheduling="on")
    together = small.generate(prompts, params)
    sync, outs = [_key(o) for o in alone], [_key(o) for o in together]
    assert outs == sync
    for a, b in zip(alone, together):  # batches differ, so logprobs agree to rounding only
        for x, y in zip(a.logprobs or [], b.logprobs or []):
            assert abs(x.logprob - y.logprob) < 1e-4
    assert {o[2] for o in outs} == {"length", "stop"}
    assert small.engine.scheduler.num_preemptions > 0, "the budget was meant to force preemption"
    _assert_whole(small)


def test_async_stop_strings_streams_and_max_model_len(async_llm, alone_llm, tiny_model_dir):
    prompt = [5, 6, 7]
    full = alone_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0]
    stop = full.text[3:6]
    sp = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[stop])
    cut = async_llm.generate([prompt], sp)[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.find(stop)]
    assert "".join(async_llm.stream(prompt, sp)) == cut.text
    _assert_whole(async_llm)
    short = LLM(str(tiny_model_dir), device="cpu", num_kv_blocks=64, block_size=4, max_model_len=16,
                async_scheduling="on")
    out = short.generate([[5] * 10], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 6
    _assert_whole(short)


def test_async_abort_in_flight_and_id_reuse(async_llm):
    eng = async_llm.engine
    sp = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    alone = async_llm.generate([[9, 10, 11]], sp)[0].token_ids
    eng.add_request([7, 8], sp, request_id="x")
    eng.step()
    eng.step()
    assert eng._inflight is not None  # a launched step whose tokens are not read yet
    eng.abort_request("x")
    _assert_whole(async_llm)
    # The same id again while the aborted request's step is still in flight: the stale
    # token must not leak into the new request.
    eng.add_request([9, 10, 11], sp, request_id="x")
    outs = []
    while eng.has_unfinished_requests():
        outs += [o for o in eng.step() if o.request_id == "x"]
    assert outs[-1].finished and outs[-1].token_ids == alone
    _assert_whole(async_llm)


def test_async_is_the_default_on_cuda_only(tiny_model_dir):
    from bitfold import BitfoldError

    assert not LLM(str(tiny_model_dir), device="cpu", num_kv_blocks=16).engine.async_scheduling
    with pytest.raises(BitfoldError, match="async_scheduling"):
        LLM(str(tiny_model_dir), device="cpu", num_kv_blocks=16, async_scheduling="yes")
