"""Hugging Face model folders: config.json + *.safetensors (single or sharded with an index),
memory-mapped so a tensor is read only when its turn comes.

A folder written by `bitfold quantize` says so in config.json (`quantization_config` with
`quant_method: "bitfold"`): its linear weights are stored as `<name>.qweight` (bit planes),
`<name>.scales` and `<name>.mins`, which this loader checks and hands on as one
`BitfoldCodes` named `<name>.weight`; `source.weight_format` is the stored format.
"""
from __future__ import annotations

import json
import os
import re
from typing import Iterator

import torch

from bitfold.config import ModelConfig
from bitfold.errors import ModelLoadError, UnsupportedArchitectureError, UnsupportedFormatError
from bitfold.loader.source import ModelSource
from bitfold.progress import progress
from bitfold.weights import WEIGHT_FORMATS
from bitfold.weights.lowbit import LowBitSpec, lowbit_spec
from bitfold.weights.packed import BitfoldCodes

CODE_PARTS = ("qweight", "scales", "mins")


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:  # a folder named config.json, no permission...
        raise ModelLoadError(f"{path}: cannot be read ({e.strerror or e})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, found a {type(data).__name__}")
    return data


def safetensors_files(folder: str) -> list[str]:
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"{index}: field 'weight_map' is missing or empty")
        if not all(isinstance(v, str) for v in weight_map.values()):
            raise ModelLoadError(f"{index}: field 'weight_map' must map tensor names to shard file names")
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
        if not files:
            raise ModelLoadError(f"{folder}: no *.safetensors file (expected model.safetensors or a sharded index)")
    paths = [os.path.join(folder, f) for f in files]
    for p in paths:
        if not os.path.exists(p):
            raise ModelLoadError(f"{p}: shard listed in model.safetensors.index.json is missing")
    return paths


