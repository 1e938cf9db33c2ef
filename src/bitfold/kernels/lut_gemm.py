"""Lookup-table GEMV/GEMM for 1-4-bit group-quantized weights on the CPU (T-MAC, arXiv
2407.00088; SAIL's batched reuse of the index stream).

The kernel is C++ (`cpu/lut_gemm.cpp`, AVX-512BW / AVX2 / scalar, dispatched at run time). pip
compiles it at install as the extension `bitfold._lut`; where that is missing (a source tree
on PYTHONPATH) it is compiled once with the system C++ compiler into a cache folder. Python
calls it through ctypes. `lut_gemm_ref` is the same computation in PyTorch (tables quantized
to int8 the same way, float64 accumulation), and `pack_lut` / `unpack_lut` define the layout.

Weights: w[n, k] = scale[n, g] * q[n, k] + min[n, g] with q in [0, 2^bits), g = k // group.
"""
from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

TILE = 64  # output rows per kernel tile
ISAS = {"scalar": 0, "avx2": 1, "avx512": 2}
_SOURCE = Path(__file__).with_name("cpu") / "lut_gemm.cpp"
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_lib_error: str | None = None


# ---- layout ------------------------------------------------------------------------------------

def kernel_order() -> torch.Tensor:
    """[64] int64: the row (within a tile) of each kernel-order position (see lut_gemm.cpp)."""
    pos = torch.arange(TILE)
    return 32 * (pos >> 5) + 2 * (pos & 15) + ((pos >> 4) & 1)


