"""`gguf`: a GGUF model's linear layers kept in the block types the file stores them in, what
`--weights auto` picks for a GGUF whose linear tensors are block-quantized.

One layer's shards may come in different types (a Q4_K_M file keeps attn_v and some ffn_down in
Q6_K beside Q4_K q and k, and a merged q|k|v layer holds all three), so the layer gathers its
shards and decides once every row is in (`process_after_loading`):

- on the CPU it becomes the low-bit LUT format all its shards' codes fit without rounding (the
  most bits and the narrowest group among them, `gguf_blocks.fits`): Q4_0/Q4_1 -> int4-g32
  exactly, Q8_0 -> int8-g32 (two LUT passes), Q4_K + Q6_K -> int6-g16 (the K-quants' d*sc
  products rounded to fp16, see gguf_blocks.py); `layer.fmt` is replaced by that format, so the
  fused CPU step, `bitfold quantize` and the tests see an ordinary low-bit layer. A shard stored
  as floats (F16/F32 tensors) makes the layer dense.
- on the CPU, with `CPU_Q6K_NATIVE = True` (opt-in: see README "CPU and low-bit"), a layer
  whose every shard is Q6_K keeps the file's blocks as they are (`q6k_blocks` uint8 [out,
  in / 256 * 210]: memory = file bytes, 6.56 bits/weight instead of int6-g16's 10) and runs
  the table-free Q6K kernel (kernels/lut_gemm.py `q6k_gemm`). A merged layer whose shards mix
  Q6_K with other types (Qwen's q|k|v with a Q6_K v) still becomes int6-g16 as above.
- on a GPU it keeps every shard in its own type's native layout (`gguf_blocks.native`: the
  file's bytes, read by kernels/qmatmul.py's fused kernels): consecutive rows of one type are
  one run (one kernel launch), float shards a dense run; a layer of several runs writes each
  into its columns of the output. Weight memory is the file's (+ the K-quants' unpacked
  sub-scales, <= 3.6%).
"""
from __future__ import annotations

import torch
from gguf import GGMLQuantizationType

from bitfold.kernels import lut_gemm as lut
from bitfold.kernels import qmatmul as qm
from bitfold.weights import dense
from bitfold.weights.base import WEIGHT_FORMATS, WeightFormat
from bitfold.weights.lowbit import LowBitSpec, qweight_rows
from bitfold.weights.packed import PackedWeight


# Whether CPU layers of only Q6_K shards keep the file's blocks rather than becoming int6-g16 LUT
# codes; read when a layer is built. Opt-in: slower at batch 1 (README "CPU and low-bit").
CPU_Q6K_NATIVE = False


def cpu_format(parts: list) -> str:
    """The format a CPU layer of these shards (floats or GGUFBlocks) takes."""
    specs = [getattr(getattr(p, "block_type", None), "spec", None) for p in parts]
    if not specs or any(s is None for s in specs):
        return "dense"
    return LowBitSpec(max(s.bits for s in specs), min(s.group for s in specs)).name


