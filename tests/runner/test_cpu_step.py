"""The fused CPU decode step (runner/cpu_step.py + cpu/decode_step.cpp) against the per-op path
it replaces, which is its reference: the same tiny random checkpoint loaded twice, one runner per
path, each with its own paged cache over a shuffled block pool, fed the same tokens.

Both paths call the same C++ kernels in the same order, so their logits are expected to agree to
float32 rounding (observed: bit-identical); the tolerance is 1e-5 relative. Cases: GQA ratios 1
and 4, head dims 16/32/64/128, q/k/v bias (qwen2), q/k RMSNorm (qwen3), a sliding window
(mistral), inputs padded to whole groups (hidden 64 at group 128, intermediate 160 at 64),
int2/int3/int4/ternary, batches of 1 and 3 whose contexts cross block boundaries."""
import random

import pytest
import torch

from bitfold.config import EngineConfig
from bitfold.core.block_pool import BlockPool
from bitfold.core.kv_manager import KVManager
from bitfold.core.request import Request
from bitfold.core.scheduler import ScheduledChunk
from bitfold.kernels import cpu_ops
from bitfold.loader import open_model
from bitfold.runner import cpu_step
from bitfold.runner.model_runner import ModelRunner
from bitfold.sampling import SamplingParams
from tests.helpers import rel_err, write_tiny_hf_model

pytestmark = pytest.mark.skipif(not cpu_ops.available(), reason="the C++ CPU kernels could not be built")

TOL = 1e-5
BLOCK = 4