class BitfoldQuantization:
    """A checkpoint's `quantization_config` (quant_method "bitfold"), validated: the format of
    its linear layers and of its output layer (4 bits under int1-3 and ternary, see lowbit).

    A mixed-precision checkpoint adds `overrides`: {checkpoint module name: low-bit format} for
    the decoder linears stored in another format than `format`, e.g.
    {"model.layers.3.mlp.down_proj": "int4-g64", "model.layers.0.self_attn.q_proj": "int4-g64",
     "model.layers.0.self_attn.k_proj": "int4-g64", "model.layers.0.self_attn.v_proj": "int4-g64"}.
    Keys are the names the safetensors files use (`<key>.qweight`), one per shard; the shards
    bitfold runs as one matmul (q/k/v, gate/up) must all be listed with one format. `self.overrides`
    is the same per merged linear, {(layer, kind): format}, which models/format_plan.py's plan takes.
    `bits_per_weight` (optional) records the decoder linears' average stored bits per weight."""

    def __init__(self, qc, cfg_path: str, num_layers: int):
        where = f"{cfg_path}: quantization_config"
        if not isinstance(qc, dict):
            raise ModelLoadError(f"{where} must be an object, found {type(qc).__name__}")
        method = qc.get("quant_method")
        if method != "bitfold":
            raise UnsupportedFormatError(f"{where}.quant_method is {method!r}; bitfold reads its own quantized "
                                         "checkpoints ('bitfold', written by `bitfold quantize`) and unquantized ones")
        fmt = qc.get("format")
        spec = lowbit_spec(fmt) if isinstance(fmt, str) and fmt in WEIGHT_FORMATS else None
        if spec is None:
            known = ", ".join(n for n in WEIGHT_FORMATS.names() if lowbit_spec(n) is not None and "-g" in n)
            raise ModelLoadError(f"{where}.format is {fmt!r}, not a bitfold low-bit format (known: {known})")
        for key, want in (("bits", spec.bits), ("group_size", spec.group), ("ternary", spec.ternary)):
            if key in qc and (qc[key] != want or type(qc[key]) is not type(want)):
                raise ModelLoadError(f"{where}.{key} is {qc[key]!r}, but format {fmt!r} has {key} {want!r}")
        head = getattr(WEIGHT_FORMATS.get(fmt), "lm_head_format", None) or spec.name
        stored_head = qc.get("lm_head_format", head)
        if not isinstance(stored_head, str) or lowbit_spec(stored_head) != lowbit_spec(head):
            raise ModelLoadError(f"{where}.lm_head_format is {stored_head!r}, but bitfold builds the output layer "
                                 f"of a {spec.name} model as {head}")
        self.format, self.spec, self.head_spec = spec.name, spec, lowbit_spec(head)
        self.overrides, self.shard_specs = _overrides(qc.get("overrides", {}), where, spec, num_layers)
        bpw = qc.get("bits_per_weight")
        if bpw is not None and (type(bpw) not in (int, float) or not 0 < bpw <= 32):
            raise ModelLoadError(f"{where}.bits_per_weight is {bpw!r}; expected a number of bits (0-32) or no field")

    def codes(self, base: str, parts: dict[str, tuple[torch.Tensor, str]]) -> BitfoldCodes:
        """`base`.qweight/.scales/.mins (tensor, file) -> BitfoldCodes, or ModelLoadError naming
        the file and tensor when one does not fit the others or the format."""
        spec = self.head_spec if base == "lm_head" else self.shard_specs.get(base, self.spec)
        (planes, path), (scales, spath), (mins, mpath) = (parts[k] for k in CODE_PARTS)

        def bad(what: str, tensor: str = "qweight", file: str = path) -> ModelLoadError:
            return ModelLoadError(f"{file}: tensor {base + '.' + tensor!r}: {what}")

        if planes.dtype != torch.uint8 or planes.dim() != 3:
            raise bad(f"expected uint8 bit planes [bits, rows, columns / 8], found {planes.dtype} "
                      f"{tuple(planes.shape)}")
        if planes.shape[0] != spec.bits:
            raise bad(f"stores {planes.shape[0]} bit planes, but the checkpoint's format {spec.name} has "
                      f"{spec.bits} bits" + (" (quantization_config.overrides)" if base in self.shard_specs else ""))
        cols = planes.shape[2] * 8
        if cols == 0 or spec.padded(cols) != cols:
            raise bad(f"{cols} columns are not whole groups of {spec.group or 'a row'} (format {spec.name})")
        group = spec.group_size(cols)
        want = (planes.shape[1], cols // group)
        for name, t, file in (("scales", scales, spath), ("mins", mins, mpath)):
            if t.dtype != torch.float16 or tuple(t.shape) != want:
                raise bad(f"expected float16 {want} (rows x groups of {group} of the qweight's "
                          f"{cols} columns), found {t.dtype} {tuple(t.shape)}", name, file)
        return BitfoldCodes(spec, planes, scales, mins, f"{path}: tensor {base + '.qweight'!r}")


def _overrides(raw, where: str, default: LowBitSpec, num_layers: int):
    """quantization_config.overrides -> ({(layer, kind): format}, {shard module name: spec});
    ModelLoadError (one line: config.json and the field) for anything bitfold would not build."""
    from bitfold.models.format_plan import MERGED_LINEARS, SHARD_KIND

    where = f"{where}.overrides"
    example = "e.g. {\"model.layers.0.mlp.down_proj\": \"int4-g64\"}"
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{where} must be an object mapping linear names to formats ({example}), found "
                             f"{type(raw).__name__}")
    shards: dict[str, LowBitSpec] = {}
    for key, fmt in raw.items():
        m = re.fullmatch(r"model\.layers\.(0|[1-9]\d*)\.(.+)", key)  # the file's spelling: no leading zeros
        if key in ("lm_head", "lm_head.weight"):
            raise ModelLoadError(f"{where}: {key!r} cannot be overridden; the output layer's format is "
                                 "quantization_config.lm_head_format")
        if m is None or m.group(2) not in SHARD_KIND:
            raise ModelLoadError(f"{where}: key {key!r} is not a decoder linear; expected model.layers.<i>.<one of "
                                 f"{', '.join(SHARD_KIND)}> ({example})")
        if int(m.group(1)) >= num_layers:
            raise ModelLoadError(f"{where}: key {key!r} names layer {int(m.group(1))}, but the model has "
                                 f"{num_layers} layers (num_hidden_layers)")
        spec = lowbit_spec(fmt) if isinstance(fmt, str) and fmt in WEIGHT_FORMATS else None
        if spec is None:
            raise ModelLoadError(f"{where}[{key!r}] is {fmt!r}, not a bitfold low-bit format (e.g. int4-g64)")
        shards[key] = spec
    merged: dict[tuple[int, str], str] = {}
    for key, spec in shards.items():
        _, _, layer, suffix = key.split(".", 3)
        kind = SHARD_KIND[suffix]
        for other in MERGED_LINEARS[kind]:
            name = f"model.layers.{layer}.{other}"
            if shards.get(name) != spec:
                has = f"is {shards[name].name}" if name in shards else f"is not listed (so {default.name})"
                raise ModelLoadError(f"{where}: {key!r} is {spec.name} but {name!r} {has}; "
                                     f"{' / '.join(s.rsplit('.', 1)[1] for s in MERGED_LINEARS[kind])} run as one "
                                     "matmul and must share a format (list each of them)")
        merged[(int(layer), kind)] = spec.name
    return merged, shards


