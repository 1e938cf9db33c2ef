"""Every architecture's logits against HF transformers on tiny random checkpoints written by
transformers itself (float32): ragged batched prefill, chunked prefill and several decode
steps through the paged cache."""
import random

import pytest
import torch

from tests.helpers import PagedDriver, hf_logits, rel_err, write_tiny_hf_model

TOL = 1e-4

CASES = {
    "llama": ("llama", {}),
    "llama3-rope-scaling": ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 32}}),
    "llama-linear-rope-tied-bias": ("llama", {"tie_word_embeddings": True, "attention_bias": True,
                                              "rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "mistral-sliding-window": ("mistral", {"sliding_window": 7}),
    "qwen2": ("qwen2", {"num_key_value_heads": 1}),
    "qwen3": ("qwen3", {"head_dim": 32, "num_key_value_heads": 4}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case, tmp_path):
    kind, overrides = CASES[case]
    hf = write_tiny_hf_model(kind, tmp_path, shard=(case == "llama"), **overrides)
    drv = PagedDriver(tmp_path, block_size=4)
    rng = random.Random(case)
    lens = [1, 5, 8, 13]  # ragged; 8 ends exactly on a block boundary
    prompts = [[rng.randrange(320) for _ in range(n)] for n in lens]
    reqs = [drv.new(p) for p in prompts]

    # Step 1: the first part of every prompt (chunked prefill: 13 is split 9 + 4).
    first = [min(len(p), 9) for p in prompts]
    outs = drv.step(list(zip(reqs, first)))
    ref = [hf_logits(hf, p) for p in prompts]
    for o, r, n in zip(outs, ref, first):
        assert rel_err(o, r[:n]) < TOL
    # Step 2: the rest of the long prompt together with the first decode of the others.
    seqs = [list(p) for p in prompts]
    for _ in range(6):  # decode steps, teacher-forced with random tokens
        work = []
        for req, s in zip(reqs, seqs):
            if req.num_computed_tokens == len(s):
                tok = rng.randrange(320)
                s.append(tok)
                req.output_token_ids.append(tok)
            work.append((req, len(s) - req.num_computed_tokens))
        outs = drv.step(work)
        for o, s, (req, n) in zip(outs, seqs, work):
            r = hf_logits(hf, s)[len(s) - n :]
            assert rel_err(o, r) < TOL, f"{case}: seq of len {len(s)} differs"