@WEIGHT_FORMATS.register("gguf")
class GGUFFormat(WeightFormat):
    name = "gguf"
    devices = ("cpu", "cuda")

    def create_weights(self, layer, in_features, out_features, dtype):
        self._args = (in_features, out_features, dtype)
        self._device = torch.empty(0).device  # the model is built under its device's context
        self._parts: list[tuple[int, torch.Tensor | PackedWeight]] = []
        self._rows_in = torch.zeros(out_features, dtype=torch.bool)

    def _stage(self, layer, weight, row_offset: int) -> None:
        rows, cols = weight.shape
        in_features, out_features, _ = self._args
        if cols != in_features or row_offset + rows > out_features:
            raise ValueError(f"weight of shape {tuple(weight.shape)} does not fit rows [{row_offset}, "
                             f"{row_offset + rows}) of a layer of shape ({out_features}, {in_features})")
        self._parts.append((row_offset, weight))
        self._rows_in[row_offset : row_offset + rows] = True

    def load(self, layer, weight, row_offset):
        self._stage(layer, weight, row_offset)

    def load_packed(self, layer, packed, row_offset):
        self._stage(layer, packed, row_offset)

    def target(self) -> str:
        """The format this layer becomes, from its shards and device ("gguf": stays, GPU runs)."""
        if self.gpu_storage(self._device):
            return "gguf"
        if self._device.type != "cpu":
            return "dense"
        qtypes = {getattr(p, "qtype", None) for _, p in self._parts}
        if qtypes == {GGMLQuantizationType.Q6_K} and CPU_Q6K_NATIVE:
            return "gguf-q6k"
        return cpu_format([p for _, p in self._parts])

    def process_after_loading(self, layer):
        if hasattr(self, "_runs") or hasattr(layer, "q6k_blocks"):
            return  # built already (an embedding's table is loaded before the model's pass)
        if not bool(self._rows_in.all()):
            missing = int((~self._rows_in).sum())
            raise ValueError(f"{missing} of {self._args[1]} rows of a GGUF layer were never loaded")
        target = self.target()
        if target == "gguf":
            return self._build_runs(layer)
        if target == "gguf-q6k":  # the file's blocks as they are, rows in order
            raw = torch.cat([p.raw for _, p in sorted(self._parts, key=lambda p: p[0])]).contiguous()
            layer.register_buffer("q6k_blocks", raw)
            self._parts = []
            return
        fmt = WEIGHT_FORMATS.get(target)()
        with torch.device(self._device):
            fmt.create_weights(layer, *self._args)
        for off, part in self._parts:
            if isinstance(part, PackedWeight):
                fmt.load_packed(layer, part, off)
            else:
                fmt.load(layer, part, off)
        fmt.process_after_loading(layer)
        self._parts = []
        layer.fmt = fmt

    def _build_runs(self, layer) -> None:
        """GPU: consecutive shards of one block type (or of floats) become one run."""
        in_features, out_features, dtype = self._args
        parts = sorted(self._parts, key=lambda p: p[0])
        groups: list[list] = []
        for off, part in parts:
            kind = getattr(part, "qtype", None)
            if groups and groups[-1][0] == kind and groups[-1][2] == off:
                groups[-1][1].append(part)
                groups[-1][2] = off + part.shape[0]
            else:
                groups.append([kind, [part], off + part.shape[0], off])
        self._runs: list[tuple[int, int, qm.QWeight | None, str]] = []
        for i, (kind, run, end, start) in enumerate(groups):
            if kind is None:  # float shards
                w = torch.cat([p.to(torch.float32) for p in run]).to(self._device, dtype)
                layer.register_buffer(f"run{i}_weight", w)
                self._runs.append((start, end, None, f"run{i}_weight"))
                continue
            raw = torch.cat([p.raw for p in run]).to(self._device)
            qw = native_blocks(raw, kind)
            for name, t in zip(("plane0", "plane1"), qw.planes):
                layer.register_buffer(f"run{i}_{name}", t)
            for name in ("scales", "mins", "sub", "sub_min"):
                if getattr(qw, name) is not None:
                    layer.register_buffer(f"run{i}_{name}", getattr(qw, name))
            self._runs.append((start, end, qw, kind.name))
        self._parts = []

    def can_gather(self, layer) -> bool:
        """Whether `rows` works: a GPU layer of one block run or a CPU Q6_K layer (an embedding
        table)."""
        if hasattr(layer, "q6k_blocks"):
            return True
        runs = getattr(self, "_runs", ())
        return len(runs) == 1 and runs[0][2] is not None

    def rows(self, layer, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` (int64 [T]) of the weight, dequantized: [T, in] in the layer's dtype (float32
        on the CPU, from those rows' blocks only)."""
        if hasattr(layer, "q6k_blocks"):
            return lut.q6k_dequantize_ref(layer.q6k_blocks.index_select(0, ids.to(torch.int64)), self._args[0])
        return qweight_rows(self._runs[0][2], ids, self._args[2])

    def dequantized(self, layer) -> torch.Tensor:
        """float32 [out, in] of a GPU layer's runs or a CPU Q6_K layer (tests, the reference)."""
        if hasattr(layer, "q6k_blocks"):
            return lut.q6k_dequantize_ref(layer.q6k_blocks, self._args[0])
        rows = []
        for _, _, qw, name in self._runs:
            rows.append(qm.dequantize_ref(qw) if qw is not None else getattr(layer, name).float())
        return torch.cat(rows)

    def apply(self, layer, x, act=None):
        """act (`apply_silu_mul`): only for a layer of one run of blocks."""
        if hasattr(layer, "q6k_blocks"):
            return self._q6k_apply(layer, x)
        if not hasattr(self, "_runs"):
            raise RuntimeError("a GGUF layer runs once its weights are loaded (process_after_loading)")
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        if len(self._runs) == 1:
            y = self._run(layer, self._runs[0], x2, None, act)
        else:
            y = torch.empty(x2.shape[0], self._args[1], dtype=x.dtype, device=x.device)
            for run in self._runs:
                self._run(layer, run, x2, y[:, run[0] : run[1]])
        return y.view(*shape[:-1], self._args[1])

    def apply_silu_mul(self, layer, h):
        if hasattr(self, "_runs") and len(self._runs) == 1 and self._runs[0][2] is not None:
            return self.apply(layer, h, "silu_mul")  # one run of blocks: its kernel takes gate | up
        return super().apply_silu_mul(layer, h)

    def _q6k_apply(self, layer, x):
        """A CPU Q6_K layer: x [..., in] -> [..., out] through `q6k_gemm` (its reference where the
        C++ kernels could not be built)."""
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.dtype != torch.float32 or not x2.is_contiguous():
            x2 = x2.float().contiguous()
        if getattr(self, "_q6k_kernel", None) is None:
            self._q6k_kernel = lut.load_cpu_library().bitfold_q6k_gemm if lut.available() else False
        if self._q6k_kernel:  # the hot path: shapes were fixed when the blocks were kept
            y = torch.empty(x2.shape[0], self._args[1])
            if x2.shape[0]:
                self._q6k_kernel(x2.data_ptr(), x2.shape[0], self._args[0], layer.q6k_blocks.data_ptr(), self._args[1],
                                 y.data_ptr(), torch.get_num_threads(), -1)
        else:
            y = lut.q6k_gemm_ref(x2, layer.q6k_blocks)
        return y.to(x.dtype).view(*shape[:-1], self._args[1])

    @staticmethod
    def _run(layer, run, x, out, act=None):
        _, _, qw, name = run
        if qw is not None:
            return qm.qmatmul(x, qw, out=out, act=act)
        y = dense.matmul(x, getattr(layer, name))
        return y if out is None else out.copy_(y)


def native_blocks(raw: torch.Tensor, qtype) -> qm.QWeight:
    from bitfold.weights.gguf_blocks import native

    return native(raw, qtype)
