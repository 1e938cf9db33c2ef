"""A CPU decode step's whole decoder stack in one C++ call (kernels/cpu/decode_step.cpp, issue #6).

The runner owns the choice (`EngineConfig.cpu_fused_step`, on by default): for every forward it
asks its `FusedSteps` for a plan (`plan(ctx)`), and runs the model's own forward when there is
none. A step can run fused when it is decode-only (one new token per sequence), on the CPU,
float32, every layer's Linear a low-bit LUT format (weights/lowbit.py) and the "cpu" attention
backend (dense float32 pages, fused KV write). Everything else takes the per-op path, which is
also this one's reference (tests/runner/test_cpu_step.py): the same C++ kernels called layer by
layer from Python. It lives on the runner side, not in the model, because it reads the runner's
state (KV pages, attention backend) and replaces the model's forward as a whole.

The plan is built once per model and set of KV-cache tensors: ctypes Structures holding the
address of every packed weight, scale, min, bias, norm weight and K/V page, mirrored from the
structs in decode_step.cpp. It keeps the model and caches referenced, so the addresses stay valid.
A step then looks its tokens' embedding rows up through the model's `Embedding` (a float table,
or rows dequantized from the codes a quantized checkpoint stores, layers/embedding.py), hands
the C++ those B rows as its table with token ids 0..B-1, sets the batch's fields and makes one
call.
"""
from __future__ import annotations

import ctypes

import torch

from bitfold.kernels.cpu_lib import available, load_cpu_library

_p, _i32, _f32 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_float


class LinearPlan(ctypes.Structure):
    _fields_ = [("packed", _p), ("scales", _p), ("mins", _p), ("bias", _p), ("in_features", _i32),
                ("in_padded", _i32), ("out_features", _i32), ("bits", _i32), ("group", _i32), ("reserved", _i32)]


class LayerPlan(ctypes.Structure):
    _fields_ = [("qkv", LinearPlan), ("o", LinearPlan), ("gate_up", LinearPlan), ("down", LinearPlan),
                ("attn_norm", _p), ("mlp_norm", _p), ("q_norm", _p), ("k_norm", _p), ("k_cache", _p), ("v_cache", _p)]


class StepArgs(ctypes.Structure):
    _fields_ = [("hidden", _i32), ("heads", _i32), ("kv_heads", _i32), ("head_dim", _i32), ("intermediate", _i32),
                ("vocab", _i32), ("sliding_window", _i32), ("rope_positions", _i32), ("num_blocks", _i32),
                ("block_size", _i32), ("eps", _f32), ("scale", _f32), ("embed", _p), ("rope", _p),
                ("final_norm", _p), ("batch", _i32), ("max_blocks", _i32), ("num_threads", _i32),
                ("reserved", _i32), ("input_ids", _p), ("positions", _p), ("slots", _p), ("block_tables", _p),
                ("context_lens", _p), ("out", _p)]


def _f32_cpu(t: torch.Tensor | None) -> bool:
    return t is None or (t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous())


def why_not_model(model) -> str | None:
    """Why this model's layers cannot run fused (None: they can). Checked once per plan."""
    from bitfold.weights.lowbit import LowBitFormat

    if not available():
        return "the C++ CPU kernels could not be built"
    norms = [model.norm]
    padded = None  # the step's scratch rows are laid out once: every layer pads its inputs alike
    for i, layer in enumerate(model.layers):
        att = layer.attn
        lins = (("qkv", att.qkv), ("o", att.o), ("gate_up", layer.mlp.gate_up), ("down", layer.mlp.down))
        for name, lin in lins:
            if hasattr(lin, "q6k_blocks"):  # weights/gguf.py's CPU Q6_K storage (weights/gguf.CPU_Q6K_NATIVE)
                return (f"layer {i} {name}: Q6_K blocks kept as the file's (weights/gguf.CPU_Q6K_NATIVE) run per-op; "
                        f"the fused step has no Q6_K case")
            if not isinstance(lin.fmt, LowBitFormat):
                return f"layer {i} {name}: weight format {lin.fmt.name!r} is not a low-bit LUT format"
            spec = lin.fmt.spec
            if spec.bits > 4 or spec.group == 0:  # the C++ step runs one LUT pass over groups
                return f"layer {i} {name}: {spec.name} is not a one-pass grouped LUT format"
            if lin.lut_packed.device.type != "cpu" or not _f32_cpu(lin.bias):
                return f"layer {i} {name}: not on the CPU in float32"
        pads = tuple(lin.in_padded for _, lin in lins)
        if padded is not None and pads != padded:
            return f"layer {i} pads its inputs differently from layer 0 (mixed groups)"
        padded = pads
        norms += [layer.attn_norm, layer.mlp_norm] + ([att.q_norm, att.k_norm] if att.q_norm is not None else [])
    if any(not _f32_cpu(n.weight) for n in norms) or not _f32_cpu(model.rope):
        return "norm or rotary tables are not contiguous CPU float32"
    if model.embed.dtype != torch.float32:
        return "the embedding does not give float32 rows"
    if len({n.eps for n in norms}) != 1:
        return "the RMSNorms do not share one eps"
    return None


