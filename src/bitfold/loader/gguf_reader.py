"""A small, fast reader for GGUF v2/v3 files (llama.cpp's format).

`gguf.GGUFReader` builds a numpy view for every element of every metadata array, which takes
seconds for a 150k-token vocabulary. This reader decodes metadata straight into Python values
(numeric arrays in one `np.frombuffer`, string arrays in one tight loop) and maps tensor data as
numpy memmap views shaped exactly like `GGUFReader`'s, so `gguf.quants.dequantize(t.data,
t.tensor_type)` works on them. Every structural problem raises `ModelLoadError` naming the file.

Layout (all little-endian): magic "GGUF", version u32, tensor_count u64, kv_count u64; kv_count
times (key string, value type u32, value); tensor_count times (name string, n_dims u32,
dims u64[n_dims], type u32, offset u64); padding to `general.alignment` (default 32); tensor data,
each tensor at data_start + offset. A string is a u64 byte length then UTF-8 bytes; an array is
element type u32, count u64, then the elements.
"""
from __future__ import annotations

import mmap
import os
import struct
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from bitfold.errors import ModelLoadError

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS

# GGUF value type ids.
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
VALUE_TYPE_NAMES = ("UINT8", "INT8", "UINT16", "INT16", "UINT32", "INT32", "FLOAT32", "BOOL", "STRING",
                    "ARRAY", "UINT64", "INT64", "FLOAT64")

_SCALAR = {t: struct.Struct(f) for t, f in {UINT8: "<B", INT8: "<b", UINT16: "<H", INT16: "<h", UINT32: "<I",
                                             INT32: "<i", FLOAT32: "<f", BOOL: "<?", UINT64: "<Q",
                                             INT64: "<q", FLOAT64: "<d"}.items()}
_DTYPE = {UINT8: np.dtype("<u1"), INT8: np.dtype("<i1"), UINT16: np.dtype("<u2"), INT16: np.dtype("<i2"),
          UINT32: np.dtype("<u4"), INT32: np.dtype("<i4"), FLOAT32: np.dtype("<f4"), BOOL: np.dtype("<u1"),
          UINT64: np.dtype("<u8"), INT64: np.dtype("<i8"), FLOAT64: np.dtype("<f8")}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_HEADER = struct.Struct("<4sIQQ")

# Tensor types gguf.GGUFReader exposes as typed arrays; every other type is raw bytes shaped
# (..., bytes_per_row), which is what gguf.quants.dequantize expects.
_TENSOR_DTYPE = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
                 GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8,
                 GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
                 GGMLQuantizationType.I64: np.int64}


class TensorInfo:
    """One tensor of a GGUF file. `shape` is in GGUF order (innermost dimension first, the
    reverse of numpy's); `data` is a read-only memmap view of the raw stored bytes."""

    __slots__ = ("name", "tensor_type", "shape", "n_elements", "n_bytes", "data_offset", "data")

    def __init__(self, name: str, tensor_type: GGMLQuantizationType, shape: tuple[int, ...], n_elements: int,
                 n_bytes: int, data_offset: int, data: np.ndarray):
        self.name, self.tensor_type, self.shape = name, tensor_type, shape
        self.n_elements, self.n_bytes, self.data_offset, self.data = n_elements, n_bytes, data_offset, data

    def __repr__(self) -> str:
        return (f"TensorInfo({self.name!r}, {self.tensor_type.name}, shape={self.shape}, "
                f"n_bytes={self.n_bytes}, offset={self.data_offset})")


class _Truncated(Exception):
    pass