def _iter_safetensors(paths: list[str], quant: BitfoldQuantization | None = None) -> Iterator[tuple[str, object]]:
    """(name, tensor) in file order; with `quant`, each <base>.qweight/.scales/.mins triple (in
    any order, any files) comes out once as (<base>.weight, BitfoldCodes)."""
    from safetensors import SafetensorError, safe_open

    total = sum(os.path.getsize(p) for p in paths)
    pending: dict[str, dict[str, tuple[torch.Tensor, str]]] = {}
    with progress(total, "loading weights") as bar:
        for p in paths:
            try:
                with safe_open(p, framework="pt") as f:
                    for name in f.keys():
                        t = f.get_tensor(name)
                        bar.update(t.numel() * t.element_size())
                        base, _, part = name.rpartition(".")
                        if quant is None or part not in CODE_PARTS:
                            yield name, t
                            continue
                        parts = pending.setdefault(base, {})
                        parts[part] = (t, p)
                        if len(parts) == len(CODE_PARTS):
                            yield base + ".weight", quant.codes(base, pending.pop(base))
            except (SafetensorError, OSError) as e:
                raise ModelLoadError(f"{p}: not a readable safetensors file ({e})") from None
    for base, parts in pending.items():
        have = next(k for k in CODE_PARTS if k in parts)
        missing = " or ".join(repr(f"{base}.{k}") for k in CODE_PARTS if k not in parts)
        raise ModelLoadError(f"{parts[have][1]}: tensor {base + '.' + have!r} has no {missing} (a quantized weight "
                             "is stored as qweight, scales and mins)")


def _check_architecture(arch: str, cfg_path: str) -> None:
    """Fail at open, with the file and field, rather than when the runner looks the model up."""
    from bitfold.models import MODELS

    if arch not in MODELS:
        known = ", ".join(n for n in MODELS.names() if not n.startswith("gguf:"))
        raise UnsupportedArchitectureError(
            f"{cfg_path}: architecture {arch!r} (field 'architectures') is not supported; supported: {known}")


def load_hf_folder(folder: str) -> ModelSource:
    from bitfold.loader.tokenizer import Tokenizer

    cfg_path = os.path.join(folder, "config.json")
    if not os.path.exists(cfg_path):
        raise ModelLoadError(f"{folder}: no config.json (expected a Hugging Face model folder or a .gguf file)")
    raw = _read_json(cfg_path)
    archs = raw.get("architectures")
    if isinstance(archs, list) and archs and isinstance(archs[0], str):
        _check_architecture(archs[0], cfg_path)  # before the fields: another family names them differently
    config = ModelConfig.from_hf(raw, cfg_path)
    quant = (BitfoldQuantization(raw["quantization_config"], cfg_path, config.num_layers)
             if "quantization_config" in raw else None)
    paths = safetensors_files(folder)
    return ModelSource(
        path=folder,
        format="hf",
        config=config,
        weights=lambda: _iter_safetensors(paths, quant),
        load_tokenizer=lambda: Tokenizer.from_hf_folder(folder),
        max_context=config.max_position_embeddings,
        weight_format=quant.format if quant else None,
        stored_formats=tuple(dict.fromkeys([quant.format, *quant.overrides.values()])) if quant else (),
        format_overrides=dict(quant.overrides) if quant else {},
    )