class FusedDecodeStep:
    """The plan of one model over one set of KV caches; `__call__` runs a step."""

    def __init__(self, model, kv_caches: list[tuple[torch.Tensor, ...]]):
        cfg = model.cfg
        layers = model.layers
        self.kv_caches = list(kv_caches)
        # every tensor whose address the plan holds, so that none can be freed under it
        self._keep = [t for _, t in model.named_parameters()] + [t for _, t in model.named_buffers()]
        if len(self.kv_caches) != len(layers):
            raise ValueError(f"{len(self.kv_caches)} KV caches for {len(layers)} layers")
        k0 = self.kv_caches[0][0]
        num_blocks, block_size = k0.shape[0], k0.shape[1]
        self.layers = (LayerPlan * len(layers))()
        for plan, layer, kv in zip(self.layers, layers, self.kv_caches):
            k_cache, v_cache = kv
            want = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
            if tuple(k_cache.shape) != want or tuple(v_cache.shape) != want or not (_f32_cpu(k_cache) and _f32_cpu(v_cache)):
                raise ValueError(f"KV pages must be contiguous float32 {want}, got {tuple(k_cache.shape)}")
            att = layer.attn
            plan.qkv, plan.o = _linear(att.qkv), _linear(att.o)
            plan.gate_up, plan.down = _linear(layer.mlp.gate_up), _linear(layer.mlp.down)
            plan.attn_norm, plan.mlp_norm = layer.attn_norm.weight.data_ptr(), layer.mlp_norm.weight.data_ptr()
            if att.q_norm is not None:
                plan.q_norm, plan.k_norm = att.q_norm.weight.data_ptr(), att.k_norm.weight.data_ptr()
            plan.k_cache, plan.v_cache = k_cache.data_ptr(), v_cache.data_ptr()
        att0 = layers[0].attn
        self.embed, self.vocab = model.embed, model.embed.shape[0]
        self._row_ids = torch.arange(0)  # 0..B-1: token b reads row b of the step's gathered rows
        # `vocab` and `embed` are set per step: the C++ reads its table only at rows input_ids
        self.args = StepArgs(
            hidden=cfg.hidden_size, heads=att0.h, kv_heads=att0.kvh, head_dim=att0.d,
            intermediate=cfg.intermediate_size, vocab=0, sliding_window=att0.window or 0,
            rope_positions=model.rope.shape[0], num_blocks=num_blocks, block_size=block_size, eps=model.norm.eps,
            scale=att0.scale, embed=None, rope=model.rope.data_ptr(), final_norm=model.norm.weight.data_ptr())
        self._fn = load_cpu_library().bitfold_decode_layers
        self._err = load_cpu_library().bitfold_decode_error
        self._args_ref = ctypes.byref(self.args)

    def matches(self, kv_caches) -> bool:
        mine = self.kv_caches
        return len(kv_caches) == len(mine) and all(a is b for a, b in zip(kv_caches, mine))

    def __call__(self, input_ids: torch.Tensor, ctx) -> torch.Tensor:
        """input_ids int64 [B] (one new token per sequence) -> final normed hidden states float32
        [B, hidden]; writes each layer's new K/V into its pages at ctx.attn.slot_mapping."""
        m = ctx.attn
        B = input_ids.shape[0]
        tables = m.block_tables
        _check(input_ids, torch.int64, (B,), "input_ids")
        _check(ctx.positions, torch.int64, (B,), "positions")
        _check(m.slot_mapping, torch.int64, (B,), "slot_mapping")
        _check(m.context_lens, torch.int32, (B,), "context_lens")
        _check(tables, torch.int32, (B, tables.shape[-1]), "block_tables")
        out = torch.empty(B, self.args.hidden, dtype=torch.float32)
        if B == 0:
            return out
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.vocab:  # before the lookup: a LUT table's padding rows would read as zeros
            raise ValueError(f"fused CPU decode step: token id {hi if hi >= self.vocab else lo} out of range "
                             f"[0, {self.vocab})")
        rows = self.embed(input_ids).contiguous()  # [B, hidden] float32 (why_not_model checked the dtype)
        if self._row_ids.shape[0] < B:
            self._row_ids = torch.arange(B)
        a = self.args
        a.batch, a.max_blocks, a.num_threads = B, tables.shape[1], torch.get_num_threads()
        a.vocab, a.embed = B, rows.data_ptr()
        a.input_ids, a.positions, a.slots = self._row_ids.data_ptr(), ctx.positions.data_ptr(), m.slot_mapping.data_ptr()
        a.block_tables, a.context_lens, a.out = tables.data_ptr(), m.context_lens.data_ptr(), out.data_ptr()
        if self._fn(self.layers, len(self.layers), self._args_ref) != 0:
            raise ValueError(f"fused CPU decode step: {self._err().decode()}")
        return out