class GGUFFile:
    """A parsed GGUF file: `fields` maps each metadata key to its decoded value (int, float, bool,
    str, or a list of those), `tensors` lists the tensors in file order."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.fspath(path)
        self.fields: dict[str, Any] = {}
        self.field_types: dict[str, int] = {}  # key -> GGUF value type id (ARRAY for arrays)
        self.tensors: list[TensorInfo] = []
        self.alignment = DEFAULT_ALIGNMENT
        try:
            size = os.path.getsize(self.path)
            with open(self.path, "rb") as f:
                buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        except OSError as e:
            raise ModelLoadError(f"{self.path}: cannot open GGUF file ({e.strerror or e})") from None
        self.file_size = size
        self._where = "the file header"
        try:
            try:
                self._parse(buf, size)
            except (_Truncated, struct.error):
                raise self._error(f"file is truncated: it ends at byte {size}, inside {self._where}") from None
        finally:
            if isinstance(buf, mmap.mmap):
                try:
                    buf.close()
                except BufferError:  # a view still alive (e.g. held by a traceback): let GC close it
                    pass

    # ---- public API ------------------------------------------------------------------------------

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    def __contains__(self, key: str) -> bool:
        return key in self.fields

    def __repr__(self) -> str:
        return f"GGUFFile({self.path!r}, v{self.version}, {len(self.fields)} fields, {len(self.tensors)} tensors)"

    # ---- parsing ---------------------------------------------------------------------------------

    def _error(self, what: str) -> ModelLoadError:
        return ModelLoadError(f"{self.path}: invalid GGUF file: {what}")

    def _parse(self, buf, size: int) -> None:
        if size == 0:
            raise self._error("the file is empty")
        if bytes(buf[:4]) != MAGIC[:min(size, 4)]:
            raise self._error(f"bad magic {bytes(buf[:4])!r} (expected {MAGIC!r}); this is not a GGUF file")
        _, version, n_tensors, n_kv = _HEADER.unpack_from(buf, 0)
        if version not in SUPPORTED_VERSIONS:
            if version & 0xFFFF == 0 and (version >> 24) in SUPPORTED_VERSIONS:
                raise self._error("big-endian GGUF files are not supported")
            raise self._error(f"unsupported GGUF version {version} (supported: "
                              f"{', '.join(map(str, SUPPORTED_VERSIONS))})")
        self.version = version
        off = _HEADER.size

        # Each KV entry takes at least 8 (key length) + 4 (type) + 1 bytes, each tensor info at least
        # 8 + 4 + 4 + 8: reject absurd counts before looping over them.
        if n_kv * 13 > size - off:
            raise self._error(f"header declares {n_kv} metadata entries, more than a {size}-byte file can hold")
        if n_tensors * 24 > size - off:
            raise self._error(f"header declares {n_tensors} tensors, more than a {size}-byte file can hold")

        fields, types = self.fields, self.field_types
        for i in range(n_kv):
            self._where = f"metadata entry {i}"
            key, off = self._string(buf, off, size, "metadata key")
            self._where = f"metadata entry {i} ({key!r})"
            if key in fields:
                raise self._error(f"duplicate metadata key {key!r}")
            (vtype,), off = _U32.unpack_from(buf, off), off + 4
            value, off = self._value(buf, off, size, vtype, key)
            fields[key], types[key] = value, vtype

        align = fields.get("general.alignment", DEFAULT_ALIGNMENT)
        if type(align) is not int or align <= 0 or align & (align - 1):
            raise self._error(f"general.alignment is {align!r}; it must be a power of two")
        self.alignment = align

        infos = []
        names: set[str] = set()
        for i in range(n_tensors):
            self._where = f"tensor info {i}"
            name, off = self._string(buf, off, size, "tensor name")
            self._where = f"tensor info {i} ({name!r})"
            if name in names:
                raise self._error(f"duplicate tensor name {name!r}")
            names.add(name)
            (n_dims,), off = _U32.unpack_from(buf, off), off + 4
            if n_dims > MAX_DIMS:
                raise self._error(f"tensor {name!r} has {n_dims} dimensions (at most {MAX_DIMS} allowed)")
            dims = struct.unpack_from(f"<{n_dims}Q", buf, off)
            off += 8 * n_dims
            ggml_type, rel = struct.unpack_from("<IQ", buf, off)
            off += 12
            infos.append((name, dims, ggml_type, rel))

        self._where = "the padding after the header"
        data_start = off + (-off) % align
        self.data_offset = data_start
        if infos and data_start > size:
            raise _Truncated
        data = np.memmap(self.path, mode="r") if infos else None
        for name, dims, type_id, rel in infos:
            self.tensors.append(self._tensor(data, name, dims, type_id, data_start, rel, size))

    def _string(self, buf, off: int, size: int, what: str) -> tuple[str, int]:
        (n,) = _U64.unpack_from(buf, off)
        off += 8
        end = off + n
        if end > size:
            raise _Truncated
        try:
            return str(buf[off:end], "utf-8"), end
        except UnicodeDecodeError as e:
            raise self._error(f"{what} at byte {off} is not valid UTF-8 ({e.reason})") from None

    def _value(self, buf, off: int, size: int, vtype: int, key: str) -> tuple[Any, int]:
        scalar = _SCALAR.get(vtype)
        if scalar is not None:
            return scalar.unpack_from(buf, off)[0], off + scalar.size
        if vtype == STRING:
            return self._string(buf, off, size, f"value of {key!r}")
        if vtype != ARRAY:
            raise self._error(f"metadata key {key!r} has unknown value type {vtype} "
                              f"(known: 0..12 = {', '.join(VALUE_TYPE_NAMES)})")
        etype, count = struct.unpack_from("<IQ", buf, off)
        off += 12
        dtype = _DTYPE.get(etype)
        if dtype is not None:
            end = off + count * dtype.itemsize
            if end > size:
                raise _Truncated
            arr = np.frombuffer(buf, dtype=dtype, count=count, offset=off)
            return (arr != 0 if etype == BOOL else arr).tolist(), end
        if etype == STRING:
            if count * 8 > size - off:
                raise _Truncated
            return self._string_array(buf, off, size, count, key)
        if etype == ARRAY:  # nested arrays: decoded as lists of lists
            if count * 12 > size - off:
                raise _Truncated
            out = []
            for _ in range(count):
                v, off = self._value(buf, off, size, ARRAY, key)
                out.append(v)
            return out, off
        raise self._error(f"metadata key {key!r} is an array of unknown value type {etype} "
                          f"(known: 0..12 = {', '.join(VALUE_TYPE_NAMES)})")

    def _string_array(self, buf, off: int, size: int, count: int, key: str) -> tuple[list[str], int]:
        unpack = _U64.unpack_from
        out: list[str] = []
        append = out.append
        i = 0
        try:
            for i in range(count):
                n = unpack(buf, off)[0]
                off += 8
                end = off + n
                append(str(buf[off:end], "utf-8"))
                off = end
        except UnicodeDecodeError as e:
            raise self._error(f"element {i} of {key!r} (at byte {off}) is not valid UTF-8: {e.reason} at "
                              f"byte {e.start} of the string ({bytes(buf[off:off + min(end - off, 64)])!r})") from None
        if off > size:  # slicing past the end returns short bytes; only the offset tells
            raise _Truncated
        return out, off

    def _tensor(self, data, name: str, dims: tuple[int, ...], type_id: int, data_start: int, rel: int,
                size: int) -> TensorInfo:
        try:
            ttype = GGMLQuantizationType(type_id)
            block_size, type_size = GGML_QUANT_SIZES[ttype]
        except (ValueError, KeyError):
            raise self._error(f"tensor {name!r} has unknown GGML tensor type id {type_id}") from None
        n_elements = 1
        for d in dims:
            n_elements *= d
        np_shape = tuple(reversed(dims))
        if dims and dims[0] % block_size:
            raise self._error(f"tensor {name!r} ({ttype.name}) has rows of {dims[0]} elements, not a multiple "
                              f"of the {block_size}-element block size")
        n_bytes = n_elements * type_size // block_size
        if rel % self.alignment:
            raise self._error(f"tensor {name!r} has data offset {rel}, not a multiple of the alignment "
                              f"{self.alignment}")
        start = data_start + rel
        if start + n_bytes > size:
            raise self._error(f"tensor {name!r} ({ttype.name}, shape {list(dims)}) needs bytes "
                              f"{start}..{start + n_bytes} but the file ends at byte {size}: the file is truncated")
        dtype = _TENSOR_DTYPE.get(ttype)
        if dtype is None:
            dtype = np.uint8
            if np_shape:
                np_shape = (*np_shape[:-1], np_shape[-1] // block_size * type_size)
        view = data[start:start + n_bytes].view(dtype).reshape(np_shape)
        return TensorInfo(name, ttype, dims, n_elements, n_bytes, start, view)
