"""The embedded SmolLM2-135M-Instruct GGUF (Q4_1, llama with permuted Q/K) against
transformers' own GGUF loader, which dequantizes the same file with the gguf package."""
import pytest
import torch

from tests.helpers import PagedDriver, rel_err

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "<|im_start|>user\nName three colors.<|im_end|>\n<|im_start|>assistant\n",
    "In 1492, Columbus sailed",
]


def test_prefill_and_decode_logits_match(smollm2_path, smollm2_hf, smollm2_llm):
    tok = smollm2_llm.tokenizer
    drv = PagedDriver(smollm2_path, num_blocks=64, block_size=16)
    seqs = [tok.encode(p, add_special_tokens=False) for p in PROMPTS]
    reqs = [drv.new(s) for s in seqs]
    outs = drv.step([(r, len(s)) for r, s in zip(reqs, seqs)])
    for o, s in zip(outs, seqs):
        with torch.no_grad():
            ref = smollm2_hf(torch.tensor([s])).logits[0].float()
        # Both sides dequantize with gguf in float32; only summation order differs.
        assert rel_err(o, ref) < 1e-4
    for _ in range(3):  # decode steps through the paged cache, batched
        for r, s in zip(reqs, seqs):
            t = int(torch.randint(0, 49152, (1,)))
            s.append(t)
            r.output_token_ids.append(t)
        outs = drv.step([(r, 1) for r in reqs])
        for o, s in zip(outs, seqs):
            with torch.no_grad():
                ref = smollm2_hf(torch.tensor([s])).logits[0, -1:].float()
            assert rel_err(o, ref) < 1e-4


def test_greedy_32_tokens_match(smollm2_hf, smollm2_llm):
    from bitfold import SamplingParams

    tok = smollm2_llm.tokenizer
    ids = [tok.encode(p, add_special_tokens=False) for p in PROMPTS]
    outs = smollm2_llm.generate(ids, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    for s, o in zip(ids, outs):
        assert o.token_ids == hf_greedy(smollm2_hf, s, 32)


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """n greedy tokens from transformers with its own KV cache (a plain argmax loop: no
    generation-config EOS handling in the way; without the cache each step re-ran the whole
    sequence and this reference took minutes)."""
    import inspect

    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # 5.x : 4.x
    out_ids = []
    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=True)
        for _ in range(n):
            out_ids.append(int(out.logits[0, -1].argmax()))
            out = model(torch.tensor([out_ids[-1:]]), use_cache=True, **{key: out[key]})
    return out_ids