def pack_lut(q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, bits: int, group: int):
    """Repack codes into the kernel's bit-plane layout.

    q: uint8 [N, K] codes in [0, 2^bits); scales, mins: [N, K // group] (any float dtype);
    K a multiple of `group`, group a multiple of 8. Returns (packed uint8
    [tiles, groups, bits, group // 4, 32], scales fp16 [tiles, groups, 64], mins fp16 same),
    rows padded to a multiple of 64 with zeros.
    """
    N, K = q.shape
    _check_shape(N, K, bits, group)
    tiles, groups, cpg = -(-N // TILE), K // group, group // 4
    pad = tiles * TILE - N
    qp = torch.nn.functional.pad(q.to(torch.uint8), (0, 0, 0, pad))
    planes = torch.stack([(qp >> p) & 1 for p in range(bits)])  # [bits, Np, K]
    nib = (planes.view(bits, tiles * TILE, K // 4, 4) << torch.arange(4, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)
    nib = nib.view(bits, tiles, 2, 32, groups, cpg)  # row = tile*64 + half*32 + j
    byte = nib[:, :, 0] | (nib[:, :, 1] << 4)  # [bits, tiles, 32, groups, cpg]
    packed = byte.permute(1, 3, 0, 4, 2).contiguous()  # [tiles, groups, bits, cpg, 32]

    order = kernel_order()

    def meta(t: torch.Tensor) -> torch.Tensor:
        t = torch.nn.functional.pad(t.to(torch.float16), (0, 0, 0, pad)).view(tiles, TILE, groups)
        return t[:, order].permute(0, 2, 1).contiguous()  # [tiles, groups, 64] in kernel order

    return packed, meta(scales), meta(mins)


def unpack_lut(packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, n: int, bits: int, group: int):
    """Inverse of `pack_lut`: (q uint8 [n, K], scales fp16 [n, K // group], mins fp16 [n, K // group])."""
    tiles, groups, _, cpg, _ = packed.shape
    K = groups * group
    nib = torch.stack([packed & 15, packed >> 4], dim=3)  # [tiles, groups, bits, 2, cpg, 32]
    rows = nib.permute(2, 0, 3, 5, 1, 4).reshape(bits, tiles * TILE, K // 4)  # [bits, Np, chunks]
    q = torch.zeros(tiles * TILE, K // 4, 4, dtype=torch.uint8)
    for p in range(bits):
        for j in range(4):
            q[:, :, j] |= ((rows[p] >> j) & 1) << p
    inv = torch.argsort(kernel_order())

    def meta(t: torch.Tensor) -> torch.Tensor:
        return t.permute(0, 2, 1)[:, inv].reshape(tiles * TILE, groups)[:n]

    return q.view(tiles * TILE, K)[:n], meta(scales), meta(mins)


def _check_shape(N: int, K: int, bits: int, group: int) -> None:
    if not 1 <= bits <= 4:
        raise ValueError(f"bits must be 1..4, got {bits}")
    if group < 8 or group % 8:
        raise ValueError(f"group must be a positive multiple of 8, got {group}")
    if K % group:
        raise ValueError(f"in_features {K} is not a multiple of the group size {group}")
    if N < 1:
        raise ValueError(f"out_features must be >= 1, got {N}")


# ---- reference ---------------------------------------------------------------------------------

_MASKS = torch.tensor([[(i >> j) & 1 for j in range(4)] for i in range(16)], dtype=torch.float32)  # [16, 4]


def build_tables_ref(x: torch.Tensor, group: int):
    """x: float32 [B, K] -> (tables int8-valued float32 [B, K/4, 16], lscale [B, K/group],
    sumx [B, K/group]). Subset sums add x[4c+j] in ascending j exactly as the kernel does."""
    B, K = x.shape
    x4 = x.view(B, K // 4, 1, 4)
    t = torch.zeros(B, K // 4, 16)
    for j in range(4):
        t = t + _MASKS[:, j] * x4[..., j]
    groups = K // group
    amax = t.view(B, groups, -1).abs().amax(-1)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros(()))
    tq = (t.view(B, groups, -1) * inv[..., None]).round().view(B, K // 4, 16)
    return tq, amax / 127.0, x.view(B, groups, group).sum(-1)


def lut_gemm_ref(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                 n: int, bits: int, group: int) -> torch.Tensor:
    """Same signature and math as `lut_gemm`: x [B, K] -> y float32 [B, n]."""
    x = x.float()
    B, K = x.shape
    q, s, m = unpack_lut(packed, scales, mins, n, bits, group)
    tq, ls, sx = build_tables_ref(x, group)
    groups, cpg = K // group, group // 4
    acc = torch.zeros(B, n, groups, dtype=torch.float64)
    for p in range(bits):
        plane = ((q >> p) & 1).view(n, K // 4, 4).to(torch.int64)
        idx = (plane << torch.arange(4)).sum(-1)  # [n, K/4]
        vals = tq[:, torch.arange(K // 4)[None, :], idx]  # [B, n, K/4]
        acc += (2 ** p) * vals.double().view(B, n, groups, cpg).sum(-1)
    y = (s.double()[None] * ls.double()[:, None] * acc).sum(-1) + (m.double()[None] * sx.double()[:, None]).sum(-1)
    return y.float()


def dequantize_ref(packed, scales, mins, n: int, bits: int, group: int) -> torch.Tensor:
    """The float32 weight [n, K] the packed tensors represent."""
    q, s, m = unpack_lut(packed, scales, mins, n, bits, group)
    K = q.shape[1]
    w = q.float().view(n, K // group, group) * s.float()[..., None] + m.float()[..., None]
    return w.view(n, K)


# ---- the compiled kernel -----------------------------------------------------------------------

def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "bitfold"


def _compile(src: Path) -> Path:
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:16]
    out = _cache_dir() / f"lut_gemm-{digest}.so"
    if out.exists():
        return out
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if not cxx:
        raise RuntimeError("no C++ compiler found (install g++), and bitfold._lut was not built at install")
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"bitfold: compiling the LUT kernel ({src.name}) once into {out.parent} ...", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_out = Path(tmp) / out.name
        cmd = [cxx, *COMPILE_FLAGS, "-DBITFOLD_NO_PYMODULE", str(src), "-o", str(tmp_out), "-lpthread"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"compiling {src} failed:\n{' '.join(cmd)}\n{res.stderr[-2000:]}")
        os.replace(tmp_out, out)  # atomic: concurrent builders never see a half-written file
    return out


COMPILE_FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-Wno-maybe-uninitialized"]


def _load() -> ctypes.CDLL:
    global _lib, _lib_error
    with _lock:
        if _lib is not None:
            return _lib
        if _lib_error is not None:
            raise RuntimeError(_lib_error)
        try:
            spec = importlib.util.find_spec("bitfold._lut")
            built = spec.origin if spec is not None and spec.origin else None
            # An editable install's module goes stale when the source changes: rebuild then.
            if built is None or (_SOURCE.exists() and os.path.getmtime(built) < os.path.getmtime(_SOURCE)):
                built = str(_compile(_SOURCE))
            path = built
            lib = ctypes.CDLL(path)
        except (OSError, RuntimeError) as e:
            _lib_error = f"the LUT kernel is unavailable: {e}"
            raise RuntimeError(_lib_error) from None
        lib.bitfold_lut_isa.restype = ctypes.c_int
        lib.bitfold_lut_gemm.restype = ctypes.c_int
        p = ctypes.c_void_p
        i = ctypes.c_int
        lib.bitfold_lut_gemm.argtypes = [p, i, i, p, p, p, i, i, i, p, i, i]
        _lib = lib
        return lib


def available() -> bool:
    try:
        _load()
        return True
    except RuntimeError:
        return False


def best_isa() -> str:
    """The instruction set the kernel uses on this CPU: 'avx512', 'avx2' or 'scalar'."""
    code = _load().bitfold_lut_isa()
    return {v: k for k, v in ISAS.items()}[code]


def lut_gemm(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
             n: int, bits: int, group: int, *, num_threads: int | None = None, isa: str | None = None) -> torch.Tensor:
    """x: float32 [B, K] (contiguous, CPU) -> y float32 [B, n] = x @ W^T for the packed W.

    packed/scales/mins come from `pack_lut`. isa forces 'avx512' / 'avx2' / 'scalar' (tests);
    default the best this CPU has. num_threads defaults to torch.get_num_threads().
    """
    lib = _load()
    x = x.float().contiguous()
    B, K = x.shape
    tiles, groups, pb, cpg, width = packed.shape
    if pb != bits or groups * group != K or cpg * 4 != group or width != 32 or tiles * TILE < n:
        raise ValueError(f"packed weight of shape {tuple(packed.shape)} does not match x [{B}, {K}], "
                         f"n={n}, bits={bits}, group={group}")
    if packed.dtype != torch.uint8 or scales.dtype != torch.float16 or mins.dtype != torch.float16:
        raise ValueError("packed must be uint8 and scales/mins float16 (use pack_lut)")
    if not (packed.is_contiguous() and scales.is_contiguous() and mins.is_contiguous()):
        raise ValueError("packed, scales and mins must be contiguous")
    y = torch.empty(B, n, dtype=torch.float32)
    if B == 0:
        return y
    rc = lib.bitfold_lut_gemm(x.data_ptr(), B, K, packed.data_ptr(), scales.data_ptr(), mins.data_ptr(), n, bits, group,
                              y.data_ptr(), num_threads or torch.get_num_threads(), -1 if isa is None else ISAS[isa])
    if rc != 0:
        raise ValueError(f"bitfold_lut_gemm rejected B={B} K={K} n={n} bits={bits} group={group}")
    return y
