"""Perplexity, KL and top-1 agreement through the paged KV path, and proof the metrics can fail.

One lockstep run scores the same Wikipedia windows under three engines: the fp32 reference,
an identical second engine (KL must be exactly 0), and one whose KV codec stores zeros for V
(a deliberately broken cache: KL must be large). The reference's perplexity must agree with
transformers' own full forward over the same GGUF and tokens."""
from __future__ import annotations

import math

import pytest
import torch

from bitfold.errors import BitfoldError
from bitfold.eval.ppl import _plan, sample_windows, score_windows
from bitfold.kvcache.codecs import KV_CODECS
from bitfold.kvcache.codecs.dense import DenseCodec, DenseRefOps
from tests.eval.conftest import make_engine

NUM_WINDOWS, LENGTH = 8, 64


class ZeroVCodec(DenseCodec):
    """Test-only: stores K faithfully and V as zeros, so attention outputs are all zero."""

    name = "test_zero_v"

    def write(self, storage, k, v, slot_mapping) -> None:
        super().write(storage, k, torch.zeros_like(v), slot_mapping)

    def ops(self, backend):  # only the reference kernels, which write through `write`
        return DenseRefOps(self) if backend == "torch" else "test codec: reference kernels only"


@pytest.fixture(scope="module")
def windows(smollm2_tokenizer, wiki_docs):
    return sample_windows(smollm2_tokenizer, wiki_docs, NUM_WINDOWS, LENGTH, seed=0)


@pytest.fixture(scope="module")
def ref_engine(smollm2_source):
    return make_engine(smollm2_source, max_num_batched_tokens=32)


@pytest.fixture(scope="module")
def lockstep(smollm2_source, ref_engine, windows):
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(KV_CODECS._entries, ZeroVCodec.name, ZeroVCodec)
        broken = make_engine(smollm2_source, kv_cache=ZeroVCodec.name)
    engines = {"ref": ref_engine, "self": make_engine(smollm2_source), "zero_v": broken}
    out = score_windows(engines, windows, batch=NUM_WINDOWS)
    assert all(e.pool.num_free == e.pool.num_blocks for e in engines.values())  # every block freed
    return out["configs"]


def test_windows_are_seeded_disjoint_and_prefix_stable(smollm2_tokenizer, wiki_docs, windows):
    assert [len(w) for w in windows] == [LENGTH] * NUM_WINDOWS
    again = sample_windows(smollm2_tokenizer, wiki_docs, NUM_WINDOWS + 2, LENGTH, seed=0)
    assert again[:NUM_WINDOWS] == windows  # --limit takes a prefix of the same sample
    other = sample_windows(smollm2_tokenizer, wiki_docs, NUM_WINDOWS, LENGTH, seed=1)
    assert other != windows
    text = smollm2_tokenizer.decode(windows[0])
    assert len(text) > 200 and text.count(" ") > 30  # real English text


def test_ppl_matches_transformers(lockstep, windows, smollm2_hf):
    with torch.no_grad():
        logits = smollm2_hf(torch.tensor(windows)).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    nll = -logp.gather(2, torch.tensor(windows)[:, 1:, None])[..., 0]
    ppl_hf = math.exp(float(nll.double().mean()))
    ref = lockstep["ref"]
    assert ref["tokens"] == NUM_WINDOWS * (LENGTH - 1)  # every position scored, all by decode
    assert abs(ref["ppl"] / ppl_hf - 1) < 0.005, (ref["ppl"], ppl_hf)  # the bar
    assert abs(ref["nll_mean"] - float(nll.double().mean())) < 1e-4  # what fp32 on both sides gives
    assert 5 < ref["ppl"] < 60  # a 135M instruct model on Wikipedia text


def test_kl_of_a_config_against_itself_is_zero(lockstep):
    same = lockstep["self"]
    assert same["kl_mean"] == 0.0 and same["kl_max"] == 0.0
    assert same["top1_agreement"] == 1.0
    assert same["ppl"] == lockstep["ref"]["ppl"]


def test_kl_against_a_broken_kv_cache_is_large(lockstep):
    broken, ref = lockstep["zero_v"], lockstep["ref"]
    assert broken["kl_mean"] > 1.0, broken
    assert broken["top1_agreement"] < 0.5, broken
    assert broken["ppl"] > 3 * ref["ppl"]
    assert broken["ln_ppl_ratio"] > 10 * broken["ln_ppl_ratio_se"]  # far outside the noise


def test_default_scores_only_through_decode(ref_engine, windows, monkeypatch):
    calls = {"prefill": 0, "decode": 0}
    backend = ref_engine.runner.backend.ops  # the kernels the backend runs over these pages

    def counted(kind):
        fn = getattr(backend, kind)

        def wrapper(*args, **kwargs):
            calls[kind] += 1
            return fn(*args, **kwargs)
        return wrapper

    for kind in calls:
        monkeypatch.setattr(backend, kind, counted(kind))
    out = score_windows({"ref": ref_engine}, [w[:12] for w in windows[:2]], batch=2)
    layers = ref_engine.runner.model_config.num_layers
    assert calls == {"prefill": 0, "decode": 11 * layers}  # 11 one-token steps, every layer reads the cache
    assert out["configs"]["ref"]["tokens"] == 2 * 11


def test_prefill_then_decode_scores_the_same_tokens(ref_engine, windows):
    """Prefilled positions (chunked: 2 windows x 16 tokens per step) score what decode scores:
    the prefill and decode attention paths agree, and targets line up in both."""
    short = [w[:48] for w in windows[:2]]
    decoded = score_windows({"ref": ref_engine}, short, batch=2)
    mixed = score_windows({"ref": ref_engine}, short, prefill=37, score_prefill=True, batch=2)
    skipped = score_windows({"ref": ref_engine}, short, prefill=37, batch=2)
    a, b = decoded["configs"]["ref"], mixed["configs"]["ref"]
    assert a["tokens"] == b["tokens"] == 2 * 47
    assert abs(a["nll_mean"] - b["nll_mean"]) < 1e-4
    assert skipped["configs"]["ref"]["tokens"] == 2 * 10  # targets 38..47 only
    curve = mixed["positions"]["ref"]["nll"]
    assert abs(curve[5] - decoded["positions"]["ref"]["nll"][5]) < 1e-3


def test_plan_keeps_prefill_chunks_within_the_token_budget():
    assert _plan(10, 7, True, batch=2, budget=6) == [(0, 3, True), (3, 3, True), (6, 1, True),
                                                     (7, 1, True), (8, 1, True)]
    assert _plan(4, 0, False, batch=8, budget=4) == [(0, 1, True), (1, 1, True), (2, 1, True)]


def test_bad_windows_are_errors(ref_engine, smollm2_tokenizer):
    with pytest.raises(BitfoldError, match="prefill"):
        score_windows({"ref": ref_engine}, [[1, 2, 3]], prefill=2)
    with pytest.raises(BitfoldError, match="same length"):
        score_windows({"ref": ref_engine}, [[1, 2, 3], [1, 2]])
    with pytest.raises(BitfoldError, match="fewer than"):
        sample_windows(smollm2_tokenizer, ["a tiny corpus"], 2, 64, seed=0)
