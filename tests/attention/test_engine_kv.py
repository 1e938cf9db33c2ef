"""Compressed KV caches through the whole engine on a tiny random llama (CPU, reference
kernels): batched under a small pool with preemption gives the same greedy tokens as each
request alone (prefill reads what decoding would, so chunking does not matter), no block or
sequence slot leaks, and bad settings are refused with one clear line before anything loads."""
import random

import pytest

from bitfold import LLM, SamplingParams
from bitfold.errors import BitfoldError


def _workload(seed=0, n=10):
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, 320) for _ in range(rng.randint(1, 90))] for _ in range(n)]
    params = [SamplingParams(temperature=0, max_tokens=rng.randint(1, 40), ignore_eos=True) for _ in range(n)]
    return prompts, params


def _assert_whole(llm):
    eng = llm.engine
    assert eng.pool.num_free == eng.pool.num_blocks, "KV blocks leaked"
    if eng.kv.slots is not None:
        assert eng.kv.slots.num_free == eng.kv.slots.num_blocks, "sequence slots leaked"
    assert eng.kv.num_tables == 0 and not eng.scheduler.has_unfinished


@pytest.mark.parametrize("kv,residual", [("int4", 32), ("int2", 0), ("int8", None), ("k8v4", 64)])
def test_batched_with_preemption_matches_alone(tiny_model_dir, kv, residual):
    prompts, params = _workload()
    alone = LLM(str(tiny_model_dir), device="cpu", kv_cache=kv, kv_residual=residual, num_kv_blocks=16)
    want = [alone.generate([p], sp)[0].token_ids for p, sp in zip(prompts, params)]
    # 3 pages of 64 tokens: the longest request (90 + 40) fits alone, few fit together
    small = LLM(str(tiny_model_dir), device="cpu", kv_cache=kv, kv_residual=residual, num_kv_blocks=3,
                max_num_batched_tokens=24, max_num_seqs=4)
    got = [o.token_ids for o in small.generate(prompts, params)]
    assert got == want
    assert small.engine.scheduler.num_preemptions > 0, "the budget was meant to force preemption"
    _assert_whole(small)
    _assert_whole(alone)


def test_compressed_cache_changes_outputs_only_slightly(tiny_model_dir):
    """Not a no-op: int2 with no residual window moves the logits, int8 barely."""
    import torch

    prompt = list(range(5, 200))
    lp = {}
    for kv in ("auto", "int8", "int2"):
        llm = LLM(str(tiny_model_dir), device="cpu", kv_cache=kv, kv_residual=0 if kv == "int2" else None)
        out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1, logprobs=5, ignore_eos=True))[0]
        lp[kv] = torch.tensor([v for _, v in out.logprobs[0].top])  # the same context for every codec
    assert (lp["int8"] - lp["auto"]).abs().max() < (lp["int2"] - lp["auto"]).abs().max()
    assert (lp["int2"] - lp["auto"]).abs().max() > 1e-3


@pytest.mark.parametrize("kwargs,match", [
    (dict(kv_cache="int3"), r"invalid engine setting kv_cache='int3': expected one of .*int4"),
    (dict(kv_cache="int4", attention_backend="cpu", dtype="bfloat16"),
     r"attention backend 'cpu' cannot run KV cache 'int4' on cpu: computes in float32, not bfloat16"),
    (dict(kv_cache="int4", kv_residual=600), r"--kv-cache int4: residual window 600 tokens is not smaller than the "
                                             r"context \(512 tokens\)"),
    (dict(kv_cache="int2", block_size=32), r"block size 32 is too small: int2 packs 4 tokens per byte"),
    (dict(kv_cache="auto", kv_residual=64), r"--kv-residual and --kv-rotate apply to compressed KV caches"),
    (dict(kv_cache="bf16"), r"KV cache bf16 stores the compute dtype, which is float32: add --dtype bfloat16"),
])
def test_bad_kv_settings_are_refused_with_one_line(tiny_model_dir, kwargs, match):
    with pytest.raises(BitfoldError, match=match) as e:
        LLM(str(tiny_model_dir), device="cpu", **kwargs)
    assert "\n" not in str(e.value)
