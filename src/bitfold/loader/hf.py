"""Hugging Face model folders: config.json + *.safetensors (single or sharded with an index),
memory-mapped so a tensor is read only when its turn comes."""
from __future__ import annotations

import json
import os
from typing import Iterator

import torch
from tqdm import tqdm

from bitfold.config import ModelConfig
from bitfold.errors import ModelLoadError, UnsupportedArchitectureError
from bitfold.loader.source import ModelSource


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


def _iter_safetensors(paths: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    total = sum(os.path.getsize(p) for p in paths)
    with tqdm(total=total, unit="B", unit_scale=True, desc="loading weights", disable=None, leave=False) as bar:
        for p in paths:
            try:
                with safe_open(p, framework="pt") as f:
                    for name in f.keys():
                        t = f.get_tensor(name)
                        bar.update(t.numel() * t.element_size())
                        yield name, t
            except (SafetensorError, OSError) as e:
                raise ModelLoadError(f"{p}: not a readable safetensors file ({e})") from None


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
    config = ModelConfig.from_hf(raw, cfg_path)
    _check_architecture(config.architecture, cfg_path)
    paths = safetensors_files(folder)
    return ModelSource(
        path=folder,
        format="hf",
        config=config,
        weights=lambda: _iter_safetensors(paths),
        load_tokenizer=lambda: Tokenizer.from_hf_folder(folder),
        max_context=config.max_position_embeddings,
    )
