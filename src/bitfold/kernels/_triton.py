"""The one place kernels import Triton from, plus the small helpers every wrapper shares.

Triton is optional: on a machine without it (or without a GPU) the engine runs the `*_ref`
functions that sit beside each kernel, so importing a kernel file must never fail. When
Triton is missing, `jit` turns a kernel into a stub that raises on launch, and `tl.constexpr`
still exists so the kernel signatures parse.

Tests run the kernels on CPU tensors through Triton's interpreter; `TRITON_INTERPRET=1` must
be in the environment before Triton is imported (tests/kernels/conftest.py sets it).
"""
import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # the refs still work; launching a kernel raises
    triton = None
    HAS_TRITON = False

    class _NoTritonLanguage:
        constexpr = object  # only ever read as a parameter annotation

    tl = _NoTritonLanguage()


class _MissingKernel:
    def __init__(self, fn):
        self.__name__ = fn.__name__

    def __getitem__(self, grid):
        raise RuntimeError(f"{self.__name__} needs Triton, which is not installed; use the *_ref function")


def jit(fn=None, *, do_not_specialize=()):
    """`triton.jit`, or a stub that raises on launch when Triton is missing. `do_not_specialize`
    names integer arguments that change from step to step (a batch's sequence count, the block
    table's width): Triton would otherwise compile a variant for each of "== 1", "a multiple of
    16" and "other", mid-run, seconds each for the big attention kernels."""
    if fn is None:
        return lambda f: jit(f, do_not_specialize=do_not_specialize)
    if not HAS_TRITON:
        return _MissingKernel(fn)
    return triton.jit(fn, do_not_specialize=list(do_not_specialize)) if do_not_specialize else triton.jit(fn)


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (tests on a GPU-less box)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def require(cond: bool, msg: str) -> None:
    """Wrapper argument check; raises instead of `assert` so `python -O` keeps the checks."""
    if not cond:
        raise ValueError(msg)


def require_launchable(*tensors: torch.Tensor) -> None:
    """Kernels need Triton and tensors it can address: CUDA, or CPU under the interpreter."""
    require(HAS_TRITON, "Triton is not installed; call the *_ref function instead")
    dev = tensors[0].device
    for t in tensors:
        require(t.device == dev, f"all tensors must be on one device, got {t.device} and {dev}")
    require(dev.type == "cuda" or interpreting(),
            f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU), got {dev}")


_SM_COUNT: dict = {}


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors on `device`; 132 (an H100 SXM) when it is not a GPU, so the
    interpreter picks the same launch shapes the target would."""
    if device.type != "cuda":
        return 132
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---- programmatic dependent launch (Hopper) ---------------------------------------------------
# A decode step at small batch is a chain of ~12 kernels per layer, most of them tiny; between
# two kernels the GPU drains the first and ramps up the second. With PDL a kernel may launch
# while its predecessor still runs, once every program of the predecessor has called
# `pdl_trigger` (or exited); it waits for the predecessor's writes (`pdl_wait`: the whole
# previous grid has finished and its memory is visible) before it reads an activation or writes
# anything. (Prefetching each GEMV's weight rows into L2 ahead of the wait was measured too and
# lost 3-11%: bf16 batch 1 207.9 tok/s with it against 235.1 without, weights-20261204-205250.)
# Small kernels (norms, rotary, attention, SiLU) trigger at their start; the GEMVs only after
# their main loop: a successor let in early by a many-program grid takes SM slots as that grid's
# programs drain, so its own programs clump on the SMs that freed first (triggering at the start
# cost bf16 batch 4 ~10% on the H200: 780.8 against 863.1 tok/s, weights-20261204-204655). Since every PDL kernel waits before it finishes, a
# kernel's completion still implies all earlier kernels' (torch's own kernels launch without
# PDL and serialize as usual). Off unless set: DecodeGraphs captures the graphs of up to
# EngineConfig.pdl's rows with it on; launch wrappers pass `**pdl_kwargs()`, the kernel's PDL
# constexpr and Triton's `launch_pdl` from one value (a PDL launch whose kernel skipped its
# wait would race).
PDL = False


def pdl_supported(device: torch.device) -> tuple[bool, str]:
    """(True, "") when kernels on `device` can launch with PDL, else (False, why not)."""
    if not HAS_TRITON:
        return False, "Triton is not installed"
    if device.type != "cuda":
        return False, f"PDL is a CUDA feature, not {device.type}"
    if torch.cuda.get_device_capability(device)[0] < 9:
        return False, "PDL needs compute capability 9.0 (Hopper) or newer"
    try:
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # noqa: F401
    except ImportError:
        return False, f"Triton {triton.__version__} has no grid dependency control (gdc_wait)"
    return True, ""


def pdl_launch() -> bool:
    """Whether the next kernel launch uses PDL (its PDL constexpr and `launch_pdl`)."""
    return PDL and not interpreting()


def pdl_kwargs() -> dict:
    """Launch keywords of a kernel taking part in PDL: its `PDL` constexpr and Triton's
    `launch_pdl`, always equal."""
    pdl = pdl_launch()
    return {"PDL": pdl, "launch_pdl": pdl}


if HAS_TRITON:
    @triton.jit
    def pdl_trigger(PDL: tl.constexpr):
        """Let the next kernel launch (once every program of this one has called this)."""
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()

    @triton.jit
    def pdl_wait(PDL: tl.constexpr):
        """Wait until the previous kernel has finished and its writes are visible."""
        if PDL:
            tl.extra.cuda.gdc_wait()
else:
    pdl_trigger = pdl_wait = None

