"""Calibration for `bitfold quantize --method awq|gptq`: text from the eval corpus, run through
the model one decoder layer at a time in float32, and the inputs of every linear layer handed
to `weights/calibrate.py`'s algorithms.

Calibration text: `--calib-samples` sequences of `--calib-len` tokens (default 64 x 512) cut
from the Wikipedia summaries (`eval/corpora.py`) in a seeded order, after holding out the first
tenth of the documents in the order `bitfold eval ppl --seed 0` reads them (its windows come
from the first ~100 of ~10,000), so a model is never calibrated on the text it is scored on.

The forward here is a plain float32 Llama/Qwen decoder over [S, L] token blocks (causal SDPA,
GQA, HF rotary, q/k/v biases, Qwen3's q/k norms); tests check it against transformers. Each
layer's linears are visited in execution order, q|k|v and gate|up merged as bitfold runs them:
  qkv (input: attn RMSNorm output) -> o (attention output) -> gate_up (mlp RMSNorm output)
  -> down (silu(gate) * up)
- GPTQ is sequential (the paper's scheme): each linear's Hessian comes from inputs computed with
  every earlier linear already quantized (earlier layers and the earlier linears of this layer),
  so later layers correct what earlier rounding did; the layer's output with quantized weights
  is the next layer's input.
- AWQ searches each linear's scales on the float layer's inputs (the paper's scheme) and folds
  them where that is exact, so the float model's function is unchanged before rounding:
  qkv and gate_up: 1/s into the preceding RMSNorm's weight; o: 1/s into the v rows (and v bias)
  of qkv, one scale per channel of a KV head shared by the query heads of its GQA group;
  down: 1/s into the up rows (and up bias) of gate_up. Every linear of a layer is scaled, none
  needs the runtime to divide its input.
The output layer (lm_head, or the tied embedding's quantized copy) stays round-to-nearest, as in
the GPTQ and AWQ papers' released code.
"""
from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from bitfold.errors import BitfoldError
from bitfold.models.format_plan import MERGED_LINEARS
from bitfold.progress import progress
from bitfold.weights import calibrate as cal
from bitfold.weights.lowbit import LowBitSpec, lowbit_spec, quantize_rtn

METHODS = ("rtn", "awq", "gptq")
HOLDOUT = 0.1  # fraction of the corpus's documents (seed-0 order) never used for calibration
AWQ_TOKENS = 2048  # tokens of each linear's inputs kept for AWQ's grid search (its mean |x| uses all)
#                   and for the output errors printed per layer
SENSITIVITY_TOKENS = 2048  # tokens (whole sequences) of each linear's inputs measured for mixed precision
GAIN_TOKENS = 512  # tokens (whole sequences) on which each layer's noise is carried to the last layer
_LINEARS = MERGED_LINEARS  # merged linear -> its checkpoint shards, in row order


@dataclass(frozen=True)
class CalibConfig:
    method: str = "gptq"  # "awq" | "gptq" | "rtn" (the text only chooses a mixed-precision plan)
    samples: int = 64  # calibration sequences
    length: int = 512  # tokens per sequence
    seed: int = 0
    corpus: str = "wiki"
    act_order: bool = False  # GPTQ: columns by decreasing H_kk (with static groups)
    damp: float = cal.GPTQ_DAMP

    def validate(self) -> None:
        if self.method not in METHODS:  # rtn: the text decides a mixed-precision plan, rounding stays data-free
            raise BitfoldError(f"--method {self.method!r}: expected one of {', '.join(METHODS)}")
        if self.samples <= 0:
            raise BitfoldError(f"--calib-samples must be positive, got {self.samples}")
        if self.length <= 1:
            raise BitfoldError(f"--calib-len must be at least 2 tokens, got {self.length}")


@dataclass
class CalibResult:
    codes: dict = field(default_factory=dict)  # checkpoint weight name -> (q, scale, min)
    dense: dict = field(default_factory=dict)  # checkpoint tensor name -> replaced float tensor (AWQ folds)
    layers: list = field(default_factory=list)  # per decoder layer: {"seconds", per-linear stats}
    seconds: float = 0.0


