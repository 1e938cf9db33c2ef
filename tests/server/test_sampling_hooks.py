"""The two engine hooks the server needs, against independent references: OpenAI's presence /
frequency penalties (`layers/sampler.apply_penalties`, and greedy decoding through the whole
engine vs a loop over transformers' logits with the penalty applied by hand), and logprobs
(`RequestOutput.logprobs` vs log_softmax of transformers' logits at every generated position)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bitfold import LLM, SamplingParams
from bitfold.errors import InvalidSamplingParamsError
from bitfold.layers.sampler import apply_penalties, token_logprobs

pytestmark = pytest.mark.usefixtures("single_thread")


def ref_penalized(logits: np.ndarray, generated: list[int], presence: float, frequency: float) -> np.ndarray:
    """OpenAI's formula, token by token in float64."""
    out = logits.astype(np.float64).copy()
    for j in set(generated):
        c = generated.count(j)
        out[j] -= presence + frequency * c
    return out


@pytest.mark.parametrize("presence,frequency", [(0.0, 0.0), (1.5, 0.0), (0.0, 0.7), (-1.0, 2.0), (2.0, -2.0)])
def test_apply_penalties_matches_reference(presence, frequency):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 11, generator=g)
    gen = [[1, 1, 4, 10, 1], [], [0, 0, 0, 0, 3]]
    params = [SamplingParams(presence_penalty=presence, frequency_penalty=frequency)] * 2 + [SamplingParams()]
    out = apply_penalties(logits, gen, params)
    for i in range(3):
        p = params[i]
        want = ref_penalized(logits[i].numpy(), gen[i], p.presence_penalty, p.frequency_penalty)
        np.testing.assert_allclose(out[i].numpy(), want, rtol=0, atol=1e-6)
    assert torch.equal(logits, torch.randn(3, 11, generator=torch.Generator().manual_seed(0))), "input modified"


def test_token_logprobs_matches_reference():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0], [5.0, 5.0, -1.0, 0.0]])
    out = token_logprobs(logits, [0, 2], [2, 0])
    ref = torch.log_softmax(logits.double(), -1)
    assert out[0].token_id == 0 and out[0].logprob == pytest.approx(float(ref[0, 0]), abs=1e-6)
    assert [t for t, _ in out[0].top] == [3, 2]
    assert [v for _, v in out[0].top] == pytest.approx(ref[0, [3, 2]].tolist(), abs=1e-6)
    assert out[1].top == [] and out[1].logprob == pytest.approx(float(ref[1, 2]), abs=1e-6)


@pytest.mark.parametrize("field,value", [("presence_penalty", 2.5), ("frequency_penalty", -3),
                                         ("presence_penalty", "1"), ("frequency_penalty", float("nan")),
                                         ("logprobs", -1), ("logprobs", True), ("logprobs", 1.5)])
def test_new_sampling_fields_are_validated(field, value):
    with pytest.raises(InvalidSamplingParamsError, match=field):
        SamplingParams(**{field: value})


@pytest.fixture(scope="module")
def tiny_llm(tiny_model_dir):
    return LLM(str(tiny_model_dir), device="cpu", num_kv_blocks=64, block_size=4)


@pytest.fixture(scope="module")
def tiny_hf(tiny_model_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()


def _hf_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].double().numpy()


@pytest.mark.parametrize("presence,frequency", [(0.0, 0.0), (1.2, 0.0), (0.0, 0.9), (0.5, 1.5)])
def test_penalized_greedy_matches_transformers_loop(tiny_llm, tiny_hf, presence, frequency):
    prompt = [5, 6, 7, 8]
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, presence_penalty=presence,
                        frequency_penalty=frequency)
    # A batch of three (two unpenalized neighbours) must not change the penalized row.
    outs = tiny_llm.generate([prompt, [9, 10], prompt], [sp, SamplingParams(temperature=0, max_tokens=5), sp])
    ids, gen = list(prompt), []
    for _ in range(12):
        nxt = int(np.argmax(ref_penalized(_hf_logits(tiny_hf, ids), gen, presence, frequency)))
        ids.append(nxt)
        gen.append(nxt)
    assert outs[0].token_ids == gen and outs[2].token_ids == gen
    if presence or frequency:
        plain = tiny_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
        assert plain.token_ids != gen, "the penalty should change this greedy continuation"


def test_logprobs_match_transformers(tiny_llm, tiny_hf):
    prompt = [11, 12, 13]
    out = tiny_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3))[0]
    assert len(out.logprobs) == len(out.token_ids) == 6
    ids = list(prompt)
    for tok, lp in zip(out.token_ids, out.logprobs):
        ref = torch.log_softmax(torch.from_numpy(_hf_logits(tiny_hf, ids)), -1)
        assert lp.token_id == tok and lp.logprob == pytest.approx(float(ref[tok]), abs=1e-4)
        top = torch.topk(ref, 3)
        assert [t for t, _ in lp.top] == top.indices.tolist()
        assert [v for _, v in lp.top] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert lp.top[0][0] == tok  # greedy picks the most likely token
        ids.append(tok)
    # Logprobs are the model's distribution: temperature and penalties do not change them.
    sampled = tiny_llm.generate([prompt], SamplingParams(temperature=0.7, seed=3, max_tokens=4, ignore_eos=True,
                                                         presence_penalty=1.0, logprobs=0))[0]
    ids = list(prompt)
    for tok, lp in zip(sampled.token_ids, sampled.logprobs):
        ref = torch.log_softmax(torch.from_numpy(_hf_logits(tiny_hf, ids)), -1)
        assert lp.top == [] and lp.logprob == pytest.approx(float(ref[tok]), abs=1e-4)
        ids.append(tok)
    no = tiny_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=2))[0]
    assert no.logprobs is None
