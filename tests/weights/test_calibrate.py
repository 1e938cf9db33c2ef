"""GPTQ and AWQ (weights/calibrate.py) against round-to-nearest and a float64 reference, and the
calibration forward (calibration.py) against transformers."""
import dataclasses

import pytest
import torch

from bitfold.weights import calibrate as cal
from bitfold.weights.lowbit import LowBitSpec, quantize_rtn


def _correlated(T: int, K: int, seed: int) -> torch.Tensor:
    """Inputs with correlated channels and a few loud ones, as transformer activations have."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(K, K, generator=g) / K**0.5 + torch.eye(K)
    x = torch.randn(T, K, generator=g) @ mix
    return x * (1 + 4 * (torch.rand(K, generator=g) < 0.05))


def _layer(N: int, K: int, T: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed + 100)
    w = torch.randn(N, K, generator=g) * 0.05
    x = _correlated(T, K, seed)
    H = torch.zeros(K, K, dtype=torch.float64)
    cal.hessian_add(H, x)
    return w, x, H


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_beats_rtn_on_output_error(bits):
    w, x, H = _layer(64, 256, 1024, seed=bits)
    spec = LowBitSpec(bits, 64)
    q, s, m, loss = cal.gptq_quantize(w, H, spec)
    wq = cal.dequantize_codes(q, s, m, spec)
    wr = cal.dequantize_codes(*quantize_rtn(w, spec), spec)
    gptq_err = (x @ w.t() - x @ wq.t()).pow(2).sum()
    rtn_err = (x @ w.t() - x @ wr.t()).pow(2).sum()
    assert gptq_err < 0.8 * rtn_err, (bits, float(gptq_err), float(rtn_err))
    assert q.dtype == torch.uint8 and int(q.max()) <= 2**bits - 1
    assert s.dtype == m.dtype == torch.float16 and s.shape == (64, 4)
    # the loss GPTQ accumulates predicts the output error it reached (up to the dampening)
    assert 0.2 < loss / (float(gptq_err) / 2) < 5


def _obs_reference(w: torch.Tensor, H: torch.Tensor, s: torch.Tensor, m: torch.Tensor, spec: LowBitSpec,
                   damp: float) -> torch.Tensor:
    """GPTQ's update written out in float64 as the paper's eq. (2)-(3): round column k, update
    the rest by -e/[H_F^-1]_kk * [H_F^-1]_{k,F}, then drop k from the inverse by one step of
    Gaussian elimination (no Cholesky, no blocks)."""
    W, H = w.double().clone(), H.double().clone()
    H.diagonal().add_(damp * H.diagonal().mean())
    Hinv = torch.linalg.inv(H)
    N, K = W.shape
    group = spec.group_size(K)
    codes = torch.zeros(N, K, dtype=torch.uint8)
    for k in range(K):
        sg, mg = s[:, k // group].double(), m[:, k // group].double()
        q = ((W[:, k] - mg) / sg).round().clamp(0, 2**spec.bits - 1)
        codes[:, k] = q.to(torch.uint8)
        e = (W[:, k] - (q * sg + mg)) / Hinv[0, 0]
        W[:, k:] -= e[:, None] * Hinv[0][None, :]
        Hinv = Hinv[1:, 1:] - Hinv[1:, :1] @ Hinv[:1, 1:] / Hinv[0, 0]
    return codes


def test_gptq_matches_float64_obs_reference():
    w, _, H = _layer(8, 32, 256, seed=7)
    spec = LowBitSpec(3, 16)
    q, s, m, _ = cal.gptq_quantize(w, H, spec, block=16, static_groups=True, dtype=torch.float64)
    ref = _obs_reference(w, H, s, m, spec, cal.GPTQ_DAMP)
    assert torch.equal(q, ref)


def test_gptq_lazy_blocks_do_not_change_the_result():
    w, _, H = _layer(16, 256, 512, seed=3)
    spec = LowBitSpec(4, 32)
    a = cal.gptq_quantize(w, H, spec, block=32, dtype=torch.float64)
    b = cal.gptq_quantize(w, H, spec, block=128, dtype=torch.float64)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])


def test_gptq_dead_columns_and_act_order():
    w, x, H = _layer(32, 128, 512, seed=5)
    H[100:, :] = 0  # inputs 100.. never active (like the padding of a layer's last group)
    H[:, 100:] = 0
    spec = LowBitSpec(3, 32)
    for act_order in (False, True):
        q, s, m, _ = cal.gptq_quantize(w, H, spec, act_order=act_order)
        wq = cal.dequantize_codes(q, s, m, spec)
        wr = cal.dequantize_codes(*quantize_rtn(w, spec), spec)
        assert cal.output_error(w, wq, H) < cal.output_error(w, wr, H)
        assert torch.isfinite(wq).all()


def test_gptq_int8_per_channel():
    w, x, H = _layer(32, 128, 512, seed=9)
    spec = LowBitSpec(8, 0, symmetric=True)
    q, s, m, _ = cal.gptq_quantize(w, H, spec)
    assert torch.equal(m.float(), -128 * s.float())  # still the symmetric format's implied min
    wq = cal.dequantize_codes(q, s, m, spec)
    wr = cal.dequantize_codes(*quantize_rtn(w, spec), spec)
    assert cal.output_error(w, wq, H) < cal.output_error(w, wr, H)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_awq_never_worse_than_rtn_on_its_objective(bits):
    w, x, _ = _layer(48, 200, 512, seed=11 + bits)  # 200 inputs: padded to whole groups inside
    spec = LowBitSpec(bits, 64)
    s, info = cal.awq_scales(w, x, x.abs().mean(0), spec)
    assert info["error"] <= info["rtn_error"]
    assert s.shape == (200,) and (s > 0).all()
    # the returned scales reproduce the reported error when applied as documented
    wq = cal.dequantize_codes(*quantize_rtn(torch.nn.functional.pad(w * s, (0, 56)), spec), spec)[:, :200] / s
    err = float((x @ w.t() - x @ wq.t()).pow(2).sum())
    assert err == pytest.approx(info["error"], rel=1e-4)
    if info["alpha"] == 0:
        assert torch.allclose(s, torch.ones_like(s))


def test_unsupported_formats():
    assert cal.supports(LowBitSpec(2, 64, ternary=True)) is not None
    assert cal.supports(LowBitSpec(1, 64)) is not None
    assert cal.supports(LowBitSpec(3, 128)) is None


@pytest.mark.parametrize("kind,overrides", [("qwen2", {"num_key_value_heads": 1}), ("llama", {}),
                                            ("qwen3", {"head_dim": 32})])
def test_calibration_forward_matches_transformers(kind, overrides, tmp_path):
    from bitfold.calibration import LayerRunner
    from bitfold.loader import open_model
    from bitfold.models import MODELS
    from tests.helpers import write_tiny_hf_model

    hf = write_tiny_hf_model(kind, tmp_path, **overrides)
    src = open_model(str(tmp_path))
    cfg = dataclasses.replace(src.config, **MODELS.get(src.config.architecture).config_overrides)
    weights = dict(src.weights())
    L = 11
    ids = torch.randint(0, 320, (2, L), generator=torch.Generator().manual_seed(0))
    runner = LayerRunner(cfg, weights, L)
    with torch.no_grad():
        h = weights["model.embed_tokens.weight"][ids]
        for i in range(src.config.num_layers):
            h = runner.forward(i, h, lambda kind, x, w: w)
        ref = hf(ids, output_hidden_states=True).hidden_states[-1]  # after the final norm
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + src.config.rms_norm_eps) * weights["model.norm.weight"]
    assert torch.allclose(h, ref, atol=1e-4, rtol=1e-4)


def test_awq_fold_keeps_the_float_layer(tmp_path):
    """AWQ's folds (RMSNorm weights, v rows + bias for o under GQA, up rows + bias for down)
    leave each layer's float function unchanged, whatever the scales."""
    from bitfold.calibration import LayerRunner, awq_fold
    from bitfold.loader import open_model
    from tests.helpers import write_tiny_hf_model

    write_tiny_hf_model("qwen2", tmp_path, mlp_bias=True)  # q/k/v biases, 4 query heads on 2 KV heads
    src = open_model(str(tmp_path))
    cfg = src.config
    weights = dict(src.weights())
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 9, cfg.hidden_size, generator=g)
    nh, kvh, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    s_o = torch.rand(kvh, 1, d, generator=g).add(0.5).expand(kvh, nh // kvh, d).reshape(-1)
    scales = {"qkv": torch.rand(cfg.hidden_size, generator=g) + 0.5, "o": s_o,
              "gate_up": torch.rand(cfg.hidden_size, generator=g) + 0.5,
              "down": torch.rand(cfg.intermediate_size, generator=g) + 0.5}
    plain = LayerRunner(cfg, weights, 9)
    folded = LayerRunner(cfg, {**weights, **awq_fold(plain, 1, scales)}, 9)
    same = lambda kind, x, w: w  # noqa: E731
    with torch.no_grad():
        assert torch.allclose(plain.forward(1, h, same), folded.forward(1, h, same), atol=1e-5, rtol=1e-5)
