"""Group-wise low-bit weights: on the CPU 1-4 bits multiplied by lookup tables (T-MAC, arXiv
2407.00088), 5, 6 and 8 bits as several such lookups; on a GPU every width through the Triton
dequantize-and-multiply kernels of kernels/qmatmul.py (codes in 4/2/1-bit planes).

w[n, k] ~= scale[n, g] * q[n, k] + min[n, g], q in [0, 2^bits), g = k // group; scale and min
are fp16. Registered names: int1..int6, int8 and ternary, each with -g16/-g32/-g64/-g128 (the
bare name means -g64), and `int8` = `int8-ch`: one symmetric scale per output row (min =
-128 * scale, not stored). At 64 weights per group the scale+min cost 0.5 bit per weight:
int4-g64 is 4.5 bits/weight like llama.cpp's Q4_0, int2-g64 2.5 like Q2_K's 2.625.

Quantization belongs to the layer: `load` quantizes each checkpoint shard as it arrives (round
to nearest with searched ranges and no calibration data, `quantize_rtn`), `load_codes` takes already-quantized codes (bitfold quantize's
checkpoints, converted GGUF blocks), and once every row is in the codes are packed into the
kernel's bit-plane layout (`bitfold.kernels.lut_gemm.pack_lut`). Only the packed form is kept.
The LUT kernel reads 1-4 bit planes; wider codes are split into 4-bit slices, q = sum_c 16^c
q_c, each a LUT pass with scale 16^c * scale (exact in fp16) and the min on the first pass only.
On a GPU the codes are packed once into `kernels.qmatmul`'s planes (`QLayout`: the spec's planes,
group, zero point 2^(bits-1) and no stored min for symmetric specs), kept with the fp16 scales
and mins as the layer's buffers `q_plane0` (`q_plane1`), `q_scales` (`q_mins`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bitfold.kernels import lut_gemm as lut
from bitfold.kernels import qmatmul as qm
from bitfold.weights.base import WEIGHT_FORMATS, WeightFormat

log = logging.getLogger("bitfold")

GROUPS = (16, 32, 64, 128)
DEFAULT_GROUP = 64
BITS = (1, 2, 3, 4, 5, 6, 8)
LUT_BITS = 4  # the most bits one LUT pass reads
CHANNEL_PAD = 32  # a per-channel layer pads its inputs to a multiple of this


@dataclass(frozen=True)
class LowBitSpec:
    bits: int  # bit planes stored (ternary: 2)
    group: int  # weights per scale; 0: one group per output row (per channel)
    ternary: bool = False  # q in {0, 1, 2} meaning {-1, 0, +1} * scale
    symmetric: bool = False  # min = -2^(bits-1) * scale: codes are two's-complement values + 2^(bits-1)

    @property
    def name(self) -> str:
        kind = "ternary" if self.ternary else f"int{self.bits}"
        return f"{kind}-ch" if self.group == 0 else f"{kind}-g{self.group}"

    @property
    def bits_per_weight(self) -> float:
        if self.group == 0:
            return float(self.bits)  # one scale per row: nothing per weight
        return self.bits + (16 if self.symmetric else 32) / self.group  # + fp16 scale (and min) per group

    @property
    def zero(self) -> int:
        """The code of weight 0 of a symmetric spec (its min is -zero * scale); 0 otherwise."""
        return 1 << (self.bits - 1) if self.symmetric else 0

    def padded(self, cols: int) -> int:
        """Inputs padded to whole groups (zeros) and to a multiple of 32 (the GPU layout's 1-bit
        plane word, so both devices store the same codes), as the layer stores them."""
        unit = max(self.group, CHANNEL_PAD)
        return -(-cols // unit) * unit

    def group_size(self, padded_cols: int) -> int:
        """Weights per scale for a row of `padded_cols` stored inputs."""
        return self.group or padded_cols


# Range search (data-free, after llama.cpp's k-quants `make_qkx2_quants`): candidate grids for a
# group [lo, hi] step (hi - lo) / (levels + stretch) and round from lo + offset steps; each
# candidate's codes get the least-squares scale and min, the lowest squared error wins, then
# REFINE rounds of re-rounding + least squares polish it. On Qwen2.5-Coder-1.5B int4-g64 these
# 15 + 2 fits per group come within 0.5% (relative error) of 369 candidates x 4 rounds.
ROUNDINGS = ("search", "minmax")  # the first is the default; "minmax" is plain RTN over [lo, hi]
STRETCH = (-1.0, -0.5, 0.0, 0.5, 1.0)
OFFSET = (-0.25, 0.0, 0.25)
REFINE = 2
CHUNK = 1 << 18  # weights per search chunk: its temporaries (~1 MiB each) stay in cache
CHUNK_GPU = 1 << 26  # on a GPU: fewer, larger launches (temporaries of 256 MB)


def quantize_rtn(w: torch.Tensor, spec: LowBitSpec, rounding: str = "search"):
    """Round-to-nearest group quantization, without calibration data.

    w: float [N, K] with K a multiple of spec.group -> (q uint8 [N, K], scale fp16 [N, G],
    min fp16 [N, G]), G = K // group (1 per row for a per-channel spec). int2-4 are asymmetric: each weight rounds to the nearest
    of `scale * q + min`, q in [0, 2^bits - 1]; `rounding` picks the group's scale and min:
    "minmax" spans [lo, hi] exactly, "search" (default) takes the candidate of `_search_range`
    with the least squared error, or minmax's where that is no worse (so never worse per group).
    int1 splits each group at its mean into the means of the two halves; ternary uses BitNet
    b1.58's absmean scale. Symmetric specs (int8-ch) take scale = absmax / (2^(bits-1) - 1) and
    min = -2^(bits-1) * scale. q is computed against the fp16-rounded scale and min, so
    dequantization is exact to what is stored. Deterministic, and each group independent of
    the others (quantizing a shard of rows gives those rows of the whole).
    """
    if rounding not in ROUNDINGS:
        raise ValueError(f"unknown rounding {rounding!r}; known: {', '.join(ROUNDINGS)}")
    N, K = w.shape
    group = spec.group_size(K)
    g = w.float().view(N, K // group, group)
    if spec.symmetric:
        half = 1 << (spec.bits - 1)
        s = (g.abs().amax(-1) / (half - 1)).clamp_min(1e-8).half()
        m = (-half * s.float()).half()  # exact: a power of two times an fp16
    elif spec.ternary:
        s = g.abs().mean(-1).clamp_min(1e-8).half()
        m = -s
    elif spec.bits == 1:
        mean = g.mean(-1, keepdim=True)
        hi = g >= mean
        lo_mean = (g * ~hi).sum(-1) / (~hi).sum(-1).clamp_min(1)
        hi_mean = (g * hi).sum(-1) / hi.sum(-1).clamp_min(1)
        m = lo_mean.half()
        s = (hi_mean - lo_mean).clamp_min(1e-8).half()
    else:  # int2-4: scale and min per `rounding`, codes with them, a chunk of groups at a time
        flat = g.reshape(-1, group)
        q = torch.empty(flat.shape, dtype=torch.uint8, device=w.device)
        s = torch.empty(flat.shape[0], dtype=torch.float16, device=w.device)
        m = torch.empty_like(s)
        step = max(1, (CHUNK if w.device.type == "cpu" else CHUNK_GPU) // group)
        for a in range(0, flat.shape[0], step):
            s[a : a + step], m[a : a + step], q[a : a + step] = _quantize_groups(flat[a : a + step], 2**spec.bits - 1,
                                                                                 rounding)
        return q.view(N, K), s.view(N, -1), m.view(N, -1)
    levels = 2 if spec.ternary else (2**spec.bits - 1 if spec.symmetric else 1)
    q = _round(g, s.float()[..., None], m.float()[..., None], levels)
    return q.to(torch.uint8).view(N, K), s, m


def _round(g: torch.Tensor, s: torch.Tensor, m: torch.Tensor, levels: int) -> torch.Tensor:
    """Nearest codes (float) of g [..., n] on the grid s * q + m (s, m broadcast; s = 0 -> q = 0)."""
    q = ((g - m) / s).round_().clamp_(0, levels)
    return q.nan_to_num_(0.0)  # 0 / 0 of a constant group whose scale rounded to fp16 zero


def _quantize_groups(g: torch.Tensor, levels: int, rounding: str):
    """Groups g float32 [B, n] -> (scale fp16 [B], min fp16 [B], q uint8 [B, n])."""
    lo, hi = g.amin(-1), g.amax(-1)
    s0, m0 = ((hi - lo) / levels).clamp_min(1e-8).half(), lo.half()
    q0 = _round(g, s0.float()[:, None], m0.float()[:, None], levels)
    if rounding == "minmax":
        return s0, m0, q0
    s1, m1 = (t.half() for t in _search_range(g, lo, hi, levels))
    q1 = _round(g, s1.float()[:, None], m1.float()[:, None], levels)
    # Judge both as stored (fp16 scale and min, codes rounded against them): the search's pick
    # was scored in float32, and plain min/max stays where it is no worse.
    better = _error(g, q1, s1, m1) < _error(g, q0, s0, m0)
    return torch.where(better, s1, s0), torch.where(better, m1, m0), torch.where(better[:, None], q1, q0)


def _error(g: torch.Tensor, q: torch.Tensor, s: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Squared error [B] of groups g [B, n] stored as codes q [B, n] and fp16 s, m [B]; inf
    where that is not finite (a min or scale beyond fp16)."""
    r = (q * s.float()[:, None]).add_(m.float()[:, None]).sub_(g)
    return torch.linalg.vecdot(r, r).nan_to_num_(float("inf"), float("inf"))


