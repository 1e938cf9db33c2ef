"""bitfold's GGUF reader against the `gguf` package's GGUFReader as the independent reference:
same metadata values, same tensor infos, byte-identical tensor data; and clear errors on broken files."""
from __future__ import annotations

import os
import shutil
import struct

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V

from bitfold.errors import ModelLoadError
from bitfold.loader.gguf_reader import GGUFFile


def _same(a, b) -> bool:
    """Equal values of the same Python types, recursively (True == 1 must not pass)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _assert_matches_reference(path: str, ref: gguf.GGUFReader | None = None) -> tuple[GGUFFile, gguf.GGUFReader]:
    ours, ref = GGUFFile(path), ref or gguf.GGUFReader(path)
    ref_fields = {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert list(ours.fields) == list(ref_fields)
    for key, value in ref_fields.items():
        assert _same(ours.fields[key], value), key
        assert _same(ours.get(key), value), key
    assert ours.get("no.such.key", 7) == 7
    assert ours.data_offset == ref.data_offset
    assert len(ours.tensors) == len(ref.tensors)
    for t, r in zip(ours.tensors, ref.tensors):
        assert t.name == r.name
        assert t.tensor_type is r.tensor_type
        assert t.shape == tuple(int(d) for d in r.shape)
        assert t.n_elements == r.n_elements
        assert t.n_bytes == r.n_bytes
        assert t.data_offset == r.data_offset
        assert isinstance(t.data, np.memmap)
        assert t.data.dtype == r.data.dtype and t.data.shape == r.data.shape, t.name
        assert t.data.tobytes() == r.data.tobytes(), t.name
    return ours, ref


# ---- (a) the real default model --------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_reference(smollm2_path) -> gguf.GGUFReader:
    return gguf.GGUFReader(smollm2_path)  # slow (seconds): opened once


def test_smollm2_matches_gguf_reader(smollm2_path, smollm2_reference):
    ours, _ = _assert_matches_reference(smollm2_path, smollm2_reference)
    assert len(ours.get("tokenizer.ggml.tokens")) == 49152
    t = next(t for t in ours.tensors if t.tensor_type is Q.Q4_1)
    w = gguf.quants.dequantize(t.data, t.tensor_type)
    assert w.shape == tuple(reversed(t.shape))


def test_tokenizer_from_gguffile_equals_from_gguf_reader(smollm2_path, smollm2_reference):
    from bitfold.loader.tokenizer import Tokenizer

    a = Tokenizer.from_gguf(GGUFFile(smollm2_path), smollm2_path)
    b = Tokenizer.from_gguf(smollm2_reference, smollm2_path)
    text = "Hello, wörld! 日本語 🦙\n  def f(x):\treturn x**2"
    assert a.encode(text) == b.encode(text)
    assert (a.vocab_size, a.bos_token_id, a.eos_token_ids, a.add_bos, a.chat_template) == \
           (b.vocab_size, b.bos_token_id, b.eos_token_ids, b.add_bos, b.chat_template)


# ---- (b) a file written by gguf.GGUFWriter with every value type -----------------------------------

STRINGS = ["a", "", "Ġhello", "héllo wörld", "日本語", "🦙", "\n\t", "\x00x", "Ã©"]


def _write(path, alignment: int | None = None) -> str:
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    if alignment:
        w.add_custom_alignment(alignment)
    w.add_uint8("t.u8", 255)
    w.add_int8("t.i8", -128)
    w.add_uint16("t.u16", 65535)
    w.add_int16("t.i16", -32768)
    w.add_uint32("t.u32", 2**32 - 1)
    w.add_int32("t.i32", -2**31)
    w.add_float32("t.f32", 0.1)
    w.add_uint64("t.u64", 2**64 - 1)
    w.add_int64("t.i64", -2**63)
    w.add_float64("t.f64", 0.1)
    w.add_bool("t.true", True)
    w.add_bool("t.false", False)
    w.add_string("t.str", "héllo wörld ✓ 日本語 🦙")
    w.add_string("t.str_empty", "")
    for vtype, values in [(V.UINT8, [0, 7, 255]), (V.INT8, [-128, 0, 127]), (V.UINT16, [0, 65535]),
                          (V.INT16, [-32768, 32767]), (V.UINT32, [0, 2**32 - 1]), (V.INT32, [-2**31, 5]),
                          (V.UINT64, [2**64 - 1, 3]), (V.INT64, [-2**63, 2**63 - 1]),
                          (V.FLOAT32, [0.5, -1.25, 0.1, 3e38]), (V.FLOAT64, [0.1, -2.5e300]),
                          (V.BOOL, [True, False, True]), (V.STRING, STRINGS)]:
        w.add_key_value(f"t.arr_{vtype.name.lower()}", values, V.ARRAY, sub_type=vtype)
    w.add_array("t.arr_single", ["only"])
    w.add_tensor("f32", rng.standard_normal((3, 5)).astype(np.float32))
    w.add_tensor("f32_1d", np.arange(7, dtype=np.float32))
    w.add_tensor("f16", rng.standard_normal((5, 3, 2)).astype(np.float16))
    q = gguf.quants.quantize(rng.standard_normal((3, 96)).astype(np.float32), Q.Q8_0)
    w.add_tensor("q8_0", q, raw_dtype=Q.Q8_0)
    q3 = gguf.quants.quantize(rng.standard_normal((5, 3, 32)).astype(np.float32), Q.Q8_0)
    w.add_tensor("q8_0_3d", q3, raw_dtype=Q.Q8_0)
    w.add_tensor("i32", np.arange(-4, 5, dtype=np.int32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> str:
    return _write(tmp_path_factory.mktemp("gguf") / "all_types.gguf")


def test_every_value_type_matches_gguf_reader(written):
    ours, ref = _assert_matches_reference(written)
    assert ours.get("t.u64") == 2**64 - 1 and ours.get("t.i64") == -2**63
    assert ours.get("t.true") is True and ours.get("t.false") is False
    assert ours.get("t.str") == "héllo wörld ✓ 日本語 🦙"
    assert ours.get("t.arr_string") == STRINGS
    assert ours.get("t.arr_bool") == [True, False, True]
    assert ours.get("t.f32") == float(np.float32(0.1))
    assert ours.version == 3 and ours.alignment == 32
    # The data views decode like the reference's.
    for t, r in zip(ours.tensors, ref.tensors):
        if t.tensor_type is not Q.I32:
            np.testing.assert_array_equal(gguf.quants.dequantize(t.data, t.tensor_type),
                                          gguf.quants.dequantize(r.data, r.tensor_type))
    assert [t.shape for t in ours.tensors] == [(5, 3), (7,), (2, 3, 5), (96, 3), (32, 3, 5), (9,)]


def test_custom_alignment_matches_gguf_reader(tmp_path):
    ours, _ = _assert_matches_reference(_write(tmp_path / "a64.gguf", alignment=64))
    assert ours.alignment == 64 and ours.data_offset % 64 == 0


# ---- hand-built files: what GGUFWriter will not write ---------------------------------------------

def _s(text: str | bytes) -> bytes:
    b = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(b)) + b


def _kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    return _s(key) + struct.pack("<I", vtype) + payload


def _arr(etype: int, count: int, payload: bytes) -> bytes:
    return struct.pack("<IQ", etype, count) + payload


def _raw(path, kvs: list[bytes], tensors: list[tuple[str, tuple[int, ...], int, int]] = (), data: bytes = b"",
         version: int = 3, alignment: int = 32) -> str:
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(kvs)) + b"".join(kvs)
    for name, dims, ttype, offset in tensors:
        head += _s(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ttype, offset)
    head += b"\0" * (-len(head) % alignment)
    with open(path, "wb") as f:
        f.write(head + data)
    return str(path)


def test_empty_and_nested_arrays(tmp_path):
    path = _raw(tmp_path / "e.gguf", [
        _kv("e.empty_i32", V.ARRAY, _arr(V.INT32, 0, b"")),
        _kv("e.empty_str", V.ARRAY, _arr(V.STRING, 0, b"")),
        _kv("e.after", V.UINT32, struct.pack("<I", 9)),
    ], tensors=[("w", (4,), Q.F32, 0)], data=np.arange(4, dtype=np.float32).tobytes())
    ours, _ = _assert_matches_reference(path)
    assert ours.get("e.empty_i32") == [] and ours.get("e.empty_str") == [] and ours.get("e.after") == 9
    # Arrays of arrays (GGUFReader flattens them; we keep the nesting).
    path = _raw(tmp_path / "n.gguf", [_kv("n", V.ARRAY, _arr(V.ARRAY, 2, _arr(V.UINT8, 2, b"\1\2")
                                                             + _arr(V.STRING, 1, _s("x"))))])
    assert GGUFFile(path).get("n") == [[1, 2], ["x"]]


# ---- (c) broken files ----------------------------------------------------------------------------

def _load_error(path) -> str:
    with pytest.raises(ModelLoadError) as e:
        GGUFFile(path)
    msg = str(e.value)
    assert str(path) in msg
    return msg


def _copy_patched(src: str, dst, offset: int, data: bytes) -> str:
    shutil.copyfile(src, dst)
    with open(dst, "r+b") as f:
        f.seek(offset)
        f.write(data)
    return str(dst)


def test_truncated_anywhere_fails_at_open(written, tmp_path):
    ref = gguf.GGUFReader(written)
    data_end = max(t.data_offset + t.n_bytes for t in ref.tensors)
    kv_start = ref.fields["general.architecture"].offset
    info_start = ref.tensors[0].field.offset
    named = {"header": 10, "kv": kv_start + 5, "string array": ref.fields["t.arr_string"].offset + 40,
             "tensor infos": info_start + 3, "last tensor info": ref.data_offset - 1 - (ref.data_offset % 32),
             "padding": ref.data_offset - 1, "data": ref.data_offset + 1, "last byte": data_end - 1}
    for where, cut in named.items():
        path = tmp_path / f"cut_{where.replace(' ', '_')}.gguf"
        shutil.copyfile(written, path)
        os.truncate(path, cut)
        assert "truncated" in _load_error(path), where
    # And every other cut point: shrink one copy byte by byte.
    path = tmp_path / "shrinking.gguf"
    shutil.copyfile(written, path)
    for size in range(data_end - 1, 0, -1):
        os.truncate(path, size)
        assert "truncated" in _load_error(path), size
    os.truncate(path, 0)
    assert "empty" in _load_error(path)


def test_bad_magic_and_version(written, tmp_path):
    assert "magic" in _load_error(_copy_patched(written, tmp_path / "m.gguf", 0, b"GGML"))
    for version in (1, 4):
        msg = _load_error(_copy_patched(written, tmp_path / f"v{version}.gguf", 4, struct.pack("<I", version)))
        assert f"version {version}" in msg
    assert "big-endian" in _load_error(_copy_patched(written, tmp_path / "be.gguf", 4, struct.pack(">I", 3)))


def test_unknown_value_types(written, tmp_path):
    ref = gguf.GGUFReader(written)
    type_at = ref.fields["t.u8"].offset + 8 + len("t.u8")
    msg = _load_error(_copy_patched(written, tmp_path / "vt.gguf", type_at, struct.pack("<I", 13)))
    assert "unknown value type 13" in msg and "t.u8" in msg
    elem_at = ref.fields["t.arr_int32"].offset + 8 + len("t.arr_int32") + 4
    msg = _load_error(_copy_patched(written, tmp_path / "et.gguf", elem_at, struct.pack("<I", 77)))
    assert "unknown value type 77" in msg and "t.arr_int32" in msg


def _tensor_field_at(ref: gguf.GGUFReader, name: str) -> tuple[int, int]:
    """Offsets of the type id and the data offset in tensor `name`'s info."""
    t = next(t for t in ref.tensors if t.name == name)
    type_at = t.field.offset + 8 + len(name) + 4 + 8 * len(t.shape)
    return type_at, type_at + 4


