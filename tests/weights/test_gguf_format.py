"""The `gguf` format on the CPU: the default model (SmolLM2 GGUF, Q4_1 layers, a tied Q8_0
embedding) runs by default through the low-bit LUT kernels holding exactly the file's codes,
and its greedy output is checked against the dequantize-at-load path (`weights="dense"`).

The LUT kernels quantize activations into int8 tables (T-MAC), so logits are not bit-equal to
the float path (measured: ~3.5% relative logit error, mean KL 0.01 nats on SmolLM2); the checks
are that every greedy choice of the default path is the dense model's own choice or a near tie
for it, and that teacher-forced top-1 predictions agree almost everywhere."""
from __future__ import annotations

import pytest
import torch

from bitfold import SamplingParams
from bitfold.core.request import Request
from bitfold.core.scheduler import ScheduledChunk
from bitfold.layers.linear import Linear
from bitfold.loader import open_model
from bitfold.weights.gguf_blocks import GGUFBlocks
from bitfold.weights.lowbit import dequantize

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "In 1492, Columbus sailed",
           "<|im_start|>user\nName three colors.<|im_end|>\n<|im_start|>assistant\n", "1, 2, 3, 4,"]
NEAR_TIE = 0.5  # nats: a greedy choice that is not dense's argmax must be this close to it
pytestmark = pytest.mark.slow  # the real default model, loaded twice


def _logits(llm, ids: list[int]) -> torch.Tensor:
    """Teacher-forced logits of every position [len(ids), vocab] (one prefill chunk)."""
    eng = llm.engine
    r = Request("tf", list(ids), SamplingParams(max_tokens=1))
    assert eng.kv.allocate_slots(r, len(ids))
    try:
        return eng.runner.forward_logits([ScheduledChunk(r, 0, len(ids), list(eng.kv.block_table(r)))],
                                         all_tokens=True)
    finally:
        eng.kv.free(r)


def test_default_is_the_lut_path_with_the_files_codes(smollm2_path, smollm2_default):
    model = smollm2_default.engine.runner.model
    blocks = {n: w for n, w in open_model(smollm2_path).weights() if isinstance(w, GGUFBlocks)}
    lins = [m for m in model.modules() if isinstance(m, Linear)]
    assert {m.fmt.name for m in lins if m is not model.lm_head} == {"int4-g32"}
    assert model.lm_head.fmt.name == "int8-g32"  # the tied Q8_0 embedding, two LUT passes
    for i in (0, 29):
        lin = model.layers[i].attn.qkv
        want = torch.cat([blocks[f"model.layers.{i}.self_attn.{p}_proj.weight"].dequantize(576) for p in "qkv"])
        assert torch.equal(dequantize(*lin.fmt.codes(lin), 32), want)
    head = model.lm_head
    assert torch.equal(dequantize(*head.fmt.codes(head), 32), blocks["model.embed_tokens.weight"].dequantize(576))
    # The layers hold the file's bytes: Q4_1 is 20 B per 32 weights, so are int4-g32's codes + fp16
    # scale + min (plus rows padded to LUT tiles of 64).
    file_bytes = sum(w.raw.numel() for n, w in blocks.items() if w.qtype.name == "Q4_1")
    held = sum(b.numel() * b.element_size() for m in lins if m is not head for b in m.buffers())
    assert file_bytes <= held <= 1.02 * file_bytes, (held, file_bytes)


def test_decode_steps_run_fused(smollm2_default):
    runner = smollm2_default.engine.runner
    calls = []
    plan = runner.fused_steps

    class Spy:
        def plan(self, ctx):
            p = plan.plan(ctx)
            calls.append(p is not None)
            return p

    runner.fused_steps = Spy()
    try:
        smollm2_default.generate(["Hello there, how"], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    finally:
        runner.fused_steps = plan
    assert calls == [False, True, True, True]  # prefill per-op, every decode step fused


def test_greedy_output_checked_against_dequantized(smollm2_default, smollm2_llm):
    """Greedy 24 tokens per prompt on the default path, teacher-forced through the dense model:
    each token is dense's argmax there, or within NEAR_TIE nats of it (so a continuation may
    part from dense's at a near tie, never at a clear choice), and most are dense's argmax."""
    tok = smollm2_llm.tokenizer
    ids = [tok.encode(p, add_special_tokens=False) for p in PROMPTS]
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    lut = [o.token_ids for o in smollm2_default.generate(ids, sp)]
    dense = [o.token_ids for o in smollm2_llm.generate(ids, sp)]
    argmax = same = 0
    for prompt, a, b in zip(ids, lut, dense):
        lp = _logits(smollm2_llm, prompt + a)[len(prompt) - 1 : -1].log_softmax(-1)
        best = lp.max(-1).values
        chosen = lp.gather(1, torch.tensor(a)[:, None])[:, 0]
        assert (best - chosen <= NEAR_TIE).all(), (tok.decode(a), (best - chosen).tolist())
        argmax += int((chosen == best).sum())
        same += a == b
    print(f"greedy: {argmax} of {24 * len(ids)} tokens dense's argmax, {same} of {len(ids)} continuations equal")
    assert argmax >= 0.9 * 24 * len(ids) and same >= 1


def test_teacher_forced_top1_agreement(smollm2_default, smollm2_llm):
    tok = smollm2_llm.tokenizer
    text = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
            "movable metal type, oil-based ink and a wooden press adapted from wine making. Within fifty years, "
            "printing shops had spread to more than two hundred cities across Europe.")
    ids = tok.encode(text, add_special_tokens=False)
    a, b = _logits(smollm2_default, ids), _logits(smollm2_llm, ids)
    top = b.topk(2, -1).values
    agree = a.argmax(-1) == b.argmax(-1)
    assert agree.float().mean() >= 0.9
    assert ((top[:, 0] - top[:, 1])[~agree] < NEAR_TIE).all()  # only near ties flip
    assert float((a - b).norm() / b.norm()) < 0.06  # measured 0.035


def test_int4_on_a_4bit_file_keeps_its_blocks(smollm2_path):
    """`--weights int4` on this Q4_1 file is int4-g32 (the blocks' codes), not a second rounding
    onto int4-g64; asking a group explicitly rounds again."""
    from bitfold.config import EngineConfig
    from bitfold.weights.base import resolve_weight_format

    src = open_model(smollm2_path)
    assert src.weight_format == "gguf" and src.stored_formats == ("int4-g32", "int8-g32")
    assert resolve_weight_format(EngineConfig(weights="int4").weights, src.weight_format, "cpu",
                                 src.stored_formats) == "int4-g32"
    assert resolve_weight_format("int4-g64", src.weight_format, "cpu", src.stored_formats) == "int4-g64"