def _search_range(g: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, levels: int):
    """Least-squares float32 (scale [B], min [B]) of groups g [B, n] over the candidate grids.

    Coordinates are shifted to d = g - lo >= 0 (less cancellation in the sums). For codes q,
    d ~ s * q + c is fitted in closed form from the group sums Sq, Sqq, Sdq, Sd, Sdd and n
    (`_fit`). The candidates' sums are gathered first and fitted together, so the per-group
    arithmetic is a few tensor ops per chunk rather than per candidate.
    """
    n = g.shape[-1]
    d = g - lo[:, None]
    span = (hi - lo).clamp_min(1e-30)
    Sd, Sdd = d.sum(-1).double(), torch.linalg.vecdot(d, d).double()
    sums = torch.empty(3, len(STRETCH) * len(OFFSET), d.shape[0], device=d.device)  # Sq, Sqq, Sdq per candidate
    q, prod = torch.empty_like(d), torch.empty_like(d)

    def group_sums(q: torch.Tensor, i: int) -> None:
        torch.sum(q, -1, out=sums[0, i])
        torch.sum(torch.mul(q, q, out=prod), -1, out=sums[1, i])
        torch.sum(torch.mul(q, d, out=prod), -1, out=sums[2, i])

    i = 0
    for stretch in STRETCH:
        inv = ((levels + stretch) / span)[:, None]
        for offset in OFFSET:
            group_sums(torch.mul(d, inv, out=q).add_(offset).round_().clamp_(0, levels), i)
            i += 1
    s, c, err = _fit(sums.double(), n, Sd, Sdd)
    pick = err.t().contiguous().argmin(1)[None]  # (a strided argmin over dim 0 is ~20x slower)
    best_s, best_c, best = s.gather(0, pick)[0], c.gather(0, pick)[0], err.gather(0, pick)[0]
    for _ in range(REFINE):  # re-round against the best fit, fit again: never increases the error
        ok = best < float("inf")
        group_sums(_round(d, torch.where(ok, best_s, 1.0).float()[:, None], best_c.float()[:, None], levels), 0)
        s, c, err = (t[0] for t in _fit(sums[:, :1].double(), n, Sd, Sdd))
        take = err < best
        best_s, best_c, best = torch.where(take, s, best_s), torch.where(take, c, best_c), torch.minimum(err, best)
    return best_s.float(), (best_c + lo.double()).float()


