"""The C++ CPU kernels (kernels/cpu/*.cpp) as one shared library reached through ctypes.

pip compiles them at install into the extension module `bitfold._lut` (setup.py; the module
has no Python methods, it only carries the C functions). Where that module is missing or older
than the sources (a source tree on PYTHONPATH, an editable install after an edit), they are
compiled once with the system C++ compiler into ~/.cache/bitfold, keyed by the sources' hash.
No compiler: `load_cpu_library` raises and callers fall back to the PyTorch references.
"""
from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ISAS = {"scalar": 0, "avx2": 1, "avx512": 2}
SOURCES = sorted((Path(__file__).with_name("cpu")).glob("*.cpp"))
HEADERS = sorted((Path(__file__).with_name("cpu")).glob("*.h"))  # included by the sources: part of the key
COMPILE_FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-Wno-maybe-uninitialized"]

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_error: str | None = None


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "bitfold"


def _compile() -> Path:
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES + HEADERS) + " ".join(COMPILE_FLAGS).encode())
    out = _cache_dir() / f"cpu-kernels-{digest.hexdigest()[:16]}.so"
    if out.exists():
        return out
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if not cxx:
        raise RuntimeError("no C++ compiler found (install g++), and bitfold._lut was not built at install")
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"bitfold: compiling the CPU kernels once into {out.parent} ...", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_out = Path(tmp) / out.name
        cmd = [cxx, *COMPILE_FLAGS, "-DBITFOLD_NO_PYMODULE", *map(str, SOURCES), "-o", str(tmp_out), "-lpthread"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"compiling the CPU kernels failed:\n{' '.join(cmd)}\n{res.stderr[-2000:]}")
        os.replace(tmp_out, out)  # atomic: concurrent builders never see a half-written file
    return out


def _declare(lib: ctypes.CDLL) -> None:
    p, i, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    sigs = {
        "bitfold_lut_isa": (i, []),
        "bitfold_lut_gemm": (i, [p, i, i, p, p, p, i, i, i, p, i, i]),
        "bitfold_q8_gemm": (i, [p, i, i, p, p, p, i, i, p, i, i]),
        "bitfold_cb4_gemm": (i, [p, i, i, p, p, p, i, i, p, i, i]),
        "bitfold_q6k_gemm": (i, [p, i, i, p, i, p, i, i]),
        "bitfold_add_rms_norm": (None, [p, p, p, p, p, i, i, f]),
        "bitfold_rotary": (None, [p, p, p, p, p, p, i, i, i, i]),
        "bitfold_paged_decode": (None, [p, p, p, p, p, p, i, i, i, i, i, i, f, i, p, p, p]),
        "bitfold_silu_mul": (None, [p, p, i, i, i]),
        "bitfold_decode_layers": (i, [p, i, p]),
        "bitfold_decode_error": (ctypes.c_char_p, []),
        "bitfold_decode_profile": (None, [p]),
        "bitfold_quant_decode": (i, [p]),
        "bitfold_quant_decode_check": (ctypes.c_char_p, [p]),
        "bitfold_quant_write_decode": (i, [p, p, p, p]),
    }
    for name, (res, args) in sigs.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args


def load_cpu_library() -> ctypes.CDLL:
    """The loaded library; raises RuntimeError (once built, cached) when it cannot be had."""
    global _lib, _error
    with _lock:
        if _lib is not None:
            return _lib
        if _error is not None:
            raise RuntimeError(_error)
        try:
            spec = importlib.util.find_spec("bitfold._lut")
            path = spec.origin if spec is not None and spec.origin else None
            newest = max((os.path.getmtime(p) for p in SOURCES + HEADERS), default=0)
            if path is None or os.path.getmtime(path) < newest:
                path = str(_compile())
            lib = ctypes.CDLL(path)
            _declare(lib)
        except (OSError, RuntimeError, AttributeError) as e:
            _error = f"the C++ CPU kernels are unavailable: {e}"
            raise RuntimeError(_error) from None
        _lib = lib
        return lib


def available() -> bool:
    try:
        load_cpu_library()
        return True
    except RuntimeError:
        return False