# name: (kind, checkpoint overrides, weight format)
CASES = {
    "llama-mha-d64-int4": ("llama", {"num_key_value_heads": 4, "head_dim": 64}, "int4"),
    "llama-gqa4-d128-int2": ("llama", {"num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 128}, "int2"),
    "llama-padded-int4g128": ("llama", {"attention_bias": True}, "int4-g128"),
    "qwen2-bias-gqa4-int3": ("qwen2", {"num_key_value_heads": 1}, "int3"),
    "qwen3-qknorm-int4g32": ("qwen3", {"head_dim": 32, "num_key_value_heads": 4}, "int4-g32"),
    "mistral-window-int2g16": ("mistral", {"sliding_window": 7}, "int2-g16"),
    "llama-ternary": ("llama", {}, "ternary-g32"),
}


class Runner:
    """A ModelRunner driven by hand with its own block pool (shuffled, so tables are not
    contiguous); `fused` says whether its decode steps may take the fused path."""

    def __init__(self, path, weights: str, fused: bool, attention: str = "auto", num_blocks: int = 48):
        cfg = EngineConfig(model=str(path), device="cpu", block_size=BLOCK, num_kv_blocks=num_blocks, weights=weights,
                           attention_backend=attention, cpu_fused_step=fused)
        src = open_model(str(path))
        self.runner = ModelRunner(src, cfg, torch.device("cpu"), torch.float32, max_model_len=src.max_context)
        self.pool = BlockPool(num_blocks)
        order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(int(fused))).tolist()
        self.pool._free = type(self.pool._free)(order)
        self.kv = KVManager(self.pool, BLOCK)
        self.fused = fused
        self.reqs: list[Request] = []

    def start(self, prompts: list[list[int]]) -> torch.Tensor:
        self.reqs = [Request(f"r{i}", list(p), SamplingParams(temperature=0, max_tokens=1000))
                     for i, p in enumerate(prompts)]
        return self._step([len(p) for p in prompts])

    def decode(self, tokens: list[int]) -> torch.Tensor:
        """Append one token to every sequence and run it: logits [B, vocab]."""
        for r, t in zip(self.reqs, tokens):
            r.output_token_ids.append(t)
        return self._step([1] * len(tokens))

    def _step(self, counts: list[int]) -> torch.Tensor:
        chunks = []
        for req, n in zip(self.reqs, counts):
            assert self.kv.allocate_slots(req, n)
            chunks.append(ScheduledChunk(req, req.num_computed_tokens, n, list(self.kv.block_table(req))))
        logits = self.runner.forward_logits(chunks)
        for req, n in zip(self.reqs, counts):
            req.num_computed_tokens += n
        return logits


@pytest.fixture
def fused_calls(monkeypatch):
    """How many steps ran fused."""
    calls = []
    real = cpu_step.FusedDecodeStep.__call__

    def spy(self, input_ids, ctx):
        calls.append(input_ids.shape[0])
        return real(self, input_ids, ctx)

    monkeypatch.setattr(cpu_step.FusedDecodeStep, "__call__", spy)
    return calls


@pytest.mark.parametrize("case", list(CASES))
def test_fused_step_matches_per_op_path(case, tmp_path, fused_calls):
    kind, overrides, weights = CASES[case]
    write_tiny_hf_model(kind, tmp_path, seed=len(case), **overrides)
    ref, fused = Runner(tmp_path, weights, fused=False), Runner(tmp_path, weights, fused=True)
    rng = random.Random(case)
    # batch 3 with ragged contexts (5 and 8 sit at block edges of 4: the next tokens open blocks)
    prompts = [[rng.randrange(320) for _ in range(n)] for n in (5, 8, 2)]
    torch.testing.assert_close(fused.start(prompts), ref.start(prompts), rtol=0, atol=0)  # prefill: per-op both
    assert fused_calls == []
    for step in range(6):  # teacher-forced decode
        toks = [rng.randrange(320) for _ in prompts]
        a, b = fused.decode(toks), ref.decode(toks)
        assert rel_err(a, b) < TOL, f"{case}: decode step {step} differs by {rel_err(a, b):.2e}"
    assert fused_calls == [3] * 6
    # greedy, each path feeding back its own argmax; then batch 1 over the same models
    ta, tb = fused.decode([0] * 3).argmax(-1), ref.decode([0] * 3).argmax(-1)
    for _ in range(5):
        assert torch.equal(ta, tb)
        ta, tb = fused.decode(ta.tolist()).argmax(-1), ref.decode(tb.tolist()).argmax(-1)
    one = [[rng.randrange(320) for _ in range(3)]]
    fused.start(one), ref.start(one)
    for _ in range(3):
        tok = [rng.randrange(320)]
        a, b = fused.decode(tok), ref.decode(tok)
        assert a.shape == (1, 320) and rel_err(a, b) < TOL


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama-step")
    write_tiny_hf_model("llama", path, seed=11)
    return path


def test_fallback_when_ineligible(tiny_llama, fused_calls):
    """Dense weights and the PyTorch attention backend take the per-op path, and each says why;
    with `cpu_fused_step=False` the runner has no fused steps at all."""
    rng = random.Random(0)
    prompts = [[rng.randrange(320) for _ in range(4)]]
    cases = [("dense", "auto", "not a low-bit"), ("int4", "torch", "attention backend 'torch'")]
    for weights, attention, why in cases:
        r = Runner(tiny_llama, weights, fused=True, attention=attention)
        r.start(prompts)
        r.decode([1])
        ctx = _decode_ctx(r.runner)
        assert why in r.runner.fused_steps.why_not(ctx)
        assert r.runner.fused_steps.plan(ctx) is None
    r = Runner(tiny_llama, "int4", fused=False)
    r.start(prompts)
    r.decode([1])
    assert r.runner.fused_steps is None
    assert fused_calls == []


def _decode_ctx(runner: ModelRunner):
    req = Request("x", [1, 2], SamplingParams(max_tokens=1))
    req.num_computed_tokens = 1
    return runner.prepare([ScheduledChunk(req, 1, 1, [0])])[1]


def test_plan_follows_kv_caches(tiny_llama):
    r = Runner(tiny_llama, "int2", fused=True)
    steps, ctx = r.runner.fused_steps, _decode_ctx(r.runner)
    plan = steps.plan(ctx)
    assert plan is not None and steps.plan(ctx) is plan
    ctx.kv_caches = [tuple(t.clone() for t in kv) for kv in ctx.kv_caches]
    assert steps.plan(ctx) is not plan  # new cache tensors: a new plan


def test_bad_inputs_raise(tiny_llama):
    r = Runner(tiny_llama, "int4", fused=True)
    model, ctx = r.runner.model, _decode_ctx(r.runner)
    plan = r.runner.fused_steps.plan(ctx)
    with pytest.raises(ValueError, match="token id 320 out of range"):
        plan(torch.tensor([320]), ctx)
    ctx.positions = torch.tensor([model.rope.shape[0]])
    with pytest.raises(ValueError, match="beyond the rotary cache"):
        plan(torch.tensor([1]), ctx)
    ctx.positions = torch.tensor([1])
    ctx.attn.context_lens = torch.tensor([BLOCK + 1], dtype=torch.int32)  # one block in the table
    with pytest.raises(ValueError, match="does not fit its block table"):
        plan(torch.tensor([1]), ctx)
    with pytest.raises(ValueError, match="input_ids must be"):
        plan(torch.tensor([1], dtype=torch.int32), ctx)


def test_profile_counts_phases(tiny_llama):
    r = Runner(tiny_llama, "int4", fused=True)
    model, ctx = r.runner.model, _decode_ctx(r.runner)
    plan = r.runner.fused_steps.plan(ctx)
    cpu_step.profile()
    plan(torch.tensor([1]), ctx)
    prof = cpu_step.profile()
    assert set(prof) == set(cpu_step.PHASES) and all(prof[p] > 0 for p in ("qkv", "o", "gate_up", "down"))
    assert all(v == 0 for v in cpu_step.profile().values())  # read and reset