def _fit(sums: torch.Tensor, n: int, Sd: torch.Tensor, Sdd: torch.Tensor):
    """Least-squares d ~ s * q + c per candidate and group, from float64 sums [3 (Sq, Sqq, Sdq),
    C, B] and Sd, Sdd [B]: s = (n Sdq - Sq Sd) / D, D = n Sqq - Sq^2, c = (Sd - s Sq) / n, and
    at that optimum the squared error is Sdd - s Sdq - c Sd. D = 0 (all codes equal) or s <= 0
    gives error inf. -> s, c, error, each [C, B]."""
    Sq, Sqq, Sdq = sums
    D = n * Sqq - Sq * Sq
    s = (n * Sdq - Sq * Sd) / D
    c = (Sd - s * Sq) / n
    err = Sdd - s * Sdq - c * Sd
    return s, c, torch.where((D > 0) & (s > 0), err, float("inf"))


def dequantize(q: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor, group: int) -> torch.Tensor:
    """q uint8 [N, K], scale/min [N, K // group] -> float32 [N, K] (group = K: one per row)."""
    N, K = q.shape
    return (q.float().view(N, K // group, group) * scale.float()[..., None] + mins.float()[..., None]).view(N, K)


def qweight_rows(qw: qm.QWeight, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows `ids` (int64 [T]) of a GPU layer's weight, dequantized by `qm.dequantize`: [T, k] in
    `dtype`. Every QWeight tensor is row-major over the output rows, so the rows' planes, scales
    and mins are gathered into a QWeight of T rows (low-bit planes and GGUF blocks alike)."""
    if ids.shape[0] == 0:
        return torch.empty(0, qw.k, dtype=dtype, device=ids.device)
    pick = lambda t: None if t is None else t.index_select(0, ids)  # noqa: E731
    sub = qm.QWeight(qw.layout, ids.shape[0], qw.k, [pick(p) for p in qw.planes], pick(qw.scales), pick(qw.mins),
                     pick(qw.sub), pick(qw.sub_min))
    return qm.dequantize(sub, dtype)


def gpu_layout(spec: LowBitSpec) -> qm.QLayout:
    """The GPU kernels' layout of a spec's codes."""
    return qm.QLayout(qm.PLANES[spec.bits], spec.group, spec.zero, "none" if spec.symmetric else "fp16")


class LowBitFormat(WeightFormat):
    """A registered low-bit format; subclasses fix `spec` (see `_register`).

    CPU storage (after every row is in): `lut_packed` / `lut_scales` / `lut_mins` are the first
    LUT pass (`pack_lut` of the codes' low 4 bits), and for codes wider than 4 bits
    `lut_packed_hi` / `lut_scales_hi` / `lut_mins_hi` the second (the high bits, scale x16, no min);
    8-bit codes instead stay bytes, `q8_codes` uint8 [out, in_padded] with `q8_scales` /
    `q8_mins` fp16 [out, groups], multiplied by float activations without tables (`q8_gemm`).
    GPU storage: `q_plane0` (and `q_plane1`), `q_scales` (and `q_mins` unless symmetric), the
    `QWeight` of `gpu_layout(spec)`. Either storage gives single rows back (`rows`: a tied or
    quantized embedding's lookup, layers/embedding.py), from those rows' codes only.
    """

    spec: LowBitSpec
    devices = ("cpu", "cuda")

    def create_weights(self, layer, in_features, out_features, dtype):
        layer.in_padded = self.spec.padded(in_features)  # K padded to whole groups (zeros)
        layer.lowbit_spec = self.spec
        self._device = torch.empty(0).device  # the model is built under its device's context
        self._gpu = self.gpu_storage(self._device)
        self._group = self.spec.group_size(layer.in_padded)
        self._q8 = not self._gpu and self.spec.bits == 8
        # The CPU LUT kernel quantizes each group's activation tables to int8 with one scale: a
        # per-row (or very wide) group would give a whole activation vector one scale, and one
        # massive activation (Qwen's reach ~1e3) zeroes every other input of the row (Qwen2.5-1.5B
        # int8 through the LUT kernel: perplexity +1794%). The one per-row format, int8-ch, runs
        # table-free (`q8_gemm`); every LUT format is grouped (<= 128).
        if not self._gpu and not self._q8 and self._group > 128:
            raise ValueError(f"{self.spec.name}: the CPU LUT kernel needs groups of <= 128 inputs, got {self._group}")
        self._staged: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._rows_in = torch.zeros(out_features, dtype=torch.bool)
        self._out, self._dtype = out_features, dtype
        self.rounded = False  # whether any rows were rounded here from floats (`load`), not taken as codes
        self._kernel = None  # the ctypes function, resolved at first use
        self._qw: qm.QWeight | None = None
        if self._gpu:
            for i in range(len(gpu_layout(self.spec).planes)):
                layer.register_buffer(f"q_plane{i}", torch.empty(0, dtype=torch.int32))
            layer.register_buffer("q_scales", torch.empty(0, dtype=torch.float16))
            if not self.spec.symmetric:
                layer.register_buffer("q_mins", torch.empty(0, dtype=torch.float16))
            return
        if self._q8:
            layer.register_buffer("q8_codes", torch.empty(0, dtype=torch.uint8))
            layer.register_buffer("q8_scales", torch.empty(0, dtype=torch.float16))
            layer.register_buffer("q8_mins", torch.empty(0, dtype=torch.float16))
            return
        for suffix in [""] + (["_hi"] if self.spec.bits > LUT_BITS else []):
            layer.register_buffer("lut_packed" + suffix, torch.empty(0, dtype=torch.uint8))
            layer.register_buffer("lut_scales" + suffix, torch.empty(0, dtype=torch.float16))
            layer.register_buffer("lut_mins" + suffix, torch.empty(0, dtype=torch.float16))

    def load(self, layer, weight, row_offset):
        self._check_rows(layer, weight.shape, row_offset)
        # quantized where the layer lives: a GPU rounds an 8B model's weights in seconds
        w = F.pad(weight.to(self._device if self._gpu else "cpu", torch.float32), (0, layer.in_padded - weight.shape[1]))
        self.rounded = True
        self.load_codes(layer, *quantize_rtn(w, self.spec), row_offset)

    def load_codes(self, layer, q: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor, row_offset: int) -> None:
        """Take quantized rows: q uint8 [rows, in_padded], scale/mins [rows, in_padded // group]."""
        rows = q.shape[0]
        groups = layer.in_padded // self._group
        if q.shape != (rows, layer.in_padded) or scale.shape != (rows, groups) or mins.shape != (rows, groups):
            raise ValueError(f"quantized rows q{tuple(q.shape)} scale{tuple(scale.shape)} do not fit a "
                             f"{self.spec.name} layer with {layer.in_padded} padded inputs")
        if q.numel() and int(q.max()) >= 2**self.spec.bits:
            raise ValueError(f"codes exceed {self.spec.bits} bits")
        if row_offset + rows > self._out:
            raise ValueError(f"rows [{row_offset}, {row_offset + rows}) exceed the layer's {self._out}")
        if self._staged is None:
            dev = self._device if self._gpu else "cpu"
            self._staged = (torch.zeros(self._out, layer.in_padded, dtype=torch.uint8, device=dev),
                            torch.zeros(self._out, groups, dtype=torch.float16, device=dev),
                            torch.zeros(self._out, groups, dtype=torch.float16, device=dev))
        sq, ss, sm = self._staged
        sq[row_offset : row_offset + rows] = q
        ss[row_offset : row_offset + rows] = scale.half()
        sm[row_offset : row_offset + rows] = mins.half()
        self._rows_in[row_offset : row_offset + rows] = True
        if bool(self._rows_in.all()):
            self._pack(layer)  # every shard is in: keep only the packed form

    def _pack(self, layer) -> None:
        q, s, m = self._staged
        self._staged = None
        bits, g = self.spec.bits, self._group
        if self._gpu:
            for i, plane in enumerate(qm.pack_codes(q, gpu_layout(self.spec).planes)):
                setattr(layer, f"q_plane{i}", plane)
            layer.q_scales = s.contiguous()
            if not self.spec.symmetric:
                layer.q_mins = m.contiguous()
            return
        if self._q8:
            layer.q8_codes, layer.q8_scales, layer.q8_mins = q.contiguous(), s.contiguous(), m.contiguous()
            return
        layer.lut_packed, layer.lut_scales, layer.lut_mins = lut.pack_lut(q & 15, s, m, min(bits, LUT_BITS), g)
        if bits > LUT_BITS:  # the high bits: q = lo + 16 * hi, so scale x16 (exact) and no min
            s_hi = s * 16
            if not torch.isfinite(s_hi).all():
                raise ValueError(f"a scale of this {self.spec.name} layer x16 overflows fp16")
            layer.lut_packed_hi, layer.lut_scales_hi, layer.lut_mins_hi = lut.pack_lut(
                q >> LUT_BITS, s_hi, torch.zeros_like(m), bits - LUT_BITS, g)

    def _check_rows(self, layer, shape, row_offset) -> None:
        rows, cols = shape
        if cols != layer.in_features or row_offset + rows > self._out:
            raise ValueError(f"weight of shape {tuple(shape)} does not fit rows [{row_offset}, {row_offset + rows}) "
                             f"of a layer of shape ({self._out}, {layer.in_features})")

    def process_after_loading(self, layer):
        if self._staged is not None or not bool(self._rows_in.all()):
            missing = int((~self._rows_in).sum())
            raise ValueError(f"{missing} of {self._out} rows of a {self.spec.name} layer were never loaded")

    def qweight(self, layer) -> qm.QWeight:
        """The GPU layer's weight for kernels/qmatmul.py (rebuilt if its buffers were replaced)."""
        if self._qw is None or self._qw.scales is not layer.q_scales:
            planes = [getattr(layer, f"q_plane{i}") for i in range(len(gpu_layout(self.spec).planes))]
            self._qw = qm.QWeight(gpu_layout(self.spec), self._out, layer.in_features, planes, layer.q_scales,
                                  None if self.spec.symmetric else layer.q_mins)
        return self._qw

    def _passes(self, layer):
        """(packed, scales, mins, bits) of each LUT pass."""
        out = [(layer.lut_packed, layer.lut_scales, layer.lut_mins, min(self.spec.bits, LUT_BITS))]
        if self.spec.bits > LUT_BITS:
            out.append((layer.lut_packed_hi, layer.lut_scales_hi, layer.lut_mins_hi, self.spec.bits - LUT_BITS))
        return out

    def codes(self, layer):
        """(q uint8 [out, in_padded], scale fp16, min fp16) of the packed weight, on the CPU (for
        saving and tests)."""
        if self._gpu:
            qw = self.qweight(layer)
            q = qm.unpack_codes(qw.planes, qw.layout.planes, qw.kp)
            s = qw.scales
            m = (-self.spec.zero * s.float()).half() if self.spec.symmetric else qw.mins
            return q.cpu(), s.cpu(), m.cpu()
        return self._cpu_codes(layer)

    def _cpu_codes(self, layer, ids: torch.Tensor | None = None):
        """(q uint8 [T, in_padded], scale fp16 [T, G], min fp16 [T, G]) of rows `ids` (int64 [T];
        None: every row) of the CPU storage: byte codes as they are, LUT passes unpacked, the
        high pass's codes (scale x16, no min) above the low pass's 4 bits."""
        if self._q8:
            if ids is None:
                return layer.q8_codes, layer.q8_scales, layer.q8_mins
            return layer.q8_codes[ids], layer.q8_scales[ids], layer.q8_mins[ids]
        if ids is None:
            ids = torch.arange(self._out)
        q, s, m = None, None, None
        for i, (packed, scales, mins, bits) in enumerate(self._passes(layer)):
            qi, si, mi = lut.unpack_lut_rows(packed, scales, mins, ids, bits, self._group)
            q, s, m = (qi, si, mi) if i == 0 else (q | (qi << LUT_BITS), s, m)
        return q, s, m

    def can_gather(self, layer) -> bool:
        """`rows` works on either device once the weight is packed (an embedding may read it)."""
        return self._staged is None and bool(self._rows_in.all())

    def rows(self, layer, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` (int64 [T], repeats allowed) of the weight, dequantized: [T, in_features],
        float32 on the CPU (exactly those rows of `dequantize(*codes(layer))`), the model's
        dtype on a GPU. Only the rows' codes and scales are read: a tied embedding's lookup."""
        if self._gpu:
            return qweight_rows(self.qweight(layer), ids, self._dtype)
        return dequantize(*self._cpu_codes(layer, ids), self._group)[:, : layer.in_features]

    def _gpu_apply(self, layer, x, act=None):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        return qm.qmatmul(x2, self.qweight(layer), act=act).view(*shape[:-1], self._out)

    def apply_silu_mul(self, layer, h):
        return self._gpu_apply(layer, h, "silu_mul") if self._gpu else super().apply_silu_mul(layer, h)

    def apply(self, layer, x):
        if self._gpu:
            return self._gpu_apply(layer, x)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.dtype != torch.float32 or not x2.is_contiguous():
            x2 = x2.float().contiguous()
        if layer.in_padded != shape[-1]:
            x2 = F.pad(x2, (0, layer.in_padded - shape[-1]))
        if self._q8:
            if self._kernel is None:
                self._kernel = lut.load_cpu_library().bitfold_q8_gemm if lut.available() else False
            if not self._kernel:
                return lut.q8_gemm_ref(x2, layer.q8_codes, layer.q8_scales, layer.q8_mins, self._group) \
                    .to(x.dtype).view(*shape[:-1], self._out)
            y = torch.empty(x2.shape[0], self._out)
            self._kernel(x2.data_ptr(), x2.shape[0], layer.in_padded, layer.q8_codes.data_ptr(),
                         layer.q8_scales.data_ptr(), layer.q8_mins.data_ptr(), self._out, self._group, y.data_ptr(),
                         torch.get_num_threads(), -1)
            return y.to(x.dtype).view(*shape[:-1], self._out)
        if self._kernel is None:
            self._kernel = lut.load_cpu_library().bitfold_lut_gemm if lut.available() else False
        y = None
        for packed, scales, mins, bits in self._passes(layer):
            if self._kernel:
                # The hot path of a CPU decode step (every linear layer): shapes were checked when
                # the weight was packed, so straight to the kernel.
                yp = torch.empty(x2.shape[0], self._out)
                self._kernel(x2.data_ptr(), x2.shape[0], layer.in_padded, packed.data_ptr(), scales.data_ptr(),
                             mins.data_ptr(), self._out, bits, self._group, yp.data_ptr(), torch.get_num_threads(),
                             -1)
            else:  # no compiler: correct but slow (dequantize every call); said once
                if not getattr(LowBitFormat, "_warned", False):
                    log.warning("LUT kernel unavailable; low-bit layers dequantize on every call")
                    LowBitFormat._warned = True
                yp = x2 @ lut.dequantize_ref(packed, scales, mins, self._out, bits, self._group).t()
            y = yp if y is None else y.add_(yp)
        return y.to(x.dtype).view(*shape[:-1], self._out)


def _register(spec: LowBitSpec, *aliases: str) -> None:
    # Below 4 bits the output projection stays at 4 bits (llama.cpp's Q2_K/Q3_K keep it at Q6_K):
    # logits are where 2-bit rounding hurts most, and it is one matrix of many.
    head = None if spec.bits >= 4 and not spec.ternary else f"int4-g{spec.group}"
    cls = type(f"LowBit_{spec.name.replace('-', '_')}", (LowBitFormat,),
               {"spec": spec, "name": spec.name, "lm_head_format": head})
    WEIGHT_FORMATS.register(spec.name, *aliases)(cls)


for _g in GROUPS:
    for _bits in BITS:
        _spec = LowBitSpec(_bits, _g)
        _register(_spec, *([f"int{_bits}"] if _g == DEFAULT_GROUP and _bits != 8 else []))
    _register(LowBitSpec(2, _g, ternary=True), *(["ternary"] if _g == DEFAULT_GROUP else []))
_register(LowBitSpec(8, 0, symmetric=True), "int8")  # int8-ch: per output channel, symmetric


def lowbit_spec(name: str) -> LowBitSpec | None:
    """The spec of a registered low-bit format name (aliases too), or None for other formats."""
    cls = WEIGHT_FORMATS.get(name)
    return getattr(cls, "spec", None)