def calibration_tokens(tokenizer, docs: list[str], samples: int, length: int, seed: int) -> torch.Tensor:
    """int64 [samples, length]: windows of the held-in documents (see the module docstring)."""
    from bitfold.eval.ppl import sample_windows

    order = list(range(len(docs)))
    random.Random(0).shuffle(order)  # bitfold eval ppl's default order; its head is held out
    held_in = [docs[i] for i in sorted(order[int(len(docs) * HOLDOUT):])]
    return torch.tensor(sample_windows(tokenizer, held_in, samples, length, seed + 1), dtype=torch.long)


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [S, heads, L, D], cos/sin [L, D/2]: HF's rotate_half rotary."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class LayerRunner:
    """Float32 forward of one decoder layer over hidden states [S, L, hidden], calling
    `visit(kind, x, weight) -> weight` with each merged linear's input x [S*L, K] and float weight
    [N, K] before using it; what `visit` returns is the weight the forward continues with."""

    def __init__(self, cfg, weights: dict, length: int):
        from bitfold.layers.rotary import cos_sin_cache

        self.cfg, self.w = cfg, weights
        cs = cos_sin_cache(cfg.head_dim, length, cfg.rope_theta, cfg.rope_scaling)
        self.cos, self.sin = cs.chunk(2, dim=-1)

    def linear_weight(self, i: int, kind: str) -> torch.Tensor:
        return torch.cat([self.w[f"model.layers.{i}.{n}.weight"] for n in _LINEARS[kind]])

    def linear_bias(self, i: int, kind: str) -> torch.Tensor | None:
        names = [f"model.layers.{i}.{n}.bias" for n in _LINEARS[kind]]
        return torch.cat([self.w[n] for n in names]) if names[0] in self.w else None

    def forward(self, i: int, h: torch.Tensor, visit, stop: str | None = None) -> torch.Tensor:
        """h [S, L, hidden] -> the layer's output [S, L, hidden]; with `stop` ("o" or "down") the
        output of that linear instead (what the attention or the MLP adds to the residual)."""
        cfg, p = self.cfg, f"model.layers.{i}."
        S, L, _ = h.shape
        nh, kvh, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

        def linear(kind: str, x: torch.Tensor) -> torch.Tensor:
            x = x.reshape(S * L, -1)
            w = visit(kind, x, self.linear_weight(i, kind))
            b = self.linear_bias(i, kind)
            return F.linear(x, w, b).view(S, L, -1)

        x = _rms(h, self.w[p + "input_layernorm.weight"], cfg.rms_norm_eps)
        q, k, v = linear("qkv", x).split([nh * d, kvh * d, kvh * d], dim=-1)
        q, k, v = (t.reshape(S, L, n, d).transpose(1, 2) for t, n in ((q, nh), (k, kvh), (v, kvh)))
        if cfg.qk_norm:
            q = _rms(q, self.w[p + "self_attn.q_norm.weight"], cfg.rms_norm_eps)
            k = _rms(k, self.w[p + "self_attn.k_norm.weight"], cfg.rms_norm_eps)
        q, k = _rotary(q, self.cos[:L], self.sin[:L]), _rotary(k, self.cos[:L], self.sin[:L])
        mask = None
        if cfg.sliding_window and cfg.sliding_window < L:  # causal and within the window
            pos = torch.arange(L)
            mask = (pos[None, :] <= pos[:, None]) & (pos[:, None] - pos[None, :] < cfg.sliding_window)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=kvh != nh)
        attn = linear("o", a.transpose(1, 2).reshape(S, L, nh * d))
        if stop == "o":
            return attn
        h = h + attn
        x = _rms(h, self.w[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
        gate, up = linear("gate_up", x).chunk(2, dim=-1)
        mlp = linear("down", F.silu(gate) * up)
        return mlp if stop == "down" else h + mlp


@dataclass
class CalibData:
    """Calibration text and the float model it runs through, loaded once for the mixed-precision
    measurement and the calibrated rounding."""

    tokens: torch.Tensor  # int64 [samples, length]
    runner: LayerRunner  # holds every float tensor of the checkpoint by name (runner.w)


def load_calibration(source, cfg, calib: CalibConfig) -> CalibData:
    """`calib`'s token windows (see the module docstring) and `source`'s weights as float32."""
    from bitfold.eval.corpora import load_documents
    from bitfold.weights.packed import as_float

    calib.validate()
    tokens = calibration_tokens(source.load_tokenizer(), load_documents(calib.corpus), calib.samples, calib.length,
                                calib.seed)
    if int(tokens.max()) >= cfg.vocab_size:
        raise BitfoldError(f"{source.path}: its tokenizer gives ids up to {int(tokens.max())}, beyond the model's "
                           f"{cfg.vocab_size} embeddings")
    weights = {n: as_float(t, t.shape[-1]).float() for n, t in source.weights()}
    return CalibData(tokens, LayerRunner(cfg, weights, calib.length))


def measure_sensitivity(data: CalibData, base: LowBitSpec, upgrade: LowBitSpec, log=None) -> list:
    """The noise that rounding each merged linear alone to nearest in `base` and in `upgrade`
    adds to the residual stream, as it arrives at the last layer, relative to the stream there
    (allocation.LinearError; the method and why: allocation.py). On the first
    ceil(SENSITIVITY_TOKENS / length) calibration sequences of the float model, layer by layer,
    nothing rounded in between (the plan is fixed before GPTQ rounds layer 0): o and down add
    their output to the residual, their noise is x (W - Q)^T; q|k|v's reaches it through
    attention and o, gate|up's through SiLU-and-multiply and down (one partial layer forward
    each per format). How the later layers carry a layer's noise to the end, its gain, is
    measured on the first ceil(GAIN_TOKENS / length) sequences: the layer's output with all its
    linears rounded in `base` runs through the remaining float layers beside the clean stream."""
    from bitfold.allocation import LinearError

    log = log or sys.stderr
    runner, cfg = data.runner, data.runner.cfg
    S, L = data.tokens.shape
    n = min(S, -(-SENSITIVITY_TOKENS // L))
    m = min(n, -(-GAIN_TOKENS // L))
    out: list = []
    noisy: list[torch.Tensor] = []  # per layer: its rounded output [m, L, hidden], carried through the later layers
    added: list[float] = []  # per layer: the energy of the noise it added there

    def rounded(w: torch.Tensor, spec: LowBitSpec) -> torch.Tensor:
        return cal.dequantize_codes(*quantize_rtn(_pad(w, spec), spec), spec)[:, :w.shape[1]]

    def energy(t: torch.Tensor) -> float:  # per token: t is [..., features]
        return float(t.double().pow(2).sum()) / (t.numel() // t.shape[-1])

    def same(kind: str, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return w

    with torch.inference_mode():
        h = runner.w["model.embed_tokens.weight"][data.tokens[:n]]
        print(f"[bitfold] mixed precision: the noise rounding each linear alone to {base.name} / {upgrade.name} adds "
              f"to the residual stream (energy per token), on {n} x {L} tokens of the float model; its gain to the "
              f"last layer on {m} x {L}", file=log, flush=True)
        with progress(cfg.num_layers, "sensitivity", unit="layer", unit_scale=False) as bar:
            for i in range(cfg.num_layers):
                seen: dict = {}

                def keep(kind: str, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
                    seen[kind] = (x, w)
                    return w

                h_out = runner.forward(i, h, keep)
                attn = runner.forward(i, h, same, stop="o")
                ref = {"o": attn, "down": h_out - h - attn}  # what attention and the MLP add to the residual
                errors, wq_base = [], {}
                for kind, into in (("qkv", "o"), ("o", "o"), ("gate_up", "down"), ("down", "down")):
                    x, w = seen[kind]
                    noise = []
                    for spec in (base, upgrade):
                        wq = rounded(w, spec)
                        wq_base.setdefault(kind, wq)
                        if kind == into:  # its output is what it adds
                            delta = x @ (w - wq).t()
                        else:
                            delta = runner.forward(i, h, lambda k, x_, w_: wq if k == kind else w_, stop=into) - ref[into]
                        noise.append(energy(delta))
                    errors.append(LinearError(i, kind, w.shape[0], w.shape[1], *noise))
                if noisy:  # the earlier layers' noisy streams, one batch through this layer
                    carried = runner.forward(i, torch.cat(noisy), same).split(m)
                    noisy = list(carried)
                noisy.append(runner.forward(i, h[:m], lambda k, x_, w_: wq_base[k]))
                added.append(energy(noisy[-1] - h_out[:m]))
                h = h_out
                out += errors
                bar.update(1)
                print(f"[bitfold] sensitivity layer {i + 1}/{cfg.num_layers}: "
                      + "  ".join(f"{e.kind} {e.base_error:.2e}/{e.upgrade_error:.2e}" for e in errors)
                      + f"  (residual {energy(h):.2e})", file=log, flush=True)
        final = max(energy(h), 1e-30)  # the last layer's output, which the final RMSNorm reads
        gain = [energy(t - h[:m]) / max(a, 1e-30) for t, a in zip(noisy, added)]
    print("[bitfold] noise gain from each layer to the last: "
          + " ".join(f"{i}:{g:.2f}" for i, g in enumerate(gain)), file=log, flush=True)
    return [replace(e, base_error=e.base_error * gain[e.layer] / final,
                    upgrade_error=e.upgrade_error * gain[e.layer] / final) for e in out]


def calibrate(data: CalibData, plan, calib: CalibConfig, log=None) -> CalibResult:
    """Codes of every decoder-layer linear weight by `calib.method` (awq | gptq), each merged
    linear in its format of `plan` (a models.format_plan.FormatPlan, or one low-bit format name),
    plus the float tensors AWQ's folds change."""
    from bitfold.models.format_plan import FormatPlan

    t0 = time.perf_counter()
    log = log or sys.stderr
    calib.validate()
    if calib.method == "rtn":
        raise BitfoldError("calibrate: method rtn rounds without calibration (quantize_rtn)")
    plan = FormatPlan.of(plan)
    runner, tokens, cfg = data.runner, data.tokens, data.runner.cfg
    for name in sorted({plan.format(i, k) for i in range(cfg.num_layers) for k in _LINEARS}):
        why = "not a low-bit format" if lowbit_spec(name) is None else cal.supports(lowbit_spec(name))
        if why is not None:
            raise BitfoldError(f"--method {calib.method} cannot produce {name}: {why}")
    specs = [{k: lowbit_spec(plan.format(i, k)) for k in _LINEARS} for i in range(cfg.num_layers)]
    result = CalibResult()
    with torch.inference_mode():
        h = runner.w["model.embed_tokens.weight"][tokens]  # [S, L, hidden]
        print(f"[bitfold] {calib.method} calibration: {calib.samples} x {calib.length} tokens of {calib.corpus} "
              f"(seed {calib.seed}), {cfg.num_layers} layers", file=log, flush=True)
        with progress(cfg.num_layers, f"{calib.method} {plan}", unit="layer", unit_scale=False) as bar:
            for i in range(cfg.num_layers):
                t = time.perf_counter()
                stats = (_gptq_layer if calib.method == "gptq" else _awq_layer)(runner, i, h, specs[i], calib, result)
                h = stats.pop("output")
                stats["seconds"] = time.perf_counter() - t
                result.layers.append(stats)
                bar.update(1)
                print(f"[bitfold] layer {i + 1}/{cfg.num_layers}: {stats['seconds']:.1f}s  "
                      + "  ".join(f"{k}{'' if specs[i][k].name == plan.default else f'[{specs[i][k].name}]'} "
                                  f"{v['error_vs_rtn']:.3f}x rtn" for k, v in stats.items() if isinstance(v, dict)),
                      file=log, flush=True)
    result.seconds = time.perf_counter() - t0
    return result


def _pad(w: torch.Tensor, spec: LowBitSpec) -> torch.Tensor:
    return F.pad(w, (0, spec.padded(w.shape[1]) - w.shape[1]))


def _store(result: CalibResult, runner: LayerRunner, i: int, kind: str, codes) -> None:
    """Split a merged linear's codes back into its checkpoint shards."""
    q, s, m = codes
    row = 0
    for n in _LINEARS[kind]:
        rows = runner.w[f"model.layers.{i}.{n}.weight"].shape[0]
        result.codes[f"model.layers.{i}.{n}.weight"] = (q[row:row + rows], s[row:row + rows], m[row:row + rows])
        row += rows


def _gptq_layer(runner: LayerRunner, i: int, h: torch.Tensor, specs: dict, calib: CalibConfig,
                result: CalibResult) -> dict:
    """specs: {kind: LowBitSpec} of this layer's merged linears."""
    stats: dict = {}

    def visit(kind: str, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        K, spec = w.shape[1], specs[kind]
        wp = _pad(w, spec)
        H = torch.zeros(wp.shape[1], wp.shape[1], dtype=torch.float64)
        cal.hessian_add(H[:K, :K], x)
        q, s, m, loss = cal.gptq_quantize(wp, H, spec, damp=calib.damp, act_order=calib.act_order)
        _store(result, runner, i, kind, (q, s, m))
        wq = cal.dequantize_codes(q, s, m, spec)
        # the printed error vs rtn: on a sample of tokens (through H it cost N K^2 per linear)
        xs = x[::max(1, x.shape[0] // AWQ_TOKENS)][:AWQ_TOKENS]
        ref = xs @ w.t()
        err = float((ref - xs @ wq[:, :K].t()).pow(2).sum())
        rtn = float((ref - xs @ cal.dequantize_codes(*quantize_rtn(wp, spec), spec)[:, :K].t()).pow(2).sum())
        stats[kind] = {"error": err, "rtn_error": rtn, "error_vs_rtn": err / max(rtn, 1e-30), "gptq_loss": loss}
        return wq[:, :K]

    stats["output"] = runner.forward(i, h, visit)
    return stats


def _awq_layer(runner: LayerRunner, i: int, h: torch.Tensor, specs: dict, calib: CalibConfig,
               result: CalibResult) -> dict:
    """specs: {kind: LowBitSpec} of this layer's merged linears."""
    cfg, p = runner.cfg, f"model.layers.{i}."
    seen: dict = {}

    def visit(kind: str, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        step = max(1, x.shape[0] // AWQ_TOKENS)
        seen[kind] = (x[::step][:AWQ_TOKENS].clone(), x.abs().mean(0))
        return weight

    out = runner.forward(i, h, visit)  # float: AWQ searches every scale on the float layer's inputs
    stats: dict = {"output": out}
    nh, kvh, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    scales = {}
    for kind in _LINEARS:
        x, mean = seen[kind]
        if kind == "o":  # one scale per v channel: the query heads of a GQA group share it
            mean = mean.view(kvh, nh // kvh, d).mean(1, keepdim=True).expand(kvh, nh // kvh, d).reshape(-1)
        s, info = cal.awq_scales(runner.linear_weight(i, kind), x, mean, specs[kind])
        scales[kind] = s
        stats[kind] = {**info, "error_vs_rtn": info["error"] / max(info["rtn_error"], 1e-30)}
    folded = awq_fold(runner, i, scales)
    for name, t in folded.items():
        if not name.endswith("_proj.weight"):  # norms and biases: float tensors of the checkpoint
            result.dense[name] = t
    for kind in _LINEARS:
        weight = torch.cat([folded[f"{p}{n}.weight"] for n in _LINEARS[kind]])
        _store(result, runner, i, kind, quantize_rtn(_pad(weight, specs[kind]), specs[kind]))
    return stats


def awq_fold(runner: LayerRunner, i: int, scales: dict) -> dict:
    """Layer i's float tensors with AWQ's scales {kind: s [K]} folded in, by checkpoint name:
    every linear weight's columns times s; the RMSNorm weights before qkv and gate_up divided
    by their s; the v rows (and bias) divided by o's s and the up rows (and bias) by down's s.
    The layer computes the same function with them (up to float rounding)."""
    cfg, w, p = runner.cfg, runner.w, f"model.layers.{i}."
    nh, kvh, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    out = {p + "input_layernorm.weight": w[p + "input_layernorm.weight"] / scales["qkv"],
           p + "post_attention_layernorm.weight": w[p + "post_attention_layernorm.weight"] / scales["gate_up"]}
    row_scales = {"self_attn.v_proj": scales["o"].view(kvh, nh // kvh, d)[:, 0].reshape(-1),
                  "mlp.up_proj": scales["down"]}
    for kind, names in _LINEARS.items():
        for n in names:
            t = w[f"{p}{n}.weight"] * scales[kind]
            if n in row_scales:
                t = t / row_scales[n][:, None]
                if f"{p}{n}.bias" in w:
                    out[f"{p}{n}.bias"] = w[f"{p}{n}.bias"] / row_scales[n]
            out[f"{p}{n}.weight"] = t
    return out