def test_bad_tensor_infos(written, tmp_path):
    ref = gguf.GGUFReader(written)
    type_at, offset_at = _tensor_field_at(ref, "f16")
    msg = _load_error(_copy_patched(written, tmp_path / "tt.gguf", type_at, struct.pack("<I", 99)))
    assert "unknown GGML tensor type id 99" in msg and "'f16'" in msg
    old = next(t for t in ref.tensors if t.name == "f16").data_offset - ref.data_offset
    msg = _load_error(_copy_patched(written, tmp_path / "mis.gguf", offset_at, struct.pack("<Q", old + 1)))
    assert "not a multiple of the alignment" in msg
    msg = _load_error(_copy_patched(written, tmp_path / "far.gguf", offset_at, struct.pack("<Q", 1 << 40)))
    assert "'f16'" in msg and "file ends at byte" in msg


def test_invalid_utf8_and_duplicates(tmp_path):
    bad = _s(b"ok") + _s(b"\xff\xfe") + _s(b"z")
    msg = _load_error(_raw(tmp_path / "u.gguf", [_kv("tokenizer.ggml.tokens", V.ARRAY, _arr(V.STRING, 3, bad))]))
    assert "element 1 of 'tokenizer.ggml.tokens'" in msg and "UTF-8" in msg
    msg = _load_error(_raw(tmp_path / "k.gguf", [_kv(b"k\xc3", V.UINT8, b"\0")]))
    assert "UTF-8" in msg
    msg = _load_error(_raw(tmp_path / "d.gguf", [_kv("a", V.UINT8, b"\0"), _kv("a", V.UINT8, b"\1")]))
    assert "duplicate metadata key 'a'" in msg
    msg = _load_error(_raw(tmp_path / "al.gguf", [_kv("general.alignment", V.UINT32, struct.pack("<I", 3))]))
    assert "general.alignment" in msg
    msg = _load_error(_raw(tmp_path / "n.gguf", [], tensors=[("w", (31,), Q.Q8_0, 0)], data=b"\0" * 64))
    assert "block size" in msg


def test_load_gguf_reports_truncation_as_model_load_error(written, tmp_path):
    from bitfold.loader.gguf_file import load_gguf

    path = tmp_path / "t.gguf"
    shutil.copyfile(written, path)
    os.truncate(path, os.path.getsize(written) // 2)
    with pytest.raises(ModelLoadError, match="truncated"):
        load_gguf(str(path))