def _linear(lin) -> LinearPlan:
    spec = lin.fmt.spec
    return LinearPlan(packed=lin.lut_packed.data_ptr(), scales=lin.lut_scales.data_ptr(),
                      mins=lin.lut_mins.data_ptr(), bias=lin.bias.data_ptr() if lin.bias is not None else None,
                      in_features=lin.in_features, in_padded=lin.in_padded, out_features=lin.out_features,
                      bits=spec.bits, group=spec.group)


def _check(t: torch.Tensor, dtype: torch.dtype, shape: tuple, name: str) -> None:
    if t.dtype != dtype or t.device.type != "cpu" or tuple(t.shape) != shape or not t.is_contiguous():
        raise ValueError(f"fused CPU decode step: {name} must be contiguous CPU {dtype} of shape {shape}, "
                         f"got {t.dtype} {tuple(t.shape)} on {t.device}")


PHASES = ("qkv", "o", "gate_up", "down", "attention", "other")  # decode_step.cpp's enum Phase


def profile() -> dict[str, float]:
    """Seconds each phase of the fused steps run on this thread took since the last call
    (GEMVs by layer, attention with its KV write, everything else), then reset."""
    out = (ctypes.c_double * len(PHASES))()
    load_cpu_library().bitfold_decode_profile(out)
    return dict(zip(PHASES, out))


class FusedSteps:
    """The fused steps of one model (built once its weights are loaded): whether its layers can
    run fused is checked once, a plan is built per set of KV caches."""

    def __init__(self, model):
        self.model = model
        self._why_model: str | None = None
        self._checked = False
        self._plan: FusedDecodeStep | None = None

    def why_not(self, ctx) -> str | None:
        """Why this step takes the per-op path (None: it can run fused)."""
        if not ctx.attn.decode_only:
            return "not a decode-only step"
        if ctx.backend.name != "cpu" or not getattr(ctx.backend.ops, "fuses_kv_write", False):
            return f"attention backend {ctx.backend.name!r} is not the C++ CPU one"
        if not self._checked:
            self._why_model, self._checked = why_not_model(self.model), True
        return self._why_model

    def plan(self, ctx) -> FusedDecodeStep | None:
        """The fused step for this step's KV caches (built or rebuilt as needed), or None when
        the step must take the per-op path (`why_not` says why)."""
        if self.why_not(ctx) is not None:
            return None
        if self._plan is None or not self._plan.matches(ctx.kv_caches):
            self._plan = FusedDecodeStep(self.model, ctx.kv_caches)
        return self._plan
